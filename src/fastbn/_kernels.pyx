# cython: language_level=3
"""Batch-norm kernels on canonical (outer, C, inner) C-contiguous arrays.

Nothing here validates or knows about axes: fastbn.functional checks every argument, casts the
per-channel arrays to float64, allocates the outputs and reshapes to the canonical view before
calling in. The kernels release the GIL and never raise.

Two layouts, chosen by the caller's view:
  inner > 1  "NCL": each channel is `outer` contiguous runs of `inner` values.
  inner == 1 "NLC" (channels-last, and 2-D (N, C)): rows of C values, one lane per channel.

Determinism: every reduction is cut into blocks whose boundaries depend only on the shape (never
on the thread count), each block is reduced by one thread, and the blocks are merged in a fixed
order. The results are therefore bitwise identical for any number of threads and from run to run.

Per-channel statistics are returned as (mean, M2) with M2 = sum((x - mean)^2): the merge of
partial results (Chan et al.) is exact in form, which fastbn.distributed reuses across processes.
"""
cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

ctypedef fused floating:
    float
    double

cdef extern from "_simd.h" nogil:
    int fbn_openmp_enabled()
    int fbn_omp_max_threads()
    void fbn_sums_float(const float *x, Py_ssize_t n, double k, double *s1, double *s2)
    void fbn_sums_double(const double *x, Py_ssize_t n, double k, double *s1, double *s2)
    void fbn_sums_rows_float(const float *x, Py_ssize_t nrows, Py_ssize_t stride,
                             Py_ssize_t width, const double *k, double *a1, double *a2)
    void fbn_sums_rows_double(const double *x, Py_ssize_t nrows, Py_ssize_t stride,
                              Py_ssize_t width, const double *k, double *a1, double *a2)
    void fbn_norm_float(const float *x, float *y, Py_ssize_t n, float mhi, float mlo,
                        float a, float b, int relu)
    void fbn_norm_double(const double *x, double *y, Py_ssize_t n, double mhi, double mlo,
                         double a, double b, int relu)
    void fbn_norm_rows_float(const float *x, float *y, Py_ssize_t nrows, Py_ssize_t stride,
                             Py_ssize_t width, const float *mhi, const float *mlo,
                             const float *a, const float *b, int relu)
    void fbn_norm_rows_double(const double *x, double *y, Py_ssize_t nrows, Py_ssize_t stride,
                              Py_ssize_t width, const double *mhi, const double *mlo,
                              const double *a, const double *b, int relu)
    void fbn_bwd_sums_float(const float *dy, const float *x, const float *y, Py_ssize_t n,
                            double mean, double *s1, double *s2)
    void fbn_bwd_sums_double(const double *dy, const double *x, const double *y, Py_ssize_t n,
                             double mean, double *s1, double *s2)
    void fbn_bwd_sums_rows_float(const float *dy, const float *x, const float *y,
                                 Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                 const double *mean, double *a1, double *a2)
    void fbn_bwd_sums_rows_double(const double *dy, const double *x, const double *y,
                                  Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                  const double *mean, double *a1, double *a2)
    void fbn_bwd_dx_float(const float *dy, const float *x, const float *y, float *dx,
                          Py_ssize_t n, float mhi, float mlo, float a, float k, float c)
    void fbn_bwd_dx_double(const double *dy, const double *x, const double *y, double *dx,
                           Py_ssize_t n, double mhi, double mlo, double a, double k, double c)
    void fbn_bwd_dx_rows_float(const float *dy, const float *x, const float *y, float *dx,
                               Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                               const float *mhi, const float *mlo, const float *a,
                               const float *k, const float *c)
    void fbn_bwd_dx_rows_double(const double *dy, const double *x, const double *y, double *dx,
                                Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                const double *mhi, const double *mlo, const double *a,
                                const double *k, const double *c)

# Partition constants. They fix the order of every floating-point reduction, so changing one
# changes results in the last bits (but never their thread-count invariance).
cdef enum:
    CHUNK = 32768       # values of one channel reduced by one NCL task
    CL_CHUNK = 65536    # values of one channels-last block (rows x channel tile)
    TILE = 1024         # channels of one channels-last tile; lanes live in L1 (3 x 8 KB)
    MIN_LANES = 64      # below this many channels, rows are grouped into wider "super-rows"
    PIECE = 65536       # values of one elementwise NCL task
    PAR_MIN = 32768     # below this many values a parallel region costs more than it saves


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(fbn_openmp_enabled())


def omp_max_threads():
    """OpenMP's current default thread count (OMP_NUM_THREADS, threadpoolctl limits)."""
    return fbn_omp_max_threads()


# --------------------------------------------------------------------------- dtype dispatch

cdef inline void _sums(const floating *x, Py_ssize_t n, double k, double *s1,
                       double *s2) noexcept nogil:
    if floating is float:
        fbn_sums_float(x, n, k, s1, s2)
    else:
        fbn_sums_double(x, n, k, s1, s2)


cdef inline void _sums_rows(const floating *x, Py_ssize_t nrows, Py_ssize_t stride,
                            Py_ssize_t width, const double *k, double *a1,
                            double *a2) noexcept nogil:
    if floating is float:
        fbn_sums_rows_float(x, nrows, stride, width, k, a1, a2)
    else:
        fbn_sums_rows_double(x, nrows, stride, width, k, a1, a2)


cdef inline void _bwd_sums(const floating *dy, const floating *x, const floating *y,
                           Py_ssize_t n, double mean, double *s1, double *s2) noexcept nogil:
    if floating is float:
        fbn_bwd_sums_float(dy, x, y, n, mean, s1, s2)
    else:
        fbn_bwd_sums_double(dy, x, y, n, mean, s1, s2)


cdef inline void _bwd_sums_rows(const floating *dy, const floating *x, const floating *y,
                                Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                const double *mean, double *a1, double *a2) noexcept nogil:
    if floating is float:
        fbn_bwd_sums_rows_float(dy, x, y, nrows, stride, width, mean, a1, a2)
    else:
        fbn_bwd_sums_rows_double(dy, x, y, nrows, stride, width, mean, a1, a2)


# --------------------------------------------------------------------------- partitions

cdef struct Rows:
    # Channels-last partition of an (R, C) array into blocks of rows x channel tiles.
    Py_ssize_t R, C
    Py_ssize_t m        # rows per super-row (C < MIN_LANES), else 1
    Py_ssize_t tile     # channels per tile (C when C < MIN_LANES)
    Py_ssize_t ntiles
    Py_ssize_t rb       # rows per block, a multiple of m
    Py_ssize_t nb       # row blocks


cdef inline Py_ssize_t _gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef Rows _rows_partition(Py_ssize_t R, Py_ssize_t C, Py_ssize_t chunk) noexcept nogil:
    cdef Rows p
    p.R = R
    p.C = C
    if C < MIN_LANES:
        # A row of 3 channels is too short to vectorise: m consecutive rows form one
        # contiguous super-row of m*C lanes, a multiple of 16, lane j holding channel j % C.
        p.m = 16 // _gcd(C, 16)
        p.tile = C
    else:
        p.m = 1
        p.tile = C if C < TILE else TILE
    p.ntiles = (C + p.tile - 1) // p.tile
    p.rb = (chunk // (p.m * p.tile)) * p.m
    if p.rb < p.m:
        p.rb = p.m
    p.nb = (R + p.rb - 1) // p.rb if R > 0 else 0
    return p


cdef inline int _nthreads(int nthreads, Py_ssize_t work) noexcept nogil:
    return nthreads if work >= PAR_MIN and nthreads > 1 else 1


# --------------------------------------------------------------------------- statistics

cdef inline void _chan_merge(double *n, double *mean, double *m2, double nb, double mb,
                             double m2b) noexcept nogil:
    """Merge a partial (nb, mb, m2b) into (n, mean, m2) (Chan, Golub & LeVeque)."""
    cdef double ntot, delta
    if nb == 0:
        return
    if n[0] == 0:
        n[0] = nb
        mean[0] = mb
        m2[0] = m2b
        return
    ntot = n[0] + nb
    delta = mb - mean[0]
    mean[0] = mean[0] + delta * (nb / ntot)
    m2[0] = m2[0] + m2b + delta * delta * (n[0] * (nb / ntot))
    n[0] = ntot


cdef inline void _block_moments(double cnt, double k, double s1, double s2, double *mean,
                                double *m2) noexcept nogil:
    """(mean, M2) of a block from its sums shifted by k, a sample of the block."""
    cdef double d = s1 / cnt
    mean[0] = k + d
    m2[0] = s2 - s1 * d
    if m2[0] < 0:  # rounding when all values are (nearly) equal; NaN stays NaN
        m2[0] = 0


cdef void _ncl_stats_task(const floating *x, Py_ssize_t C, Py_ssize_t I, Py_ssize_t M,
                          Py_ssize_t c, Py_ssize_t q, double *pmean,
                          double *pm2) noexcept nogil:
    # Values [q*CHUNK, (q+1)*CHUNK) of channel c, in (outer, inner) order.
    cdef Py_ssize_t e = q * CHUNK
    cdef Py_ssize_t e1 = min(M, e + CHUNK)
    cdef Py_ssize_t o = e // I
    cdef Py_ssize_t i = e % I
    cdef Py_ssize_t span
    cdef double s1 = 0, s2 = 0
    cdef double k = x[(o * C + c) * I + i]
    while e < e1:
        span = min(I - i, e1 - e)
        _sums(x + (o * C + c) * I + i, span, k, &s1, &s2)
        e += span
        o += 1
        i = 0
    _block_moments(<double>(e1 - q * CHUNK), k, s1, s2, pmean, pm2)


cdef void _rows_stats_task(const floating *x, const Rows *p, Py_ssize_t b, Py_ssize_t t,
                           double *pmean, double *pm2) noexcept nogil:
    # Rows [b*rb, (b+1)*rb) x channels [t*tile, (t+1)*tile); writes pmean/pm2[b*C + c].
    cdef double k[TILE]
    cdef double a1[TILE]
    cdef double a2[TILE]
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = t * p.tile
    cdef Py_ssize_t cw = min(p.tile, p.C - c0)
    cdef Py_ssize_t width = p.m * cw
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t j, c
    cdef double s1, s2
    for j in range(width):
        k[j] = x[r0 * p.C + c0 + j % cw]
        a1[j] = 0
        a2[j] = 0
    # super-rows are contiguous (m > 1 only when the tile is the whole row)
    _sums_rows(x + r0 * p.C + c0, nsr, p.m * p.C, width, k, a1, a2)
    if r0 + nsr * p.m < r1:
        _sums_rows(x + (r0 + nsr * p.m) * p.C + c0, r1 - r0 - nsr * p.m, p.C, cw, k, a1, a2)
    for c in range(cw):
        s1 = 0
        s2 = 0
        j = c
        while j < width:
            s1 += a1[j]
            s2 += a2[j]
            j += cw
        _block_moments(<double>(r1 - r0), k[c], s1, s2,
                       pmean + b * p.C + c0 + c, pm2 + b * p.C + c0 + c)


cdef int _stats(const floating *x, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, double *mean,
                double *m2, int nthreads) noexcept nogil:
    """Per-channel mean and M2 of x (O, C, I). Returns -1 when out of memory."""
    cdef Py_ssize_t M = O * I
    cdef Py_ssize_t nq, t, c, q, nblk
    cdef double n, blk
    cdef double *pmean
    cdef double *pm2
    cdef Rows p
    cdef int nt = _nthreads(nthreads, O * C * I)
    if I > 1:
        nq = (M + CHUNK - 1) // CHUNK
        nblk = C * nq
    else:
        p = _rows_partition(O, C, CL_CHUNK)
        nblk = p.nb * C
    pmean = <double *> malloc((2 * nblk + 1) * sizeof(double))
    if pmean == NULL:
        return -1
    pm2 = pmean + nblk
    if I > 1:
        for t in prange(C * nq, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            _ncl_stats_task(x, C, I, M, t // nq, t % nq, pmean + t, pm2 + t)
        for c in prange(C, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            n = 0
            mean[c] = 0
            m2[c] = 0
            for q in range(nq):
                blk = <double>(min(M, (q + 1) * CHUNK) - q * CHUNK)
                _chan_merge(&n, mean + c, m2 + c, blk, pmean[c * nq + q], pm2[c * nq + q])
    else:
        for t in prange(p.nb * p.ntiles, schedule='static', num_threads=nt,
                        use_threads_if=nt > 1):
            _rows_stats_task(x, &p, t // p.ntiles, t % p.ntiles, pmean, pm2)
        for c in prange(C, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            n = 0
            mean[c] = 0
            m2[c] = 0
            for q in range(p.nb):
                blk = <double>(min(O, (q + 1) * p.rb) - q * p.rb)
                _chan_merge(&n, mean + c, m2 + c, blk, pmean[q * C + c], pm2[q * C + c])
    free(pmean)
    return 0


# --------------------------------------------------------------------------- elementwise

cdef inline void _split(double v, floating *hi, floating *lo) noexcept nogil:
    # head + tail of v in the working precision: for float32, (x - hi) - lo keeps the digits
    # of x - v that a single rounded mean would lose when |mean| >> std.
    hi[0] = <floating>v
    lo[0] = <floating>(v - <double>hi[0])


cdef int _replicate(floating *dst, const double *src, Py_ssize_t C, Py_ssize_t width,
                    Py_ssize_t c0) noexcept nogil:
    cdef Py_ssize_t j
    cdef Py_ssize_t cw = width if width < C else C
    for j in range(width):
        dst[j] = <floating>src[c0 + j % cw]
    return 0


cdef int _normalize(const floating *x, floating *y, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I,
                    const double *mean, const double *scale, const double *shift, bint relu,
                    int nthreads) noexcept nogil:
    """y = (x - mean) * scale + shift per channel (then ReLU). Returns -1 when out of memory."""
    cdef Py_ssize_t npieces, t, s, c, i0, b, r0, r1, nsr, j, width
    cdef floating mhi, mlo
    cdef floating *lanes
    cdef Rows p
    cdef int nt = _nthreads(nthreads, O * C * I)
    if I > 1:
        npieces = (I + PIECE - 1) // PIECE
        for t in prange(O * C * npieces, schedule='static', num_threads=nt,
                        use_threads_if=nt > 1):
            s = t // npieces
            c = s % C
            i0 = (t % npieces) * PIECE
            # assigned here, not through a pointer, so that prange makes them thread-private
            mhi = <floating>mean[c]
            mlo = <floating>(mean[c] - <double>mhi)
            if floating is float:
                fbn_norm_float(x + s * I + i0, y + s * I + i0, min(PIECE, I - i0), mhi, mlo,
                               <float>scale[c], <float>shift[c], relu)
            else:
                fbn_norm_double(x + s * I + i0, y + s * I + i0, min(PIECE, I - i0), mhi, mlo,
                                scale[c], shift[c], relu)
        return 0
    # channels-last: parameters replicated over the lanes of a (super-)row
    p = _rows_partition(O, C, CL_CHUNK)
    width = p.m * C
    lanes = <floating *> malloc(4 * width * sizeof(floating))
    if lanes == NULL:
        return -1
    for j in range(width):
        _split(mean[j % C], lanes + j, lanes + width + j)
    _replicate(lanes + 2 * width, scale, C, width, 0)
    _replicate(lanes + 3 * width, shift, C, width, 0)
    for b in prange(p.nb, schedule='static', num_threads=nt, use_threads_if=nt > 1):
        r0 = b * p.rb
        r1 = min(O, r0 + p.rb)
        nsr = (r1 - r0) // p.m
        _norm_rows(x + r0 * C, y + r0 * C, nsr, width, width, lanes, width, relu)
        if r0 + nsr * p.m < r1:
            _norm_rows(x + (r0 + nsr * p.m) * C, y + (r0 + nsr * p.m) * C,
                       r1 - r0 - nsr * p.m, C, C, lanes, width, relu)
    free(lanes)
    return 0


cdef inline void _norm_rows(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t stride,
                            Py_ssize_t width, const floating *lanes, Py_ssize_t w,
                            bint relu) noexcept nogil:
    # lanes: [mhi | mlo | scale | shift], each w long
    if floating is float:
        fbn_norm_rows_float(x, y, nrows, stride, width, lanes, lanes + w, lanes + 2 * w,
                            lanes + 3 * w, relu)
    else:
        fbn_norm_rows_double(x, y, nrows, stride, width, lanes, lanes + w, lanes + 2 * w,
                             lanes + 3 * w, relu)


# --------------------------------------------------------------------------- backward

cdef void _ncl_bwd_task(const floating *dy, const floating *x, const floating *y, Py_ssize_t C,
                        Py_ssize_t I, Py_ssize_t M, Py_ssize_t c, Py_ssize_t q, double mean,
                        double *p1, double *p2) noexcept nogil:
    cdef Py_ssize_t e = q * CHUNK
    cdef Py_ssize_t e1 = min(M, e + CHUNK)
    cdef Py_ssize_t o = e // I
    cdef Py_ssize_t i = e % I
    cdef Py_ssize_t span, off
    p1[0] = 0
    p2[0] = 0
    while e < e1:
        span = min(I - i, e1 - e)
        off = (o * C + c) * I + i
        _bwd_sums(dy + off, x + off, y + off if y != NULL else NULL, span, mean, p1, p2)
        e += span
        o += 1
        i = 0


cdef void _rows_bwd_task(const floating *dy, const floating *x, const floating *y,
                         const Rows *p, Py_ssize_t b, Py_ssize_t t, const double *mean,
                         double *p1, double *p2) noexcept nogil:
    cdef double mu[TILE]
    cdef double a1[TILE]
    cdef double a2[TILE]
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = t * p.tile
    cdef Py_ssize_t cw = min(p.tile, p.C - c0)
    cdef Py_ssize_t width = p.m * cw
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t j, c, off
    cdef double s1, s2
    for j in range(width):
        mu[j] = mean[c0 + j % cw]
        a1[j] = 0
        a2[j] = 0
    off = r0 * p.C + c0
    _bwd_sums_rows(dy + off, x + off, y + off if y != NULL else NULL, nsr, p.m * p.C, width,
                   mu, a1, a2)
    if r0 + nsr * p.m < r1:
        off = (r0 + nsr * p.m) * p.C + c0
        _bwd_sums_rows(dy + off, x + off, y + off if y != NULL else NULL,
                       r1 - r0 - nsr * p.m, p.C, cw, mu, a1, a2)
    for c in range(cw):
        s1 = 0
        s2 = 0
        j = c
        while j < width:
            s1 += a1[j]
            s2 += a2[j]
            j += cw
        p1[b * p.C + c0 + c] = s1
        p2[b * p.C + c0 + c] = s2


cdef int _bwd_sums_all(const floating *dy, const floating *x, const floating *y, Py_ssize_t O,
                       Py_ssize_t C, Py_ssize_t I, const double *mean, double *sum_dy,
                       double *sum_dy_xmu, int nthreads) noexcept nogil:
    """Per channel: sum(g) and sum(g * (x - mean)), g = dy (masked by y > 0 if y)."""
    cdef Py_ssize_t M = O * I
    cdef Py_ssize_t nq, t, c, q, nblk
    cdef double *p1
    cdef double *p2
    cdef Rows p
    cdef int nt = _nthreads(nthreads, O * C * I)
    if I > 1:
        nq = (M + CHUNK - 1) // CHUNK
        nblk = C * nq
    else:
        p = _rows_partition(O, C, CL_CHUNK)
        nblk = p.nb * C
    p1 = <double *> malloc((2 * nblk + 1) * sizeof(double))
    if p1 == NULL:
        return -1
    p2 = p1 + nblk
    if I > 1:
        for t in prange(C * nq, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            _ncl_bwd_task(dy, x, y, C, I, M, t // nq, t % nq, mean[t // nq], p1 + t, p2 + t)
        for c in prange(C, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            sum_dy[c] = 0
            sum_dy_xmu[c] = 0
            for q in range(nq):
                sum_dy[c] += p1[c * nq + q]
                sum_dy_xmu[c] += p2[c * nq + q]
    else:
        for t in prange(p.nb * p.ntiles, schedule='static', num_threads=nt,
                        use_threads_if=nt > 1):
            _rows_bwd_task(dy, x, y, &p, t // p.ntiles, t % p.ntiles, mean, p1, p2)
        for c in prange(C, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            sum_dy[c] = 0
            sum_dy_xmu[c] = 0
            for q in range(p.nb):
                sum_dy[c] += p1[q * C + c]
                sum_dy_xmu[c] += p2[q * C + c]
    free(p1)
    return 0


cdef int _bwd_dx(const floating *dy, const floating *x, const floating *y, floating *dx,
                 Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, const double *mean,
                 const double *a, const double *k, const double *cc, int nthreads) noexcept nogil:
    """dx = a*g - k*(x - mean) + cc per channel, g = dy (masked by y > 0 if y)."""
    cdef Py_ssize_t npieces, t, s, c, i0, b, r0, r1, nsr, j, width, off, n
    cdef floating mhi, mlo
    cdef floating *lanes
    cdef Rows p
    cdef int nt = _nthreads(nthreads, O * C * I)
    if I > 1:
        npieces = (I + PIECE - 1) // PIECE
        for t in prange(O * C * npieces, schedule='static', num_threads=nt,
                        use_threads_if=nt > 1):
            s = t // npieces
            c = s % C
            i0 = (t % npieces) * PIECE
            off = s * I + i0
            n = min(PIECE, I - i0)
            # assigned here, not through a pointer, so that prange makes them thread-private
            mhi = <floating>mean[c]
            mlo = <floating>(mean[c] - <double>mhi)
            if floating is float:
                fbn_bwd_dx_float(dy + off, x + off, y + off if y != NULL else NULL, dx + off,
                                 n, mhi, mlo, <float>a[c], <float>k[c], <float>cc[c])
            else:
                fbn_bwd_dx_double(dy + off, x + off, y + off if y != NULL else NULL, dx + off,
                                  n, mhi, mlo, a[c], k[c], cc[c])
        return 0
    p = _rows_partition(O, C, CL_CHUNK)
    width = p.m * C
    lanes = <floating *> malloc(5 * width * sizeof(floating))
    if lanes == NULL:
        return -1
    for j in range(width):
        _split(mean[j % C], lanes + j, lanes + width + j)
    _replicate(lanes + 2 * width, a, C, width, 0)
    _replicate(lanes + 3 * width, k, C, width, 0)
    _replicate(lanes + 4 * width, cc, C, width, 0)
    for b in prange(p.nb, schedule='static', num_threads=nt, use_threads_if=nt > 1):
        r0 = b * p.rb
        r1 = min(O, r0 + p.rb)
        nsr = (r1 - r0) // p.m
        off = r0 * C
        _dx_rows(dy + off, x + off, y + off if y != NULL else NULL, dx + off, nsr, width,
                 width, lanes, width)
        if r0 + nsr * p.m < r1:
            off = (r0 + nsr * p.m) * C
            _dx_rows(dy + off, x + off, y + off if y != NULL else NULL, dx + off,
                     r1 - r0 - nsr * p.m, C, C, lanes, width)
    free(lanes)
    return 0


cdef inline void _dx_rows(const floating *dy, const floating *x, const floating *y,
                          floating *dx, Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                          const floating *lanes, Py_ssize_t w) noexcept nogil:
    # lanes: [mhi | mlo | a | k | c], each w long
    if floating is float:
        fbn_bwd_dx_rows_float(dy, x, y, dx, nrows, stride, width, lanes, lanes + w,
                              lanes + 2 * w, lanes + 3 * w, lanes + 4 * w)
    else:
        fbn_bwd_dx_rows_double(dy, x, y, dx, nrows, stride, width, lanes, lanes + w,
                               lanes + 2 * w, lanes + 3 * w, lanes + 4 * w)


# --------------------------------------------------------------------------- Python entry points
# Arrays are canonical (outer, C, inner) C-contiguous views; per-channel arrays are float64.
# `weight`/`bias` may be None (gamma = 1, beta = 0); `y` may be None (no ReLU mask).

cdef inline double _invstd(double var, double eps) noexcept nogil:
    # A channel with var + eps == 0 (constant values, eps = 0) gets invstd = 0: x_hat and dx
    # are 0 there instead of NaN. NaN and inf propagate (they poison their channel only).
    cdef double v = var + eps
    if v == 0:
        return 0.0
    return 1.0 / sqrt(v)


def channel_stats(const floating[:, :, ::1] x, double[::1] mean, double[::1] m2,
                  int nthreads):
    """Per-channel mean and M2 = sum((x - mean)^2) of x (OUT mean, m2)."""
    cdef int rc
    if x.shape[0] * x.shape[2] == 0:
        mean[:] = 0
        m2[:] = 0
        return
    with nogil:
        rc = _stats(&x[0, 0, 0], x.shape[0], x.shape[1], x.shape[2], &mean[0], &m2[0],
                    nthreads)
    if rc:
        raise MemoryError("fastbn: out of memory for the partial statistics")


def forward_train(const floating[:, :, ::1] x, floating[:, :, ::1] y,
                  const double[::1] weight, const double[::1] bias, double eps, bint relu,
                  double[::1] mean, double[::1] var, double[::1] invstd, int nthreads):
    """Training forward: batch statistics, then y = (x - mean) * invstd * weight + bias.

    IN x, weight, bias; OUT y (may be x itself), mean, var (biased), invstd.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2], c
    cdef double n = <double>(O * I)
    cdef int rc = 0
    cdef double *buf
    cdef const double *w = &weight[0] if weight is not None else NULL
    cdef const double *bb = &bias[0] if bias is not None else NULL
    with nogil:
        buf = <double *> malloc(2 * C * sizeof(double))
        if buf == NULL:
            rc = -1
        else:
            rc = _stats(&x[0, 0, 0], O, C, I, &mean[0], &var[0], nthreads)
        if rc == 0:
            for c in range(C):
                var[c] = var[c] / n
                invstd[c] = _invstd(var[c], eps)
                buf[c] = invstd[c] * (w[c] if w != NULL else 1.0)
                buf[C + c] = bb[c] if bb != NULL else 0.0
            rc = _normalize(&x[0, 0, 0], &y[0, 0, 0], O, C, I, &mean[0], buf, buf + C, relu,
                            nthreads)
        free(buf)
    if rc:
        raise MemoryError("fastbn: out of memory for kernel workspace")


def normalize(const floating[:, :, ::1] x, floating[:, :, ::1] y, const double[::1] mean,
              const double[::1] invstd, const double[::1] weight, const double[::1] bias,
              bint relu, int nthreads):
    """y = (x - mean) * invstd * weight + bias (then ReLU), for given statistics.

    IN x, mean, invstd, weight, bias; OUT y (may be x itself).
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2], c
    cdef int rc = 0
    cdef double *buf
    cdef const double *w = &weight[0] if weight is not None else NULL
    cdef const double *bb = &bias[0] if bias is not None else NULL
    if O * I == 0:
        return
    with nogil:
        buf = <double *> malloc(2 * C * sizeof(double))
        if buf == NULL:
            rc = -1
        else:
            for c in range(C):
                buf[c] = invstd[c] * (w[c] if w != NULL else 1.0)
                buf[C + c] = bb[c] if bb != NULL else 0.0
            rc = _normalize(&x[0, 0, 0], &y[0, 0, 0], O, C, I, &mean[0], buf, buf + C, relu,
                            nthreads)
        free(buf)
    if rc:
        raise MemoryError("fastbn: out of memory for kernel workspace")


def backward_sums(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                  const floating[:, :, ::1] y, const double[::1] mean, double[::1] sum_dy,
                  double[::1] sum_dy_xmu, int nthreads):
    """Per channel: sum(g) and sum(g * (x - mean)), g = dy masked by y > 0 when y is given.

    IN dy, x, y (or None), mean; OUT sum_dy, sum_dy_xmu.
    """
    cdef int rc
    cdef const floating *yp
    if x.shape[0] * x.shape[2] == 0:
        sum_dy[:] = 0
        sum_dy_xmu[:] = 0
        return
    yp = &y[0, 0, 0] if y is not None else NULL
    with nogil:
        rc = _bwd_sums_all(&dy[0, 0, 0], &x[0, 0, 0], yp, x.shape[0], x.shape[1], x.shape[2],
                           &mean[0], &sum_dy[0], &sum_dy_xmu[0], nthreads)
    if rc:
        raise MemoryError("fastbn: out of memory for the partial sums")


def backward_dx(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
                const floating[:, :, ::1] y, floating[:, :, ::1] dx, const double[::1] mean,
                const double[::1] invstd, const double[::1] weight, const double[::1] sum_dy,
                const double[::1] sum_dy_xmu, double count, bint training, int nthreads):
    """dx of batch norm from the per-channel sums of backward_sums over `count` values.

    training: dx = a*(g - sum_dy/count - x_hat*invstd*sum_dy_xmu/count), a = weight*invstd;
    inference (statistics were constants): dx = a*g.
    IN dy, x, y (or None), mean, invstd, weight (or None), sums; OUT dx (may be dy itself).
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2], c
    cdef int rc = 0
    cdef double *buf
    cdef double a
    cdef const double *w = &weight[0] if weight is not None else NULL
    cdef const floating *yp
    if O * I == 0:
        return
    yp = &y[0, 0, 0] if y is not None else NULL
    with nogil:
        buf = <double *> malloc(3 * C * sizeof(double))
        if buf == NULL:
            rc = -1
        else:
            for c in range(C):
                a = invstd[c] * (w[c] if w != NULL else 1.0)
                buf[c] = a
                if training and count > 0:
                    buf[C + c] = a * invstd[c] * invstd[c] * sum_dy_xmu[c] / count
                    buf[2 * C + c] = -a * sum_dy[c] / count
                else:
                    buf[C + c] = 0
                    buf[2 * C + c] = 0
            rc = _bwd_dx(&dy[0, 0, 0], &x[0, 0, 0], yp, &dx[0, 0, 0], O, C, I, &mean[0], buf,
                         buf + C, buf + 2 * C, nthreads)
        free(buf)
    if rc:
        raise MemoryError("fastbn: out of memory for kernel workspace")


def stream_copy(const unsigned char[::1] src, unsigned char[::1] dst, int nthreads):
    """dst[:] = src[:] with the kernels' threads: the bandwidth probe of `fastbn bench`.

    IN src; OUT dst (same length). Fixed 1 MiB pieces, so each thread streams a contiguous run.
    """
    cdef Py_ssize_t n = src.shape[0]
    cdef Py_ssize_t npieces = (n + (1 << 20) - 1) >> 20
    cdef Py_ssize_t t, off
    cdef int nt = _nthreads(nthreads, n // 4)
    if n == 0:
        return
    with nogil:
        for t in prange(npieces, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            off = t << 20
            memcpy(&dst[off], &src[off], min(<Py_ssize_t>(1 << 20), n - off))
