# cython: language_level=3
"""Batch-norm kernels on canonical (outer, C, inner) C-contiguous arrays.

Nothing here knows about axes: fastbn.functional checks every argument, allocates the outputs
and reshapes to the canonical view before calling in (the fast paths at the end take only
arguments that need no checking beyond their types). The entry points still refuse, with
TypeError or ValueError, any array they could not read safely (see "Python entry points"), so
no argument can crash the process. The kernels release the GIL.

Two layouts, chosen by the caller's view:
  inner > 1  "NCL": each channel is `outer` contiguous runs of `inner` values.
  inner == 1 "NLC" (channels-last, and 2-D (N, C)): rows of C values, one lane per channel.
  Short segments are read as rows too: rows of C * inner values, `inner` lanes per channel
  (segments of a few values, 7 for axis=(1, 2) on (16, 512, 7, 7), cost a scalar tail each and
  ran at a tenth of the speed of 7x7 maps; as rows they are vector lanes). The statistics do so
  up to SHORT_BYTES-byte segments (7x7 float32 maps included), the other passes below 64 bytes
  (see _rep).

Determinism: every reduction is cut into blocks whose boundaries depend only on the shape (never
on the thread count), each block is reduced by one thread into its own slots, and the slots are
added in a fixed order. The results are therefore bitwise identical for any number of threads
and from run to run.

Statistics: sums of x - k and (x - k)^2 with k the median of each channel's first, middle and
last value (one shift for all blocks, so blocks merge by addition), returned as (mean, M2) with
M2 = sum((x - mean)^2), the form fastbn.distributed merges across processes (Chan et al.).
A channel whose one-pass result cannot be vouched for (non-finite sums, a shift more than 4
standard deviations from the mean, a variance small enough for squares to have underflowed)
is recomputed in double by a careful, scaled, compensated three-pass method (_stats), so
neither the order of the values, nor huge or subnormal scales, cost accuracy.
"""
cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.float cimport FLT_MAX
from libc.math cimport INFINITY, NAN, fabs, frexp, ldexp, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

ctypedef fused floating:
    float
    double

cnp.import_array()

cdef extern from "_simd.h" nogil:
    int fbn_openmp_enabled()
    int fbn_omp_max_threads()
    # ISA levels (_simd_dispatch.h): indices 0 .. fbn_nlevels() - 1, lowest first
    int fbn_nlevels()
    const char *fbn_level_name(int i)
    int fbn_current_level()
    int fbn_best_level()
    int fbn_set_level(int i)
    int fbn_level_index(const char *name)
    unsigned long long fbn_stream_read(const unsigned char *p, Py_ssize_t n)
    # 2-byte float conversions (_half_loops.h): dst[i] = src[i], i < n
    void fbn_f16_to_f32(const unsigned short *src, float *dst, Py_ssize_t n)
    void fbn_f32_to_f16(const float *src, unsigned short *dst, Py_ssize_t n)
    void fbn_bf16_to_f32(const unsigned short *src, float *dst, Py_ssize_t n)
    void fbn_f32_to_bf16(const float *src, unsigned short *dst, Py_ssize_t n)
    void fbn_sums_float(const float *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t c0,
                        Py_ssize_t C, const float *k, int by_channel, double *s1, double *s2)
    void fbn_sums_double(const double *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t c0,
                         Py_ssize_t C, const double *k, int by_channel, double *s1, double *s2)
    void fbn_sums_rows_float(const float *x, Py_ssize_t nrows, Py_ssize_t stride,
                             Py_ssize_t width, const float *k, double *a1, double *a2)
    void fbn_sums_rows_double(const double *x, Py_ssize_t nrows, Py_ssize_t stride,
                              Py_ssize_t width, const double *k, double *a1, double *a2)
    void fbn_norm_float(const float *x, float *y, Py_ssize_t nseg, Py_ssize_t len,
                        Py_ssize_t c0, Py_ssize_t C, const float *mhi, const float *a,
                        const float *b, int relu)
    void fbn_norm_double(const double *x, double *y, Py_ssize_t nseg, Py_ssize_t len,
                         Py_ssize_t c0, Py_ssize_t C, const double *mhi, const double *a,
                         const double *b, int relu)
    void fbn_norm_rows_float(const float *x, float *y, Py_ssize_t nrows, Py_ssize_t stride,
                             Py_ssize_t width, const float *mhi, const float *a, const float *b,
                             int relu)
    void fbn_norm_rows_double(const double *x, double *y, Py_ssize_t nrows, Py_ssize_t stride,
                              Py_ssize_t width, const double *mhi, const double *a,
                              const double *b, int relu)
    void fbn_bwd_sums_float(const float *dy, const float *x, const float *y, Py_ssize_t nseg,
                            Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C, const float *mhi,
                            const float *mlo, int by_channel, double *s1, double *s2)
    void fbn_bwd_sums_double(const double *dy, const double *x, const double *y,
                             Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C,
                             const double *mhi, const double *mlo, int by_channel, double *s1,
                             double *s2)
    void fbn_bwd_sums_rows_float(const float *dy, const float *x, const float *y,
                                 Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                 const float *mhi, const float *mlo, double *a1, double *a2)
    void fbn_bwd_sums_rows_double(const double *dy, const double *x, const double *y,
                                  Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                  const double *mhi, const double *mlo, double *a1, double *a2)
    void fbn_bwd_dx_float(const float *dy, const float *x, const float *y, float *dx,
                          Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C,
                          const float *mhi, const float *a, const float *k, const float *c)
    void fbn_bwd_dx_double(const double *dy, const double *x, const double *y, double *dx,
                           Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C,
                           const double *mhi, const double *a, const double *k,
                           const double *c)
    void fbn_bwd_dx_rows_float(const float *dy, const float *x, const float *y, float *dx,
                               Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                               const float *mhi, const float *a, const float *k, const float *c)
    void fbn_bwd_dx_rows_double(const double *dy, const double *x, const double *y, double *dx,
                                Py_ssize_t nrows, Py_ssize_t stride, Py_ssize_t width,
                                const double *mhi, const double *a, const double *k,
                                const double *c)

# Partition constants. They fix the order of every floating-point reduction, so changing one
# changes results in the last bits (but never their thread-count invariance).
cdef enum:
    CHUNK = 32768       # values of one elementwise NCL task (whole segments, or a piece)
    RUN = 65536         # values of one NCL reduction task (at least 64 * C, see _reduction)
    CL_CHUNK = 65536    # values of one channels-last block (rows x channel tile)
    TILE = 1024         # channels of one channels-last tile; lanes live in L1 (3 x 8 KB)
    MIN_LANES = 64      # below this many channels, super-rows are a multiple of 16 lanes
    PAR_MIN = 32768     # below this many values a parallel region costs more than it saves
    MERGE = 256         # channels of one merge task
    MERGE_PAR_MIN = 32768  # slots below which the merge runs on one thread
    SHORT_INNER = 56    # inner extents up to this are read as rows of channels * inner lanes
    SHORT_BYTES = 224   # ... by the statistics, when a segment is at most this many bytes
    HALF_CHUNK = 65536  # values of one conversion task (half_to_float, float_to_half)


# The inner extent up to which NCL arrays are read as rows (SHORT_INNER; 1 turns it off, for
# tests and measurements that compare the two ways, see _set_short_inner). Measured on the
# Zen 5 (x86-64-v4, 1 thread, (16, 3584, I)): as rows, statistics are 7-30x faster for I = 2..15,
# normalize 1.1-3x, backward 1.5-4x; at I = 16 (one AVX-512 register of float) the segments
# are faster for normalize (1.2x) and backward (1.4x), but not for the statistics: as rows they
# take 0.6-0.7x the segments' time up to 160-byte segments (float32 I = 16..40, float64 up to
# 24) and 0.7-0.95x at 7x7 maps (I = 49: ResNet's last stage, every level, 1 and 2 threads);
# from 256 bytes on the segments win (float32 I = 64: rows 1.24x). Hence SHORT_BYTES.
cdef Py_ssize_t _short_inner = SHORT_INNER


def _set_short_inner(Py_ssize_t n):
    """Read NCL arrays with inner <= n as rows from now on (n <= 1: only inner == 1, the
    channels-last layout); returns the previous limit. For tests and measurements; call it
    while no kernel runs."""
    global _short_inner
    prev = _short_inner
    _short_inner = max(<Py_ssize_t>0, n)
    return prev


# --------------------------------------------------------------------------- ISA levels

_ALL_LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")


def cpu_levels():
    """The ISA levels of the kernels this CPU can run, lowest first (["baseline"] on builds
    that compile one level: non-x86-64, other compilers, -march=native)."""
    return [fbn_level_name(i).decode() for i in range(fbn_best_level() + 1)]


def cpu_level():
    """The name of the ISA level the kernels run at (see set_cpu_level)."""
    return fbn_level_name(fbn_current_level()).decode()


def set_cpu_level(name):
    """Run the kernels at ISA level `name` (one of cpu_levels()) in this process from now on;
    returns the previous level's name. Results may differ between levels in the last bits
    (vector width, FMA contraction), never between thread counts at one level. Call it while no
    kernel runs on another thread. ValueError for an unknown level or one this CPU cannot run."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_level: name must be a str, got {type(name).__name__}")
    i = fbn_level_index(name.encode("utf-8", "replace"))
    if i < 0:
        raise ValueError(f"set_cpu_level: unknown CPU level {name!r} "
                         f"(levels of this build: {', '.join(_build_levels())})")
    prev = cpu_level()
    if fbn_set_level(i) != 0:
        raise ValueError(f"set_cpu_level: CPU level {name!r} is not supported by this CPU "
                         f"(it runs: {', '.join(cpu_levels())})")
    return prev


def _build_levels():
    return [fbn_level_name(i).decode() for i in range(fbn_nlevels())]


def _init_cpu_level(request):
    """At import: the best level this CPU runs, capped by FASTBN_CPU_LEVEL (`request`). An
    unknown value, or a level this CPU (or build) lacks, warns and runs the best level not above
    the request."""
    import warnings
    fbn_set_level(fbn_best_level())
    request = (request or "").strip()
    if not request:
        return
    runs = cpu_levels()
    if request not in _ALL_LEVELS:
        warnings.warn(f"FASTBN_CPU_LEVEL={request!r} is not a CPU level (one of "
                      f"{', '.join(_ALL_LEVELS)}); using {runs[len(runs) - 1]!r}", RuntimeWarning,
                      stacklevel=2)
        return
    rank = _ALL_LEVELS.index(request)
    below = [n for n in runs if _ALL_LEVELS.index(n) <= rank]
    pick = below[len(below) - 1]
    fbn_set_level(fbn_level_index(pick.encode()))
    if pick != request:
        warnings.warn(f"FASTBN_CPU_LEVEL={request!r}: this CPU (or build) does not run that "
                      f"level; using {pick!r}", RuntimeWarning, stacklevel=2)


import os as _os
_init_cpu_level(_os.environ.get("FASTBN_CPU_LEVEL"))
del _os


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(fbn_openmp_enabled())


def omp_max_threads():
    """OpenMP's current default thread count (OMP_NUM_THREADS, threadpoolctl limits)."""
    return fbn_omp_max_threads()


# --------------------------------------------------------------------------- partitions

cdef struct Rows:
    # Channels-last partition of an (R, C) array into blocks of rows x channel tiles, in
    # lanes: a row is C lanes, rep consecutive lanes per channel (rep = 1 for channels-last;
    # rep = inner for the short-segment NCL arrays read as rows, see SHORT_INNER).
    Py_ssize_t R, C     # rows, lanes per row (channels * rep)
    Py_ssize_t rep      # lanes per channel
    Py_ssize_t m        # rows per super-row (C < TILE), else 1
    Py_ssize_t tile     # lanes per tile (C when C < TILE), a multiple of rep
    Py_ssize_t ntiles
    Py_ssize_t rb       # rows per block, a multiple of m
    Py_ssize_t nb       # row blocks


cdef inline Py_ssize_t _gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef Rows _rows_partition(Py_ssize_t R, Py_ssize_t C, Py_ssize_t rep) noexcept nogil:
    # C channels of rep lanes each (see Rows)
    cdef Rows p
    cdef Py_ssize_t m0 = 1
    C = C * rep
    p.R = R
    p.C = C
    p.rep = rep
    if C < TILE:
        # m consecutive rows form one contiguous super-row of m*C lanes (lane j: lane j % C
        # of a row), as close to TILE lanes as fits. Rows of a few channels are too short to
        # vectorise (m*C is then also a multiple of 16), and the multi-row reductions read
        # FBN_ROWS rows side by side: streams of 4 KB run from L3 at ~1.5x the speed of the
        # 1 KB rows of C = 256.
        if C < MIN_LANES:
            m0 = 16 // _gcd(C, 16)
        p.m = max(m0, (TILE // C) // m0 * m0)
        p.tile = C
    else:
        p.m = 1
        p.tile = (TILE // rep) * rep  # whole channels
    p.ntiles = (C + p.tile - 1) // p.tile
    p.rb = (CL_CHUNK // (p.m * p.tile)) * p.m
    if p.rb < p.m:
        p.rb = p.m
    p.nb = (R + p.rb - 1) // p.rb if R > 0 else 0
    return p


cdef struct Fin:
    # The statistics of a rows partition with one row block (_stats): each task owns its
    # channels, so it computes their shift, sums them straight into r1/r2 (no slots, no merge)
    # and turns the sums into mean, M2 (and var) there, in parallel and while they are in cache.
    double *kd             # OUT per-channel shift (double)
    double *bad            # OUT per-channel 1.0 where the one-pass result is not trusted
    double *var            # OUT or NULL
    double n, vmin, kmin


cdef struct Ctx:
    # Everything a task needs; one per kernel call, shared read-only by the threads (tasks
    # write only to their own slots of `p1`/`p2`/`r1`/`r2` and their own part of `out`).
    bint f32               # float32 data, else float64
    const void *x          # IN  (outer, C, inner) values
    const void *dy         # IN  gradient (backward) or NULL
    const void *y          # IN  ReLU mask (forward output) or NULL
    void *out              # OUT y or dx
    Py_ssize_t outer, channels, inner   # the canonical shape
    Py_ssize_t rep         # 0: NCL runs of segments; else x is read as rows of channels * rep
                           # lanes, rep = 1 (channels-last) or inner (short segments, _ctx)
    Rows p                 # the rows partition (rep > 0)
    Py_ssize_t spr         # NCL runs (_ncl_runs): segments per run, or 0 for pieces of one
    Py_ssize_t piece       # NCL runs: values per piece (spr == 0)
    Py_ssize_t ppi         # NCL runs: pieces per segment (1 when spr > 0)
    bint by_channel        # NCL reduction: every run spans all channels, one slot per channel
    Py_ssize_t G, P        # reduction slots are [G][C][P]; see _merge_task
    const double *mean     # per channel
    const double *a        # per channel: scale (normalize, dx)
    const double *k        # per channel: x coefficient (dx) or shift (normalize)
    const double *c        # per channel: constant (dx)
    const void *lanes      # per-channel parameters in the working precision, replicated over
                           # the lane width for channels-last (see _make_lanes)
    bint relu
    double *p1             # OUT partial sums, one slot per (block, channel)
    double *p2
    double *r1             # OUT per-channel results
    double *r2
    const Fin *fin         # one row block, statistics: what each task finishes (_stats), or NULL
    const unsigned char *mask  # IN  masked statistics: a byte per (outer, inner) position


ctypedef void (*task_fn)(const Ctx *ctx, Py_ssize_t t) noexcept nogil


cdef void _run(task_fn task, const Ctx *ctx, Py_ssize_t ntasks, int nthreads) noexcept nogil:
    """Run task(ctx, 0..ntasks-1), statically split over the threads.

    The only parallel construct of the module. With one thread it is a plain loop: an OpenMP
    region, even if(0), costs ~0.3 us, which mattered for small inputs.
    """
    cdef Py_ssize_t t
    if nthreads > 1 and ntasks > 1:
        for t in prange(ntasks, schedule='static', num_threads=nthreads):
            task(ctx, t)
    else:
        for t in range(ntasks):
            task(ctx, t)


cdef inline int _nthreads(int nthreads, Py_ssize_t work) noexcept nogil:
    return nthreads if work >= PAR_MIN and nthreads > 1 else 1


cdef struct Block:
    Py_ssize_t off      # offset of the block's first value
    Py_ssize_t nseg     # segments (runs of `len` values, C * inner apart)
    Py_ssize_t len


cdef Py_ssize_t _ncl_runs(Ctx *ctx, Py_ssize_t run) noexcept nogil:
    """Cut ctx's NCL array into runs in memory order: spr whole segments each when a segment
    fits in `run` values, else (spr = 0) pieces of `run` values of one segment, ppi of them.
    Returns the number of runs; _ncl_run gives run t."""
    cdef Py_ssize_t S = ctx.outer * ctx.channels, I = ctx.inner
    ctx.piece = run
    if I > run:
        ctx.spr = 0
        ctx.ppi = (I + run - 1) // run
        return S * ctx.ppi
    ctx.spr = run // I
    ctx.ppi = 1
    return (S + ctx.spr - 1) // ctx.spr


cdef inline Block _ncl_run(const Ctx *ctx, Py_ssize_t t, Py_ssize_t *s0) noexcept nogil:
    # Run t of _ncl_runs: its values (nseg contiguous segments, or a piece of one) and first
    # segment s0 (of channel s0 % C).
    cdef Block b
    cdef Py_ssize_t I = ctx.inner
    if ctx.spr == 0:
        s0[0] = t // ctx.ppi
        b.nseg = 1
        b.len = min(ctx.piece, I - (t % ctx.ppi) * ctx.piece)
        b.off = s0[0] * I + (t % ctx.ppi) * ctx.piece
    else:
        s0[0] = t * ctx.spr
        b.nseg = min(ctx.spr, ctx.outer * ctx.channels - s0[0])
        b.len = I
        b.off = s0[0] * I
    return b


# --------------------------------------------------------------------------- reductions

cdef Py_ssize_t _reduction(Ctx *ctx) noexcept nogil:
    """Set up the partition of a per-channel reduction over ctx's array; returns its tasks.

    Each task adds its values into its own slots (two doubles each), laid out [G][C][P]: channel
    c's sum is that of its G*P slots in this order (_merge_task), whatever the thread count.
    Channels-last: blocks of rows x a channel tile, a slot per (row block, channel). NCL: runs
    of whole segments in memory order, a slot per segment, or per channel when every run
    spans all channels; or pieces of one segment when a segment is longer than a run.
    """
    cdef Py_ssize_t O = ctx.outer, C = ctx.channels, I = ctx.inner, run, ntasks
    if ctx.rep > 0:
        ctx.p = _rows_partition(O, C, ctx.rep)
        ctx.G = ctx.p.nb
        ctx.P = 1
        return ctx.p.nb * ctx.p.ntiles
    # Runs of at least 64 * C values keep the slots of by-channel runs under 1/16 of x.
    # Inputs under 32 runs get half-size runs: 6-7 runs split 4:3 over two threads, 13 split
    # 7:6 ((16, 512, 7, 7), 2 threads: statistics 72 -> 64 us).
    run = max(<Py_ssize_t>RUN if O * C * I >= 32 * RUN else RUN // 2, 64 * C)
    ntasks = _ncl_runs(ctx, run)
    ctx.by_channel = ctx.spr >= C  # (spr = 0 for pieces: a slot per piece)
    ctx.G = ntasks if ctx.by_channel else O
    ctx.P = ctx.ppi
    return ntasks


cdef inline Block _reduction_run(const Ctx *ctx, Py_ssize_t t, Py_ssize_t *c0,
                                 Py_ssize_t *slot, Py_ssize_t *nslots) noexcept nogil:
    # NCL task t (see _reduction): its values, first channel, first slot and number of slots.
    cdef Py_ssize_t s0
    cdef Block b = _ncl_run(ctx, t, &s0)
    if ctx.by_channel:
        slot[0] = t * ctx.channels
        nslots[0] = ctx.channels
    else:  # a slot per segment, or per piece (slot t = (o*C + c) * ppi + piece)
        slot[0] = t if ctx.spr == 0 else s0
        nslots[0] = b.nseg
    c0[0] = s0 % ctx.channels
    return b


cdef void _merge_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Channels [t*MERGE, (t+1)*MERGE): r1[c], r2[c] = the sums of c's slots, in slot order.
    # Slot rows are walked in memory order, the channels side by side: one channel at a time
    # read G slots C doubles apart, 8 KiB for C = 1024, which all fell in one L1 set (a miss per
    # slot, ~0.7 ms a call on (4096, 1024)).
    cdef Py_ssize_t g, q, c, base, C = ctx.channels, P = ctx.P
    cdef Py_ssize_t c0 = t * MERGE, c1 = min(C, c0 + MERGE)
    if ctx.G * P == 1:  # one slot per channel (a few wide rows)
        memcpy(ctx.r1 + c0, ctx.p1 + c0, (c1 - c0) * sizeof(double))
        memcpy(ctx.r2 + c0, ctx.p2 + c0, (c1 - c0) * sizeof(double))
        return
    for c in range(c0, c1):
        ctx.r1[c] = 0
        ctx.r2[c] = 0
    for g in range(ctx.G):
        for q in range(P):
            for c in range(c0, c1):
                base = (g * C + c) * P + q
                ctx.r1[c] += ctx.p1[base]
                ctx.r2[c] += ctx.p2[base]


cdef void _rows_reduce_tile(const Ctx *ctx, Py_ssize_t b, Py_ssize_t c0, Py_ssize_t cw,
                            const double *a1, const double *a2) noexcept nogil:
    # Fold the m*cw lanes of a tile (lane j: lane c0 + j % cw of a row, channel (c0 + j % cw)
    # // rep) into its slots: each channel's lanes in the order (super-row row, lane).
    cdef Py_ssize_t c, j, i, rep = ctx.p.rep, width = ctx.p.m * cw
    cdef double *o1
    cdef double *o2
    if ctx.p1 == NULL:  # one row block: straight into the results (_stats, _bwd_sums)
        o1 = ctx.r1 + c0 // rep
        o2 = ctx.r2 + c0 // rep
    else:
        o1 = ctx.p1 + b * ctx.channels + c0 // rep
        o2 = ctx.p2 + b * ctx.channels + c0 // rep
    cdef double s1, s2
    if width == cw and rep == 1:  # (wide rows: a lane per channel, nothing to fold)
        memcpy(o1, a1, cw * sizeof(double))
        memcpy(o2, a2, cw * sizeof(double))
        return
    for c in range(cw // rep):
        s1 = 0
        s2 = 0
        j = c * rep
        while j < width:
            for i in range(rep):
                s1 += a1[j + i]
                s2 += a2[j + i]
            j += cw
        o1[c] = s1
        o2[c] = s2


cdef int _reduce(Ctx *ctx, task_fn task, double *r1, double *r2, int nthreads) noexcept nogil:
    """Run a reduction (task over the partition of _reduction) and merge it into r1, r2 (C
    each). ctx.lanes must hold what the tasks read. Returns -1 when out of memory."""
    cdef Py_ssize_t ntasks = _reduction(ctx)
    cdef Py_ssize_t nslots = ctx.G * ctx.channels * ctx.P
    cdef int nt = _nthreads(nthreads, ctx.outer * ctx.channels * ctx.inner)
    ctx.p1 = <double *> malloc((2 * nslots + 1) * sizeof(double))
    if ctx.p1 == NULL:
        return -1
    ctx.p2 = ctx.p1 + nslots
    ctx.r1 = r1
    ctx.r2 = r2
    _run(task, ctx, ntasks, nt)
    # A small merge is cheaper than waking the threads for another parallel region.
    _run(_merge_task, ctx, (ctx.channels + MERGE - 1) // MERGE,
         nt if nslots >= MERGE_PAR_MIN else 1)
    free(ctx.p1)
    ctx.p1 = ctx.p2 = NULL
    return 0


# --------------------------------------------------------------------------- statistics

cdef void _ncl_stats(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: sums of x - k over a run; lanes = k, each channel's first value (C of them).
    cdef Py_ssize_t c0, o, n
    cdef Block blk = _reduction_run(ctx, t, &c0, &o, &n)
    memset(ctx.p1 + o, 0, n * sizeof(double))
    memset(ctx.p2 + o, 0, n * sizeof(double))
    if floating is float:
        fbn_sums_float(x + blk.off, blk.nseg, blk.len, c0, ctx.channels,
                       <const float *>ctx.lanes, ctx.by_channel, ctx.p1 + o, ctx.p2 + o)
    else:
        fbn_sums_double(x + blk.off, blk.nseg, blk.len, c0, ctx.channels,
                        <const double *>ctx.lanes, ctx.by_channel, ctx.p1 + o, ctx.p2 + o)


cdef void _rows_stats(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: rows [b*rb, (b+1)*rb) x channels [tl*tile, (tl+1)*tile); lanes = k over m*C.
    cdef double a1[TILE]
    cdef double a2[TILE]
    cdef const Rows *p = &ctx.p
    cdef const floating *k = <const floating *>ctx.lanes
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = (t % p.ntiles) * p.tile
    cdef Py_ssize_t cw = min(p.tile, p.C - c0)
    cdef Py_ssize_t width = p.m * cw
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t rl = r0 + nsr * p.m
    cdef Py_ssize_t ch0 = c0 // p.rep, nch = cw // p.rep, I = ctx.inner, r
    cdef const Fin *f = ctx.fin
    if f != NULL:  # this task's shift: lanes [c0, c0 + cw) (all m copies when m > 1)
        _med3_lanes(x + ch0 * I, <floating *>k + c0, f.kd + ch0, nch, I, p.rep,
                    ((p.R // 2) * ctx.channels) * I + I // 2,
                    ((p.R - 1) * ctx.channels) * I + I - 1)
        for r in range(1, p.m):
            memcpy(<floating *>k + r * p.C, k, p.C * sizeof(floating))
    memset(a1, 0, width * sizeof(double))
    memset(a2, 0, width * sizeof(double))
    # super-rows are contiguous (m > 1 only when the tile is the whole row)
    if floating is float:
        fbn_sums_rows_float(x + r0 * p.C + c0, nsr, p.m * p.C, width, k + c0, a1, a2)
        if rl < r1:
            fbn_sums_rows_float(x + rl * p.C + c0, r1 - rl, p.C, cw, k + c0, a1, a2)
    else:
        fbn_sums_rows_double(x + r0 * p.C + c0, nsr, p.m * p.C, width, k + c0, a1, a2)
        if rl < r1:
            fbn_sums_rows_double(x + rl * p.C + c0, r1 - rl, p.C, cw, k + c0, a1, a2)
    _rows_reduce_tile(ctx, b, c0, cw, a1, a2)
    if f != NULL:
        _stats_finish(f.kd + ch0, nch, f.n, f.vmin, f.kmin, ctx.r1 + ch0, ctx.r2 + ch0,
                      f.bad + ch0)
        if f.var != NULL:
            for r in range(ch0, ch0 + nch):
                f.var[r] = ctx.r2[r] / f.n


cdef void _stats_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.rep == 0:
        if ctx.f32:
            _ncl_stats(<const float *>ctx.x, ctx, t)
        else:
            _ncl_stats(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_stats(<const float *>ctx.x, ctx, t)
        else:
            _rows_stats(<const double *>ctx.x, ctx, t)


cdef inline floating _med3(floating a, floating b, floating c) noexcept nogil:
    # the median of three values (one of them; NaN may give any, the check in _stats catches it)
    # Each select a min or max of its own comparison (minss/maxss): with one shared compare
    # GCC emitted branches, which random data mispredicts half the time (perf: the pilot of a
    # 16 x 25088 channel_stats went from ~2 ns a channel to a fraction).
    cdef floating lo = a if a < b else b
    cdef floating hi = a if a > b else b
    hi = c if c < hi else hi
    return lo if lo > hi else hi


cdef void _med3_lanes(const floating *x, floating *k, double *kd, Py_ssize_t C, Py_ssize_t I,
                      Py_ssize_t rep, Py_ssize_t i1, Py_ssize_t i2) noexcept nogil:
    # k[c*rep .. c*rep + rep) = kd[c] = med3(x[c*I], x[i1 + c*I], x[i2 + c*I]); IN x; OUT k, kd
    cdef Py_ssize_t c, i
    cdef floating v
    if I == 1:  # channels-last: contiguous, vectorised
        for c in range(C):
            v = _med3(x[c], x[i1 + c], x[i2 + c])
            kd[c] = v
            k[c] = v
        return
    for c in range(C):
        v = _med3(x[c * I], x[i1 + c * I], x[i2 + c * I])
        kd[c] = v
        for i in range(rep):
            k[c * rep + i] = v


cdef void *_pilot_shift(const Ctx *ctx, Py_ssize_t m, Py_ssize_t rep, double *kd) noexcept nogil:
    """The shift k of the statistics in the working precision, replicated over m*C*rep lanes
    (lane j: channel (j % (C*rep)) // rep), and once per channel in kd (OUT, C doubles): per
    channel the median of its first, middle and last value in memory.

    Sums of x - k and (x - k)^2 lose nothing to a large mean when k is within a few standard
    deviations of the mean; one shift per channel (not per block) lets the blocks merge by
    plain addition. The median of three samples is immune to one outlier and to sorted data
    (the channel's first value, the shift before, was neither: a 1000-sigma first value put a
    float32 variance 2e-4 off). _stats checks the shift afterwards and falls back when it was
    bad anyway."""
    cdef Py_ssize_t c, r, C = ctx.channels, I = ctx.inner, O = ctx.outer, w = C * rep
    cdef Py_ssize_t i1 = ((O // 2) * C) * I + I // 2, i2 = ((O - 1) * C) * I + I - 1
    cdef size_t size = sizeof(float) if ctx.f32 else sizeof(double)
    cdef char *k = <char *> malloc(m * w * size + 1)
    if k == NULL:
        return NULL
    # a loop per dtype without branches inside
    if ctx.f32:
        _med3_lanes(<const float *>ctx.x, <float *>k, kd, C, I, rep, i1, i2)
    else:
        _med3_lanes(<const double *>ctx.x, <double *>k, kd, C, I, rep, i1, i2)
    for r in range(1, m):
        memcpy(k + r * w * size, k, w * size)
    return k


# The one-pass statistics are trusted for a channel only when, in double: its sums are finite,
# the shift is within 4 standard deviations of the mean ((mean - k)^2 <= 16 var: the float32
# error of sum((x - k)^2) - sum(x - k)^2 / n then stays ~1e-6 relative), and the variance is
# not so small that squares of x - k may have underflowed in the working precision (VMIN),
# unless the channel is exactly constant (no square at all: sums 0 with |k| >= KMIN, where a
# nonzero x - k has a square that does not round to 0). Any other channel is recomputed by
# _stats_careful.
DEF SHIFT_SIGMAS2 = 16.0
DEF VMIN_F32 = 7.888609052210118e-31    # 2^-100
DEF KMIN_F32 = 8.881784197001252e-16    # 2^-50
DEF VMIN_F64 = 1.1735238433585285e-271  # 2^-900
DEF KMIN_F64 = 3.4256688264323765e-136  # 2^-450
DEF CAREFUL_GROUP = 16                  # channels of one _stats_careful task


cdef struct Careful:
    # the channels _stats_careful recomputes (ascending) and where their results go
    const Py_ssize_t *idx
    Py_ssize_t nf
    double *mean
    double *m2
    double *var            # or NULL


cdef inline void _neumaier(double *s, double *comp, double v) noexcept nogil:
    cdef double t = s[0] + v
    if fabs(s[0]) >= fabs(v):
        comp[0] += (s[0] - t) + v
    else:
        comp[0] += (v - t) + s[0]
    s[0] = t


cdef inline double _value(const Ctx *ctx, Py_ssize_t i) noexcept nogil:
    if ctx.f32:
        return (<const float *>ctx.x)[i]
    return (<const double *>ctx.x)[i]


cdef void _careful_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    """Exact-as-practical statistics of flagged channels [t*G, (t+1)*G) of the Careful list
    (ctx.lanes), in double, each channel's values in memory order (segment by segment, rows of
    a channels-last array in order, never a column with a stride):
      pass 1: max |x|, min, max, and whether a value is NaN or inf;
      pass 2: the mean of x * s with s = 2^-e a power of two bringing max |x| near 1 (so that
              neither squares of float64 values overflow nor those of tiny values underflow),
              compensated (Neumaier);
      pass 3: sum(d) and sum(d^2), d = x * s - mean, compensated; M2 = sum(d^2) - sum(d)^2/n.
    A constant channel is exact after pass 1 (mean = its value, M2 = 0); one with NaN or inf
    gets mean = sum(x) / n (NaN or inf) and M2 = NaN. The result depends only on the channel's
    values and their order: never on the thread count or the grouping."""
    cdef const Careful *cf = <const Careful *>ctx.lanes
    cdef Py_ssize_t j0 = t * CAREFUL_GROUP, g = min(<Py_ssize_t>CAREFUL_GROUP, cf.nf - j0)
    cdef Py_ssize_t O = ctx.outer, C = ctx.channels, I = ctx.inner, o, i, j, base
    cdef double n = <double>(O * I), v, d
    cdef double amax[CAREFUL_GROUP]
    cdef double vmin[CAREFUL_GROUP]
    cdef double vmax[CAREFUL_GROUP]
    cdef double sc[CAREFUL_GROUP]
    cdef double s1[CAREFUL_GROUP]
    cdef double e1[CAREFUL_GROUP]
    cdef double s2[CAREFUL_GROUP]
    cdef double e2[CAREFUL_GROUP]
    cdef double mu[CAREFUL_GROUP]
    cdef int bad[CAREFUL_GROUP]
    cdef int state[CAREFUL_GROUP]   # 0: passes 2-3, 1: constant, 2: NaN/inf (plain sum)
    cdef int e
    cdef Py_ssize_t c
    for j in range(g):
        amax[j] = 0
        vmin[j] = INFINITY
        vmax[j] = -INFINITY
        bad[j] = 0
        s1[j] = e1[j] = s2[j] = e2[j] = 0
    for o in range(O):
        for j in range(g):
            base = (o * C + cf.idx[j0 + j]) * I
            for i in range(I):
                v = _value(ctx, base + i)
                if not (fabs(v) < INFINITY):  # NaN or inf
                    bad[j] = 1
                else:
                    if fabs(v) > amax[j]:
                        amax[j] = fabs(v)
                    if v < vmin[j]:
                        vmin[j] = v
                    if v > vmax[j]:
                        vmax[j] = v
    for j in range(g):
        if bad[j]:
            state[j] = 2
            sc[j] = 1
        elif vmin[j] == vmax[j]:
            state[j] = 1
        else:
            state[j] = 0
            frexp(amax[j], &e)
            sc[j] = ldexp(1.0, max(-1022, min(1023, -e)))
    for o in range(O):
        for j in range(g):
            if state[j] == 1:
                continue
            base = (o * C + cf.idx[j0 + j]) * I
            if state[j] == 2:
                for i in range(I):
                    s1[j] += _value(ctx, base + i)
            else:
                for i in range(I):
                    _neumaier(&s1[j], &e1[j], _value(ctx, base + i) * sc[j])
    for j in range(g):
        mu[j] = (s1[j] + e1[j]) / n
        s1[j] = e1[j] = 0
    for o in range(O):
        for j in range(g):
            if state[j] != 0:
                continue
            base = (o * C + cf.idx[j0 + j]) * I
            for i in range(I):
                d = _value(ctx, base + i) * sc[j] - mu[j]
                _neumaier(&s1[j], &e1[j], d)
                _neumaier(&s2[j], &e2[j], d * d)
    for j in range(g):
        c = cf.idx[j0 + j]
        if state[j] == 1:
            cf.mean[c] = vmin[j]
            cf.m2[c] = 0
            if cf.var != NULL:
                cf.var[c] = 0
        elif state[j] == 2:
            cf.mean[c] = mu[j]
            cf.m2[c] = NAN
            if cf.var != NULL:
                cf.var[c] = NAN
        else:
            v = s1[j] + e1[j]
            d = (s2[j] + e2[j]) - v * (v / n)
            if d < 0:
                d = 0
            cf.mean[c] = (mu[j] + v / n) / sc[j]
            cf.m2[c] = d / sc[j] / sc[j]
            if cf.var != NULL:
                cf.var[c] = (d / n) / sc[j] / sc[j]


cdef void _stats_finish(const double *shift, Py_ssize_t C, double n, double vmin, double kmin,
                        double *mean, double *m2, double *bad) noexcept nogil:
    # The shifted sums (INOUT mean, m2: sum(x - k), sum((x - k)^2) in, mean and M2 out) of C
    # channels whose shift is shift[c]; OUT bad[c] = 1 where the checks above fail. No
    # branch inside, so that it vectorises (the pilot and this loop, with branches, were ~40 %
    # of a 16 x 25088 channel_stats in perf).
    cdef Py_ssize_t c
    cdef double k, s1, s2, d, e, v, rn = 1.0 / n
    cdef bint ok
    # x * (1/n), not x / n: two divisions a channel bound the loop (~1 ns a channel, C = 25088:
    # ~30 % of a 16-row channel_stats in perf); the product is within an ulp of the quotient.
    for c in range(C):
        k = shift[c]
        s1 = mean[c]
        s2 = m2[c]
        d = s1 * rn
        mean[c] = k + d
        e = s2 - s1 * d
        e = 0 if e < 0 else e  # rounding when all values are (nearly) equal
        m2[c] = e
        v = e * rn
        # (NaN fails every comparison)
        ok = (fabs(s1) < INFINITY) & (fabs(s2) < INFINITY) & (d * d <= SHIFT_SIGMAS2 * v)
        ok = ok & ((v >= vmin) | ((s2 == 0) & (fabs(k) >= kmin)))
        bad[c] = 0.0 if ok else 1.0


cdef int _stats(Ctx *ctx, double *mean, double *m2, double *var, int nthreads) noexcept nogil:
    """Per-channel mean and M2 of ctx.x (outer * inner >= 1), and var = M2 / n unless var is
    NULL (computed so that it is finite whenever the variance is, even if M2 is not).

    One pass of shifted sums (see _pilot_shift) over the fixed partition; the channels whose
    result that pass cannot vouch for (the checks above) are recomputed by _careful_task.
    Returns -1 when out of memory."""
    cdef Py_ssize_t c, C = ctx.channels, nf = 0
    cdef double n = <double>(ctx.outer * ctx.inner)
    cdef double vmin = VMIN_F32 if ctx.f32 else VMIN_F64
    cdef double kmin = KMIN_F32 if ctx.f32 else KMIN_F64
    cdef int rc
    cdef void *shift
    cdef Py_ssize_t *idx
    cdef double *kd
    cdef Careful cf
    cdef Fin fin
    cdef Py_ssize_t rep
    cdef size_t size = sizeof(float) if ctx.f32 else sizeof(double)
    ctx.rep = _rep(ctx.inner, ctx.f32, True)
    rep = ctx.rep if ctx.rep > 0 else 1
    if ctx.rep > 0:
        ctx.p = _rows_partition(ctx.outer, C, ctx.rep)
    idx = <Py_ssize_t *>malloc(C * (sizeof(Py_ssize_t) + 2 * sizeof(double)) + 1)
    if idx == NULL:
        return -1
    kd = <double *>(idx + C)  # [idx | kd | bad]
    fin.kd = kd
    fin.bad = kd + C
    fin.var = var
    fin.n = n
    fin.vmin = vmin
    fin.kmin = kmin
    if ctx.rep > 0 and ctx.p.nb == 1:
        # a few rows (16 x 25088): the tasks do it all (Fin), nothing per channel stays serial
        shift = malloc(ctx.p.m * ctx.p.C * size + 1)
    else:
        shift = _pilot_shift(ctx, ctx.p.m if ctx.rep > 0 else 1, rep, kd)
    if shift == NULL:
        free(idx)
        return -1
    ctx.lanes = shift
    if ctx.rep > 0 and ctx.p.nb == 1:
        rc = 0
        ctx.fin = &fin
        ctx.r1 = mean
        ctx.r2 = m2
        _reduction(ctx)
        _run(_stats_task, ctx, ctx.p.ntiles, _nthreads(nthreads, ctx.outer * C * ctx.inner))
        ctx.fin = NULL
    else:
        rc = _reduce(ctx, _stats_task, mean, m2, nthreads)
        if rc == 0:
            _stats_finish(kd, C, n, vmin, kmin, mean, m2, fin.bad)
            if var != NULL:
                for c in range(C):
                    var[c] = m2[c] / n
    if rc == 0 and _any_nonzero(fin.bad, C):
        for c in range(C):  # (branch-free: idx[nf] is overwritten until a channel is bad)
            idx[nf] = c
            nf += <Py_ssize_t>fin.bad[c]
    ctx.lanes = NULL
    free(shift)
    if rc == 0 and nf > 0:
        cf.idx = idx
        cf.nf = nf
        cf.mean = mean
        cf.m2 = m2
        cf.var = var
        ctx.lanes = &cf
        _run(_careful_task, ctx, (nf + CAREFUL_GROUP - 1) // CAREFUL_GROUP,
             _nthreads(nthreads, nf * ctx.outer * ctx.inner))
        ctx.lanes = NULL
    free(idx)
    return rc


# --------------------------------------------------------------------------- elementwise

cdef void _ncl_norm(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a run of segments in memory order. lanes = [mhi | scale | shift], C each.
    cdef Py_ssize_t c0, C = ctx.channels
    cdef Block blk = _ncl_run(ctx, t, &c0)
    c0 = c0 % C  # the first segment's channel
    cdef const floating *L = <const floating *>ctx.lanes
    if floating is float:
        fbn_norm_float(x + blk.off, <float *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, L,
                       L + C, L + 2 * C, ctx.relu)
    else:
        fbn_norm_double(x + blk.off, <double *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, L,
                        L + C, L + 2 * C, ctx.relu)


cdef void _rows_norm(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: row block t // ntiles x lane tile t % ntiles (the whole super-row when m > 1).
    # lanes = [mhi | scale | shift], each m*C wide. Tiles give wide rows (C = 4096, 64
    # rows: a single row block) tasks for every thread, and keep the parameter rows in L1.
    cdef const Rows *p = &ctx.p
    cdef const floating *L = <const floating *>ctx.lanes
    cdef floating *y = <floating *>ctx.out
    cdef Py_ssize_t C = p.C, w = p.m * p.C
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t j = (t % p.ntiles) * p.tile
    cdef Py_ssize_t jw = min(p.m * p.tile, w - j)
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t rl = r0 + nsr * p.m
    cdef Py_ssize_t o = r0 * C + j
    if floating is float:
        fbn_norm_rows_float(x + o, y + o, nsr, w, jw, L + j, L + w + j, L + 2 * w + j,
                            ctx.relu)
        if rl < r1:  # rows that do not fill a super-row (m > 1, so a single tile)
            fbn_norm_rows_float(x + rl * C, y + rl * C, r1 - rl, C, C, L, L + w, L + 2 * w,
                                ctx.relu)
    else:
        fbn_norm_rows_double(x + o, y + o, nsr, w, jw, L + j, L + w + j, L + 2 * w + j,
                             ctx.relu)
        if rl < r1:
            fbn_norm_rows_double(x + rl * C, y + rl * C, r1 - rl, C, C, L, L + w, L + 2 * w,
                                 ctx.relu)


cdef void _norm_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.rep == 0:
        if ctx.f32:
            _ncl_norm(<const float *>ctx.x, ctx, t)
        else:
            _ncl_norm(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_norm(<const float *>ctx.x, ctx, t)
        else:
            _rows_norm(<const double *>ctx.x, ctx, t)


cdef void _spread(floating *v, Py_ssize_t C, Py_ssize_t rep) noexcept nogil:
    # v[c*rep .. c*rep + rep) = v[c] for c = C-1 .. 0 (in place: v holds C*rep values)
    cdef Py_ssize_t c, i
    cdef floating u
    c = C - 1
    while c >= 0:
        u = v[c]
        for i in range(rep):
            v[c * rep + i] = u
        c -= 1


cdef void _lanes_fill(const Ctx *ctx, floating *L, Py_ssize_t nparams, Py_ssize_t w,
                     Py_ssize_t rep) noexcept nogil:
    # The first C*rep lanes of each of the nparams rows of L (w lanes apart), see _make_lanes.
    # One loop per parameter row, branch-free inside: one loop for all rows with the nparams
    # and dtype tests inside did not vectorise (with the float32 range check, ~30 % of a
    # 16 x 25088 normalize in perf).
    cdef Py_ssize_t c, i, C = ctx.channels
    cdef const double *mean = ctx.mean
    cdef const double *a = ctx.a
    cdef const double *k = ctx.k
    cdef const double *cc = ctx.c
    cdef floating *L1 = L + w
    cdef floating *L2 = L + 2 * w
    cdef floating *L3 = L + 3 * w
    for c in range(C):
        L[c] = <floating>mean[c]
    if nparams == 2:
        for c in range(C):
            L1[c] = <floating>(mean[c] - <double>L[c])
    elif nparams == 3:
        for c in range(C):
            L1[c] = <floating>a[c]
            L2[c] = <floating>(k[c] - (mean[c] - <double>L[c]) * a[c])
    else:
        for c in range(C):
            L1[c] = <floating>a[c]
            L2[c] = <floating>k[c]
            L3[c] = <floating>(cc[c] + k[c] * (mean[c] - <double>L[c]))
    if rep > 1:  # spread in place, from the last channel down
        for i in range(nparams):
            _spread(L + i * w, C, rep)


cdef void *_make_lanes(const Ctx *ctx, Py_ssize_t nparams, Py_ssize_t m) noexcept nogil:
    """Per-channel parameters in the working precision, each row replicated to m*C*rep lanes
    (rows layout: lane j of a row is channel (j % (C*rep)) // rep, rep = max(ctx.rep, 1); m = 1
    and rep = 1: one value per channel, for the NCL runs); mhi is the mean rounded to that
    precision and mlo the rest (0 for float64):
      nparams 2: [mhi | mlo]                  backward sums: g * ((x - mhi) - mlo)
      nparams 3: [mhi | a | k - mlo*a]        normalise: (x - mhi) * a + k
      nparams 4: [mhi | a | k | c + k*mlo]    dx: a*g - k*(x - mhi) + c
    with a, k, c = ctx.a, ctx.k, ctx.c. The corrections are formed in double, rounded once."""
    cdef Py_ssize_t rep = ctx.rep if ctx.rep > 0 else 1
    cdef Py_ssize_t C = ctx.channels * rep, w = m * C, i, r
    cdef size_t size = sizeof(float) if ctx.f32 else sizeof(double)
    cdef char *lanes = <char *> malloc(nparams * w * size + 1)
    if lanes == NULL:
        return NULL
    if ctx.f32:
        _lanes_fill(ctx, <float *>lanes, nparams, w, rep)
    else:
        _lanes_fill(ctx, <double *>lanes, nparams, w, rep)
    # copies for the other m - 1 rows of a super-row (a modulo per lane cost ~10 ns/channel)
    for i in range(nparams):
        for r in range(1, m):
            memcpy(lanes + (i * w + r * C) * size, lanes + i * w * size, C * size)
    return lanes


cdef void _wide_norm(const Ctx *ctx, const Py_ssize_t *idx, Py_ssize_t nf, float *tmp,
                     bint store) noexcept nogil:
    # float32 channels idx[0..nf) whose parameters do not fit in float (see _normalize):
    # store = 0: tmp = (x - mean) * a + k (then ReLU) formed in double, rounded once;
    # store = 1: copy tmp into ctx.out. Segments in memory order.
    cdef Py_ssize_t O = ctx.outer, C = ctx.channels, I = ctx.inner, o, j, i, c, base, q = 0
    cdef const float *x = <const float *>ctx.x
    cdef float *y = <float *>ctx.out
    cdef double v
    for o in range(O):
        for j in range(nf):
            c = idx[j]
            base = (o * C + c) * I
            if store:
                memcpy(y + base, tmp + q, I * sizeof(float))
            else:
                for i in range(I):
                    v = (<double>x[base + i] - ctx.mean[c]) * ctx.a[c] + ctx.k[c]
                    if ctx.relu and not (v > 0):
                        v = 0
                    tmp[q + i] = <float>v
            q += I


cdef inline bint _wide(const Ctx *ctx, Py_ssize_t c) noexcept nogil:
    # float32: channel c's scale or shift is finite but beyond float's range (see _normalize)
    cdef double sa = fabs(ctx.a[c])
    cdef double lo = ctx.mean[c] - <double><float>ctx.mean[c]
    cdef double sb = fabs(ctx.k[c] - lo * ctx.a[c])
    return ((sa > FLT_MAX) & (sa < INFINITY)) | ((sb > FLT_MAX) & (sb < INFINITY))


cdef bint _any_nonzero(const double *f, Py_ssize_t n) noexcept nogil:
    # whether any of n doubles is not +0.0, as an OR of their bits (vectorises; a count of
    # flags does not)
    cdef const unsigned long long *u = <const unsigned long long *>f
    cdef unsigned long long acc = 0
    cdef Py_ssize_t j
    for j in range(n):
        acc |= u[j]
    return acc != 0


cdef bint _any_inf(const float *v, Py_ssize_t n) noexcept nogil:
    # Whether any of n floats is +-inf, in loops that vectorise: a float32 parameter lane is
    # inf when the channel's double is inf or NaN, or finite and _wide. (_wide channel by
    # channel before the lanes was scalar: ~30 % of a 16 x 25088 normalize in perf.)
    cdef float f[256]
    cdef const unsigned int *u = <const unsigned int *>f
    cdef unsigned int acc = 0
    cdef Py_ssize_t c0, j, m
    for c0 in range(0, n, 256):
        m = min(<Py_ssize_t>256, n - c0)
        for j in range(m):
            f[j] = 1.0 if fabs(v[c0 + j]) > FLT_MAX else 0.0
        for j in range(m):
            acc |= u[j]
        if acc:
            return True
    return False


cdef int _normalize(Ctx *ctx, int nthreads) noexcept nogil:
    """ctx.out = (x - mean) * a + k per channel (then ReLU). Returns -1 when out of memory.

    float32: a channel whose scale or shift is finite in double but beyond float's range
    (a = invstd ~ 1e40 for data of standard deviation 1e-40, subnormal in float) would come out
    inf or NaN from the float kernel; such channels are computed in double instead, into a
    buffer first (y may be x) and stored after the main pass."""
    cdef int nt = _nthreads(nthreads, ctx.outer * ctx.channels * ctx.inner)
    cdef void *lanes
    cdef Py_ssize_t ntasks, c, w, nf = 0
    cdef Py_ssize_t *idx = NULL
    cdef float *tmp = NULL
    ctx.rep = _rep(ctx.inner, ctx.f32, False)
    if ctx.rep == 0:
        lanes = _make_lanes(ctx, 3, 1)
        ntasks = _ncl_runs(ctx, CHUNK)
    else:
        ctx.p = _rows_partition(ctx.outer, ctx.channels, ctx.rep)
        lanes = _make_lanes(ctx, 3, ctx.p.m)
        ntasks = ctx.p.nb * ctx.p.ntiles
    if lanes == NULL:
        return -1
    w = ctx.p.m * ctx.p.C if ctx.rep > 0 else ctx.channels  # lanes of a parameter row
    if ctx.f32 and _any_inf(<const float *>lanes + w, 2 * w):  # (the scale and shift rows)
        for c in range(ctx.channels):
            nf += _wide(ctx, c)
        if nf > 0:
            idx = <Py_ssize_t *>malloc(nf * sizeof(Py_ssize_t))
            tmp = <float *>malloc(nf * ctx.outer * ctx.inner * sizeof(float) + 1)
            if idx == NULL or tmp == NULL:
                free(idx)
                free(tmp)
                free(lanes)
                return -1
            nf = 0
            for c in range(ctx.channels):
                if _wide(ctx, c):
                    idx[nf] = c
                    nf += 1
            _wide_norm(ctx, idx, nf, tmp, False)
    ctx.lanes = lanes
    _run(_norm_task, ctx, ntasks, nt)
    free(lanes)
    ctx.lanes = NULL
    if nf > 0:
        _wide_norm(ctx, idx, nf, tmp, True)
    free(idx)
    free(tmp)
    return 0


# --------------------------------------------------------------------------- backward

cdef void _ncl_bsums(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a run (see _reduction); lanes = [mhi | mlo], C each.
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef const floating *L = <const floating *>ctx.lanes
    cdef Py_ssize_t c0, o, n, C = ctx.channels
    cdef Block blk = _reduction_run(ctx, t, &c0, &o, &n)
    memset(ctx.p1 + o, 0, n * sizeof(double))
    memset(ctx.p2 + o, 0, n * sizeof(double))
    if floating is float:
        fbn_bwd_sums_float(dy + blk.off, x + blk.off, y + blk.off if y != NULL else NULL,
                           blk.nseg, blk.len, c0, C, L, L + C, ctx.by_channel, ctx.p1 + o,
                           ctx.p2 + o)
    else:
        fbn_bwd_sums_double(dy + blk.off, x + blk.off, y + blk.off if y != NULL else NULL,
                            blk.nseg, blk.len, c0, C, L, L + C, ctx.by_channel, ctx.p1 + o,
                            ctx.p2 + o)


cdef void _rows_bsums(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a block of rows x a channel tile (see _rows_stats); lanes = [mhi | mlo], m*C each.
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef double a1[TILE]
    cdef double a2[TILE]
    cdef const Rows *p = &ctx.p
    cdef const floating *mh = <const floating *>ctx.lanes
    cdef const floating *ml = mh + p.m * p.C
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = (t % p.ntiles) * p.tile
    cdef Py_ssize_t cw = min(p.tile, p.C - c0)
    cdef Py_ssize_t width = p.m * cw
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t rl = r0 + nsr * p.m
    cdef Py_ssize_t off = r0 * p.C + c0, offl = rl * p.C + c0
    memset(a1, 0, width * sizeof(double))
    memset(a2, 0, width * sizeof(double))
    if floating is float:
        fbn_bwd_sums_rows_float(dy + off, x + off, y + off if y != NULL else NULL, nsr,
                                p.m * p.C, width, mh + c0, ml + c0, a1, a2)
        if rl < r1:
            fbn_bwd_sums_rows_float(dy + offl, x + offl, y + offl if y != NULL else NULL,
                                    r1 - rl, p.C, cw, mh + c0, ml + c0, a1, a2)
    else:
        fbn_bwd_sums_rows_double(dy + off, x + off, y + off if y != NULL else NULL, nsr,
                                 p.m * p.C, width, mh + c0, ml + c0, a1, a2)
        if rl < r1:
            fbn_bwd_sums_rows_double(dy + offl, x + offl, y + offl if y != NULL else NULL,
                                     r1 - rl, p.C, cw, mh + c0, ml + c0, a1, a2)
    _rows_reduce_tile(ctx, b, c0, cw, a1, a2)


cdef void _bsums_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.rep == 0:
        if ctx.f32:
            _ncl_bsums(<const float *>ctx.x, ctx, t)
        else:
            _ncl_bsums(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_bsums(<const float *>ctx.x, ctx, t)
        else:
            _rows_bsums(<const double *>ctx.x, ctx, t)


cdef int _bwd_sums(Ctx *ctx, double *sum_dy, double *sum_dy_xmu, int nthreads) noexcept nogil:
    """Per channel: sum(g) and sum(g * (x - mean)), g = dy (masked by y > 0 if y)."""
    cdef void *lanes
    cdef int rc
    ctx.rep = _rep(ctx.inner, ctx.f32, False)
    if ctx.rep > 0:
        ctx.p = _rows_partition(ctx.outer, ctx.channels, ctx.rep)
    lanes = _make_lanes(ctx, 2, ctx.p.m if ctx.rep > 0 else 1)
    if lanes == NULL:
        return -1
    ctx.lanes = lanes
    if ctx.rep > 0 and ctx.p.nb == 1:  # a few rows: each tile's sums are final (no merge)
        rc = 0
        ctx.r1 = sum_dy
        ctx.r2 = sum_dy_xmu
        _reduction(ctx)
        _run(_bsums_task, ctx, ctx.p.ntiles,
             _nthreads(nthreads, ctx.outer * ctx.channels * ctx.inner))
    else:
        rc = _reduce(ctx, _bsums_task, sum_dy, sum_dy_xmu, nthreads)
    ctx.lanes = NULL
    free(lanes)
    return rc


cdef void _ncl_dx(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a run of segments in memory order. lanes = [mhi | a | k | c], C each.
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef Py_ssize_t c0, C = ctx.channels
    cdef Block blk = _ncl_run(ctx, t, &c0)
    c0 = c0 % C  # the first segment's channel
    cdef const floating *L = <const floating *>ctx.lanes
    if floating is float:
        fbn_bwd_dx_float(dy + blk.off, x + blk.off if x != NULL else NULL,
                         y + blk.off if y != NULL else NULL,
                         <float *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, L, L + C,
                         L + 2 * C, L + 3 * C)
    else:
        fbn_bwd_dx_double(dy + blk.off, x + blk.off if x != NULL else NULL,
                          y + blk.off if y != NULL else NULL,
                          <double *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, L, L + C,
                          L + 2 * C, L + 3 * C)


cdef void _rows_dx(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a row block x lane tile as in _rows_norm. lanes = [mhi | a | k | c].
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef floating *dx = <floating *>ctx.out
    cdef const Rows *p = &ctx.p
    cdef const floating *L = <const floating *>ctx.lanes
    cdef Py_ssize_t C = p.C, w = p.m * p.C
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t j = (t % p.ntiles) * p.tile
    cdef Py_ssize_t jw = min(p.m * p.tile, w - j)
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t nsr = (r1 - r0) // p.m
    cdef Py_ssize_t rl = r0 + nsr * p.m
    cdef Py_ssize_t o = r0 * C + j, ol = rl * C
    if floating is float:
        fbn_bwd_dx_rows_float(dy + o, x + o if x != NULL else NULL,
                              y + o if y != NULL else NULL, dx + o, nsr, w, jw,
                              L + j, L + w + j, L + 2 * w + j, L + 3 * w + j)
        if rl < r1:
            fbn_bwd_dx_rows_float(dy + ol, x + ol if x != NULL else NULL,
                                  y + ol if y != NULL else NULL, dx + ol,
                                  r1 - rl, C, C, L, L + w, L + 2 * w, L + 3 * w)
    else:
        fbn_bwd_dx_rows_double(dy + o, x + o if x != NULL else NULL,
                               y + o if y != NULL else NULL, dx + o, nsr, w, jw,
                               L + j, L + w + j, L + 2 * w + j, L + 3 * w + j)
        if rl < r1:
            fbn_bwd_dx_rows_double(dy + ol, x + ol if x != NULL else NULL,
                                   y + ol if y != NULL else NULL, dx + ol,
                                   r1 - rl, C, C, L, L + w, L + 2 * w, L + 3 * w)


cdef void _dx_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.rep == 0:
        if ctx.f32:
            _ncl_dx(<const float *>ctx.x, ctx, t)
        else:
            _ncl_dx(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_dx(<const float *>ctx.x, ctx, t)
        else:
            _rows_dx(<const double *>ctx.x, ctx, t)


cdef int _dx_pass(Ctx *ctx, task_fn task, Py_ssize_t rep, bint super_rows,
                  int nthreads) noexcept nogil:
    """Run a dx pass (task) over ctx's array read with ctx.rep = rep: NCL runs (rep 0) or the
    rows partition, with [mhi | a | k | c] lanes replicated over a super-row (super_rows) or
    C of each (a task walking one row at a time). Returns -1 when out of memory."""
    cdef int nt = _nthreads(nthreads, ctx.outer * ctx.channels * ctx.inner)
    cdef void *lanes
    cdef Py_ssize_t ntasks
    ctx.rep = rep
    if rep == 0:
        lanes = _make_lanes(ctx, 4, 1)
        ntasks = _ncl_runs(ctx, CHUNK)
    else:
        ctx.p = _rows_partition(ctx.outer, ctx.channels, rep)
        lanes = _make_lanes(ctx, 4, ctx.p.m if super_rows else 1)
        ntasks = ctx.p.nb * ctx.p.ntiles
    if lanes == NULL:
        return -1
    ctx.lanes = lanes
    _run(task, ctx, ntasks, nt)
    free(lanes)
    ctx.lanes = NULL
    return 0


cdef int _bwd_dx(Ctx *ctx, int nthreads) noexcept nogil:
    """ctx.out = a*g - k*(x - mean) + c per channel, g = dy (masked by y > 0 if y)."""
    return _dx_pass(ctx, _dx_task, _rep(ctx.inner, ctx.f32, False), True, nthreads)


# --------------------------------------------------------------------------- Python entry points
# fastbn.functional validates every argument and hands over C-contiguous arrays: x-shaped arrays
# hold outer * C * inner values of the canonical (outer, C, inner) view, per-channel arrays are
# C-contiguous float32 or float64 (_chan). The entry points take ndarrays and raw pointers rather
# than typed memoryviews because acquiring seven buffers and dispatching a fused `def` costs
# ~4 us, which dominated small calls.
# They still check every array (a few ns each) so that no argument can crash the process or
# be read as something it is not: a missing (None) or non-ndarray required array is a
# TypeError naming the parameter, and so is a wrong dtype; an array that is not C-contiguous,
# not in native byte order, misaligned, of the wrong size, or a read-only output is a
# ValueError, and so are negative extents. `weight`, `bias` and the backward's ReLU mask `y`
# may be None. C == 0 is a no-op; outer * inner == 0 gives zero sums where there are sums.

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

# The largest channel count an entry point accepts: keeps every per-channel buffer size
# (a few times C doubles) far from Py_ssize_t overflow.
cdef Py_ssize_t MAX_C = PY_SSIZE_T_MAX // 64


cdef Py_ssize_t _extent(Py_ssize_t O, Py_ssize_t C, Py_ssize_t I) except -1:
    """O * C * I after checking the extents: none negative, no overflow."""
    if O < 0 or C < 0 or I < 0:
        raise ValueError(f"fastbn kernels: O, C, I must be >= 0, got {O}, {C}, {I}")
    if C > MAX_C:
        raise ValueError(f"fastbn kernels: C = {C} is too large")
    if O == 0 or C == 0 or I == 0:
        return 0
    if O > PY_SSIZE_T_MAX // C or O * C > PY_SSIZE_T_MAX // I:
        raise ValueError(f"fastbn kernels: O * C * I overflows ({O}, {C}, {I})")
    return O * C * I


cdef inline int _clamp_threads(int nthreads) noexcept nogil:
    # Any int is accepted: <= 1 runs serially, and more than 1024 threads (which OpenMP would try
    # to create) is never useful. Results do not depend on the count.
    return 1 if nthreads < 1 else (1024 if nthreads > 1024 else nthreads)


cdef cnp.ndarray _array(object a, str name):
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"fastbn kernels: {name} must be an ndarray, got {type(a).__name__}")
    return <cnp.ndarray>a


cdef int _typenum(object x, str name) except -1:
    cdef int t = cnp.PyArray_TYPE(_array(x, name))
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"fastbn kernels: {name} must be float32 or float64, got {x.dtype}")
    return t


cdef void *_data(object a, int typenum, Py_ssize_t size, str name) except NULL:
    """Pointer to a C-contiguous, aligned, native-order array of `typenum` with `size` values."""
    cdef cnp.ndarray arr = _array(a, name)
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"fastbn kernels: {name} must be {cnp.PyArray_DescrFromType(typenum)}, "
                        f"got {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"fastbn kernels: {name} must be C-contiguous")
    if cnp.PyArray_ISBYTESWAPPED(arr):
        raise ValueError(f"fastbn kernels: {name} must be in native byte order")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"fastbn kernels: {name} must be aligned")
    if cnp.PyArray_SIZE(arr) != size:
        raise ValueError(f"fastbn kernels: {name} must have {size} values, got {arr.size}")
    return cnp.PyArray_DATA(arr)


cdef void *_out(object a, int typenum, Py_ssize_t size, str name) except NULL:
    cdef void *p = _data(a, typenum, size, name)
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        raise ValueError(f"fastbn kernels: {name} must be writable")
    return p


cdef const double *_chan(object a, Py_ssize_t C, str name, double *slot,
                         bint optional) except? NULL:
    """A per-channel array as float64: its own data, or float32 values converted into slot.

    Converting C values here costs nanoseconds; NumPy's astype costs ~0.4 us per array,
    which was a quarter of a small call. None gives NULL when optional, else a TypeError.
    """
    cdef const float *f
    cdef Py_ssize_t c
    if a is None:
        if optional:
            return NULL
        raise TypeError(f"fastbn kernels: {name} is required, got None")
    if cnp.PyArray_TYPE(_array(a, name)) == cnp.NPY_FLOAT32:
        f = <const float *>_data(a, cnp.NPY_FLOAT32, C, name)
        for c in range(C):
            slot[c] = f[c]
        return slot
    if cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT64:
        raise TypeError(f"fastbn kernels: {name} must be float32 or float64, got {a.dtype}")
    return <const double *>_data(a, cnp.NPY_FLOAT64, C, name)


cdef inline double _invstd(double var, double eps) noexcept nogil:
    # A channel with var + eps == 0 (constant values, eps = 0) gets invstd = 0: x_hat and dx
    # are 0 there instead of NaN. NaN and inf propagate (they poison their channel only).
    cdef double v = var + eps
    if v == 0:
        return 0.0
    return 1.0 / sqrt(v)


cdef inline Py_ssize_t _rep(Py_ssize_t I, bint f32, bint stats) noexcept nogil:
    # Ctx.rep for a pass over an (O, C, I) array: statistics read segments of up to
    # _short_inner values and SHORT_BYTES bytes as rows, the other passes those shorter than a
    # 64-byte register
    # (float64 segments of 8-15 values: elementwise and backward 1.1-1.8x faster as segments).
    if I == 1:
        return 1
    cdef Py_ssize_t nbytes = I * (4 if f32 else 8)
    if I <= _short_inner and ((stats and nbytes <= SHORT_BYTES) or nbytes < 64):
        return I
    return 0


cdef inline Ctx _ctx(bint f32, const void *x, void *out, Py_ssize_t O, Py_ssize_t C,
                     Py_ssize_t I) noexcept nogil:
    cdef Ctx ctx
    memset(&ctx, 0, sizeof(Ctx))
    ctx.f32 = f32
    ctx.x = x
    ctx.out = out
    ctx.outer = O
    ctx.channels = C
    ctx.inner = I
    ctx.rep = _rep(I, f32, True)
    return ctx


cdef int _forward_train(Ctx *ctx, const double *w, const double *bb, double eps,
                        double *stats, int nthreads) noexcept nogil:
    # stats: OUT [mean | var | invstd], C each
    cdef Py_ssize_t C = ctx.channels, c
    cdef double n = <double>(ctx.outer * ctx.inner)
    cdef double *buf = <double *> malloc(3 * C * sizeof(double))
    cdef int rc
    if buf == NULL:
        return -1
    rc = _stats(ctx, stats, buf + 2 * C, stats + C, nthreads)  # (M2 into buf: unused)
    if rc == 0:
        for c in range(C):
            stats[2 * C + c] = _invstd(stats[C + c], eps)
            buf[c] = stats[2 * C + c] * (w[c] if w != NULL else 1.0)
            buf[C + c] = bb[c] if bb != NULL else 0.0
        ctx.mean = stats
        ctx.a = buf
        ctx.k = buf + C
        rc = _normalize(ctx, nthreads)
    free(buf)
    return rc


cdef int _normalize_given(Ctx *ctx, const double *mean, const double *invstd, const double *w,
                          const double *bb, int nthreads) noexcept nogil:
    cdef Py_ssize_t C = ctx.channels, c
    cdef double *buf = <double *> malloc(2 * C * sizeof(double))
    cdef int rc
    if buf == NULL:
        return -1
    for c in range(C):
        buf[c] = invstd[c] * (w[c] if w != NULL else 1.0)
        buf[C + c] = bb[c] if bb != NULL else 0.0
    ctx.mean = mean
    ctx.a = buf
    ctx.k = buf + C
    rc = _normalize(ctx, nthreads)
    free(buf)
    return rc


cdef int _dx_given(Ctx *ctx, const double *mean, const double *invstd, const double *w,
                   const double *sum_dy, const double *sum_dy_xmu, double count, bint training,
                   int nthreads) noexcept nogil:
    cdef Py_ssize_t C = ctx.channels, c
    cdef double *buf = <double *> malloc(4 * C * sizeof(double))
    cdef double a
    cdef int rc
    cdef const void *x = ctx.x
    if buf == NULL:
        return -1
    # loops without branches inside (C = 25088: 1/6 of a 16-row backward with them)
    if w != NULL:
        for c in range(C):
            buf[c] = invstd[c] * w[c]
    else:
        for c in range(C):
            buf[c] = invstd[c] * 1.0
    if training and count > 0:
        for c in range(C):
            a = buf[c]
            buf[C + c] = a * invstd[c] * invstd[c] * sum_dy_xmu[c] / count
            buf[2 * C + c] = -a * sum_dy[c] / count
    else:
        memset(buf + C, 0, 2 * C * sizeof(double))
    memset(buf + 3 * C, 0, C * sizeof(double))
    ctx.mean = mean
    if not training:
        # dx = a*g does not depend on x or the mean: no x (the loops then leave the x term
        # out), about a zero mean, so that a NaN/inf in x or mean (already in the forward's
        # output), or in dy where the ReLU masks it, stays out of dx.
        ctx.x = NULL
        ctx.mean = buf + 3 * C
    ctx.a = buf
    ctx.k = buf + C
    ctx.c = buf + 2 * C
    rc = _bwd_dx(ctx, nthreads)
    ctx.x = x
    free(buf)
    return rc


def _oom():
    raise MemoryError("fastbn: out of memory for the kernel workspace")


cdef double *_scratch(Py_ssize_t nchan, Py_ssize_t C) except NULL:
    # nchan per-channel double slots (freed by the caller); C <= MAX_C was checked
    cdef double *p = <double *>malloc((nchan * C + 1) * sizeof(double))
    if p == NULL:
        _oom()
    return p


def channel_stats(x, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, out, int nthreads):
    """Per-channel mean and M2 = sum((x - mean)^2). IN x; OUT out = [mean | M2] (2*C float64).

    outer * inner == 0 gives zeros."""
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef double *o = <double *>_out(out, cnp.NPY_FLOAT64, 2 * C, "out")
    cdef int rc = 0
    if n == 0:
        memset(o, 0, 2 * C * sizeof(double))
        return
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, NULL, O, C, I)
    nthreads = _clamp_threads(nthreads)
    with nogil:
        rc = _stats(&ctx, o, o + C, NULL, nthreads)
    if rc:
        _oom()


cpdef forward_train(x, y, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, weight, bias,
                  double eps, bint relu, stats, int nthreads):
    """Training forward: y = (x - mean) * invstd * weight + bias (then ReLU), batch statistics.

    IN x, weight, bias (or None); OUT y (may be x), stats = [mean | var (biased) | invstd].
    C == 0 is a no-op; outer * inner == 0 with C > 0 is a ValueError (no statistics).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef void *yp = _out(y, t, n, "y")
    cdef double *sp = <double *>_out(stats, cnp.NPY_FLOAT64, 3 * C, "stats")
    cdef int rc
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, yp, O, C, I)
    cdef const double *wp
    cdef const double *bp
    cdef double *scratch = _scratch(2, C)
    try:
        wp = _chan(weight, C, "weight", scratch + 0 * C, True)
        bp = _chan(bias, C, "bias", scratch + 1 * C, True)
        if C == 0:
            return
        if n == 0:
            raise ValueError("fastbn kernels: forward_train needs outer * inner >= 1")
        ctx.relu = relu
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _forward_train(&ctx, wp, bp, eps, sp, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


cdef int _update_one(object run, const double *batch, Py_ssize_t C, double scale,
                     double momentum) except -1:
    # run = (1 - momentum) * run + momentum * scale * batch, in double, rounded once.
    cdef Py_ssize_t c
    cdef float *f
    cdef double *d
    cdef int t
    if run is None:
        return 0
    t = _typenum(run, "running statistics")
    if t == cnp.NPY_FLOAT32:
        f = <float *>_out(run, cnp.NPY_FLOAT32, C, "running statistics")
        for c in range(C):
            f[c] = <float>((1.0 - momentum) * <double>f[c] + momentum * (scale * batch[c]))
    else:
        d = <double *>_out(run, cnp.NPY_FLOAT64, C, "running statistics")
        for c in range(C):
            d[c] = (1.0 - momentum) * d[c] + momentum * (scale * batch[c])
    return 0


def update_running(running_mean, running_var, mean, var, double count, double momentum):
    """PyTorch's running-statistics update, in place, with the unbiased batch variance.

    IN mean, var (biased; float64, C each); INOUT running_mean, running_var (None, or
    C-contiguous float32/float64). Done here rather than in NumPy because six small array
    operations cost more than a small batch's whole forward.
    """
    cdef Py_ssize_t C = cnp.PyArray_SIZE(_array(mean, "mean"))
    cdef const double *mp = <const double *>_data(mean, cnp.NPY_FLOAT64, C, "mean")
    cdef const double *vp = <const double *>_data(var, cnp.NPY_FLOAT64, C, "var")
    # check both before writing either
    if running_mean is not None:
        _out(running_mean, _typenum(running_mean, "running_mean"), C, "running_mean")
    if running_var is not None:
        _out(running_var, _typenum(running_var, "running_var"), C, "running_var")
    _update_one(running_mean, mp, C, 1.0, momentum)
    _update_one(running_var, vp, C, count / (count - 1) if count > 1 else 1.0, momentum)


def normalize(x, y, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean, invstd, weight,
              bias, bint relu, int nthreads):
    """y = (x - mean) * invstd * weight + bias (then ReLU) for given statistics.

    IN x, mean, invstd, weight, bias (or None); OUT y (may be x).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef void *yp = _out(y, t, n, "y")
    cdef int rc
    cdef const double *mp
    cdef const double *ip
    cdef const double *wp
    cdef const double *bp
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, yp, O, C, I)
    cdef double *scratch = _scratch(4, C)
    try:
        mp = _chan(mean, C, "mean", scratch + 0 * C, False)
        ip = _chan(invstd, C, "invstd", scratch + 1 * C, False)
        wp = _chan(weight, C, "weight", scratch + 2 * C, True)
        bp = _chan(bias, C, "bias", scratch + 3 * C, True)
        if n == 0:
            return
        ctx.relu = relu
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _normalize_given(&ctx, mp, ip, wp, bp, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


cpdef normalize_running(x, y, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean, var,
                      double eps, weight, bias, bint relu, int nthreads):
    """Inference forward: normalize with invstd = 1/sqrt(var + eps) (0 where var + eps == 0).

    IN x, mean, var (running statistics), weight, bias (or None); OUT y (may be x).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef void *yp = _out(y, t, n, "y")
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, yp, O, C, I)
    cdef double *inv
    cdef Py_ssize_t c
    cdef int rc = -1
    cdef const double *mp
    cdef const double *vp
    cdef const double *wp
    cdef const double *bp
    cdef double *scratch = _scratch(4, C)
    try:
        mp = _chan(mean, C, "mean", scratch + 0 * C, False)
        vp = _chan(var, C, "var", scratch + 1 * C, False)
        wp = _chan(weight, C, "weight", scratch + 2 * C, True)
        bp = _chan(bias, C, "bias", scratch + 3 * C, True)
        ctx.relu = relu
        if n == 0:
            return
        nthreads = _clamp_threads(nthreads)
        with nogil:
            inv = <double *> malloc(C * sizeof(double))
            if inv != NULL:
                for c in range(C):
                    inv[c] = _invstd(vp[c], eps)
                rc = _normalize_given(&ctx, mp, inv, wp, bp, nthreads)
                free(inv)
        if rc:
            _oom()
    finally:
        free(scratch)


def backward_sums(dy, x, y, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean, out,
                  int nthreads):
    """Per channel: sum(g) and sum(g * (x - mean)), g = dy masked by y > 0 when y is given.

    IN dy, x, y (or None), mean; OUT out = [sum(g) | sum(g * (x - mean))] (2*C float64).
    outer * inner == 0 gives zeros.
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(dy, "dy")
    cdef const void *dyp = _data(dy, t, n, "dy")
    cdef const void *xp = _data(x, t, n, "x")
    cdef const void *ym = _data(y, t, n, "y") if y is not None else NULL
    cdef double *o = <double *>_out(out, cnp.NPY_FLOAT64, 2 * C, "out")
    cdef int rc
    cdef const double *mp
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, NULL, O, C, I)
    cdef double *scratch = _scratch(1, C)
    try:
        mp = _chan(mean, C, "mean", scratch + 0 * C, False)
        if n == 0:
            memset(o, 0, 2 * C * sizeof(double))
            return
        ctx.dy = dyp
        ctx.y = ym
        ctx.mean = mp
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _bwd_sums(&ctx, o, o + C, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


def backward_dx(dy, x, y, dx, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean,
                invstd, weight, sum_dy, sum_dy_xmu, double count, bint training, int nthreads):
    """dx of batch norm from per-channel sums (see backward_sums) over `count` values.

    training: dx = a*(g - sum_dy/count - x_hat*invstd*sum_dy_xmu/count), a = weight*invstd;
    inference (statistics were constants): dx = a*g.
    IN dy, x, y (or None), mean, invstd, weight (or None), sums; OUT dx (may be dy).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(dy, "dy")
    cdef const void *dyp = _data(dy, t, n, "dy")
    cdef const void *xp = _data(x, t, n, "x")
    cdef const void *ym = _data(y, t, n, "y") if y is not None else NULL
    cdef void *dxp = _out(dx, t, n, "dx")
    cdef int rc
    cdef const double *mp
    cdef const double *ip
    cdef const double *wp
    cdef const double *s1
    cdef const double *s2
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, dxp, O, C, I)
    cdef double *scratch = _scratch(5, C)
    try:
        mp = _chan(mean, C, "mean", scratch + 0 * C, False)
        ip = _chan(invstd, C, "invstd", scratch + 1 * C, False)
        wp = _chan(weight, C, "weight", scratch + 2 * C, True)
        s1 = _chan(sum_dy, C, "sum_dy", scratch + 3 * C, False)
        s2 = _chan(sum_dy_xmu, C, "sum_dy_xmu", scratch + 4 * C, False)
        if n == 0:
            return
        ctx.dy = dyp
        ctx.y = ym
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _dx_given(&ctx, mp, ip, wp, s1, s2, count, training, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


cpdef backward(dy, x, y, dx, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean, invstd,
             weight, bint training, sums, int nthreads):
    """backward_sums then backward_dx over this batch, in one call.

    IN dy, x, y (or None), mean, invstd, weight (or None); OUT dx (may be dy),
    sums = [sum(g) | sum(g * (x - mean))] (2*C float64; zeros when outer * inner == 0).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(dy, "dy")
    cdef const void *dyp = _data(dy, t, n, "dy")
    cdef const void *xp = _data(x, t, n, "x")
    cdef const void *ym = _data(y, t, n, "y") if y is not None else NULL
    cdef void *dxp = _out(dx, t, n, "dx")
    cdef double *sp = <double *>_out(sums, cnp.NPY_FLOAT64, 2 * C, "sums")
    cdef int rc
    cdef const double *mp
    cdef const double *ip
    cdef const double *wp
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, dxp, O, C, I)
    cdef double *scratch = _scratch(3, C)
    try:
        mp = _chan(mean, C, "mean", scratch + 0 * C, False)
        ip = _chan(invstd, C, "invstd", scratch + 1 * C, False)
        wp = _chan(weight, C, "weight", scratch + 2 * C, True)
        if n == 0:
            memset(sp, 0, 2 * C * sizeof(double))
            return
        ctx.dy = dyp
        ctx.y = ym
        ctx.mean = mp
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _bwd_sums(&ctx, sp, sp + C, nthreads)
            if rc == 0:
                rc = _dx_given(&ctx, mp, ip, wp, sp, sp + C, <double>(O * I), training, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


def affine(a_in, b_in, out, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, a, k, m, c, int nthreads):
    """out = a*A - k*(B - m) + c per channel: the dx loop's form, for the double backward's
    elementwise passes (an x-sized result linear in two x-sized inputs).

    IN A (a_in), B (b_in), a, k, m, c (C each, float32/float64); OUT out (may be A).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(a_in, "a_in")
    cdef const void *ap = _data(a_in, t, n, "a_in")
    cdef const void *bp = _data(b_in, t, n, "b_in")
    cdef void *op = _out(out, t, n, "out")
    cdef int rc
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, bp, op, O, C, I)
    cdef double *scratch = _scratch(4, C)
    try:
        ctx.a = _chan(a, C, "a", scratch + 0 * C, False)
        ctx.k = _chan(k, C, "k", scratch + 1 * C, False)
        ctx.mean = _chan(m, C, "m", scratch + 2 * C, False)
        ctx.c = _chan(c, C, "c", scratch + 3 * C, False)
        if n == 0:
            return
        ctx.dy = ap
        ctx.y = NULL
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _bwd_dx(&ctx, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)


# --------------------------------------------------------------------------- fast paths
# fastbn.functional offers its most common calls here first: C-contiguous float32/float64
# ndarrays, per-channel arguments that are exact 1-D ndarrays (or None), and plain int / float /
# None / "relu" scalars. Anything else, including every argument the general path would
# reject, returns None and takes the general path, whose checks and messages stay the only
# ones. Results are bitwise those of the general path (the same kernels on the same canonical
# view). Why: the general path's Python costs ~4-5 us a call, more than the kernel itself on
# small inputs, where PyTorch's whole call takes ~3 us.

cdef bint _plain_x(object x, object axis, Py_ssize_t *O, Py_ssize_t *C,
                   Py_ssize_t *I) noexcept:
    """x is an exact, C-contiguous, aligned, native-order, non-empty float32/float64 ndarray
    with ndim >= 2 and axis a plain int in range; sets the canonical (O, C, I)."""
    cdef cnp.ndarray a
    cdef int t, nd, k, ax
    if not cnp.PyArray_CheckExact(x) or type(axis) is not int:
        return False
    a = <cnp.ndarray>x
    t = cnp.PyArray_TYPE(a)
    nd = cnp.PyArray_NDIM(a)
    if ((t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or nd < 2
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISBEHAVED_RO(a)
            or cnp.PyArray_SIZE(a) == 0 or not (-nd <= axis < nd)):
        return False
    ax = <int>axis
    if ax < 0:
        ax += nd
    O[0] = 1
    I[0] = 1
    for k in range(ax):
        O[0] *= cnp.PyArray_DIM(a, k)
    C[0] = cnp.PyArray_DIM(a, ax)
    for k in range(ax + 1, nd):
        I[0] *= cnp.PyArray_DIM(a, k)
    return True


cdef bint _plain_like(object a, cnp.ndarray x) noexcept:
    # an exact C-contiguous, aligned, native-order ndarray of x's dtype and shape
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.PyArray_TYPE(x)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISBEHAVED_RO(<cnp.ndarray>a)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>a, x))


cdef bint _plain_chan(object a, Py_ssize_t C, bint writable) noexcept:
    # None, or an exact C-contiguous, aligned, native-order float32/float64 ndarray of shape (C,)
    cdef cnp.ndarray arr
    cdef int t
    if a is None:
        return True
    if not cnp.PyArray_CheckExact(a):
        return False
    arr = <cnp.ndarray>a
    t = cnp.PyArray_TYPE(arr)
    return ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(arr) == 1
            and cnp.PyArray_DIM(arr, 0) == C and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and cnp.PyArray_ISBEHAVED_RO(arr) and (not writable or cnp.PyArray_ISWRITEABLE(arr)))


cdef int _plain_relu(object activation) noexcept:
    # 0 or 1 for None or "relu", -1 for anything else
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


cdef inline cnp.ndarray _empty_like(object a):
    # a new C-ordered array of a's shape and dtype (a: an ndarray the checks above accepted)
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>a), cnp.PyArray_DIMS(<cnp.ndarray>a),
                             cnp.PyArray_TYPE(<cnp.ndarray>a), 0)


cdef bint _plain_forward(object x, object weight, object bias, object axis,
                         object activation, Py_ssize_t *O, Py_ssize_t *C, Py_ssize_t *I,
                         int *relu) noexcept:
    # the arguments every forward shares: x, weight, bias, the activation
    relu[0] = _plain_relu(activation)
    return (relu[0] >= 0 and _plain_x(x, axis, O, C, I) and _plain_chan(weight, C[0], False)
            and _plain_chan(bias, C[0], False))


cdef tuple _train_forward(object x, object weight, object bias, double eps, bint relu,
                          Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, int nthreads):
    # (y, stats = [mean | var (biased) | invstd]) of a checked training forward
    cdef cnp.ndarray y = _empty_like(x)
    cdef cnp.ndarray stats = cnp.PyArray_EMPTY(1, [3 * C], cnp.NPY_FLOAT64, 0)
    forward_train(x, y, O, C, I, weight, bias, eps, relu, stats, nthreads)
    return y, stats


def batch_norm_fast(x, weight, bias, running_mean, running_var, bint training,
                    double momentum, double eps, axis, activation, int nthreads):
    """fastbn.functional.batch_norm (no out=) for plain arrays, else None.

    momentum and eps are taken as given: the caller has validated them."""
    cdef Py_ssize_t O, C, I
    cdef int relu
    cdef cnp.ndarray y, stats
    cdef double n
    cdef const double *sp
    if (not _plain_forward(x, weight, bias, axis, activation, &O, &C, &I, &relu)
            or not _plain_chan(running_mean, C, training)
            or not _plain_chan(running_var, C, training)):
        return None
    if not training:
        if running_mean is None or running_var is None:
            return None
        y = _empty_like(x)
        normalize_running(x, y, O, C, I, running_mean, running_var, eps, weight, bias, relu,
                          nthreads)
        return y
    n = <double>(O * I)
    if n <= 1:
        return None
    y, stats = _train_forward(x, weight, bias, eps, relu, O, C, I, nthreads)
    sp = <const double *>cnp.PyArray_DATA(stats)
    _update_one(running_mean, sp, C, 1.0, momentum)
    _update_one(running_var, sp + C, C, n / (n - 1), momentum)
    return y


def normalize_fast(x, mean, invstd, weight, bias, axis, activation, int nthreads):
    """fastbn.functional.normalize (no out=) for plain arguments, else None."""
    cdef Py_ssize_t O, C, I
    cdef int relu = _plain_relu(activation)
    cdef cnp.ndarray y
    if (relu < 0 or not _plain_x(x, axis, &O, &C, &I) or mean is None or invstd is None
            or not _plain_chan(mean, C, False) or not _plain_chan(invstd, C, False)
            or not _plain_chan(weight, C, False) or not _plain_chan(bias, C, False)):
        return None
    y = _empty_like(x)
    normalize(x, y, O, C, I, mean, invstd, weight, bias, relu, nthreads)
    return y


def invstd_fast(var, double eps):
    """fastbn.functional.invstd_from_var for a plain 1-D float32/float64 var (eps validated by
    the caller), else None: 1/sqrt(var + eps) in float64, 0 where var + eps == 0 (the
    arithmetic of the NumPy version, value for value)."""
    cdef Py_ssize_t c, C
    cdef cnp.ndarray out
    cdef const double *vp
    cdef double *op
    if not cnp.PyArray_CheckExact(var):
        return None
    if cnp.PyArray_NDIM(<cnp.ndarray>var) != 1:
        return None
    C = cnp.PyArray_DIM(<cnp.ndarray>var, 0)
    if not _plain_chan(var, C, False):
        return None
    out = cnp.PyArray_EMPTY(1, [C], cnp.NPY_FLOAT64, 0)
    op = <double *>cnp.PyArray_DATA(out)
    vp = _chan(var, C, "var", op, False)  # float32 values are widened into out itself
    for c in range(C):
        op[c] = _invstd(vp[c], eps)
    return out


def forward_with_stats_fast(x, weight, bias, double eps, axis, activation, int nthreads):
    """fastbn.functional.forward_with_stats (no out=) for plain arrays (eps validated by the
    caller), else None."""
    cdef Py_ssize_t O, C, I
    cdef int relu
    if (not _plain_forward(x, weight, bias, axis, activation, &O, &C, &I, &relu)
            or O * I <= 1):
        return None
    y, stats = _train_forward(x, weight, bias, eps, relu, O, C, I, nthreads)
    return y, stats[:C], stats[2 * C:], stats[C:2 * C], O * I


def batch_norm_backward_fast(dy, x, mean, invstd, weight, axis, bint training, activation, y,
                             int nthreads):
    """fastbn.functional.batch_norm_backward for plain arguments, else None."""
    cdef Py_ssize_t O, C, I, c
    cdef int relu = _plain_relu(activation)
    cdef cnp.ndarray xa, dx, sums, dw, db
    cdef int t
    cdef const double *sp
    cdef const double *ip
    cdef double *inv
    if (relu < 0 or not _plain_x(x, axis, &O, &C, &I) or mean is None or invstd is None
            or not _plain_chan(mean, C, False) or not _plain_chan(invstd, C, False)
            or not _plain_chan(weight, C, False) or (training and O * I <= 1)):
        return None
    xa = <cnp.ndarray>x
    if not _plain_like(dy, xa) or (relu and not _plain_like(y, xa)):
        return None
    t = cnp.PyArray_TYPE(xa)
    dx = _empty_like(xa)
    sums = cnp.PyArray_EMPTY(1, [2 * C], cnp.NPY_FLOAT64, 0)
    backward(dy, x, y if relu else None, dx, O, C, I, mean, invstd, weight, training, sums,
             nthreads)
    # dweight = sum(g * (x - mean)) * invstd, dbias = sum(g), rounded once to x's dtype
    dw = cnp.PyArray_EMPTY(1, [C], t, 0)
    db = cnp.PyArray_EMPTY(1, [C], t, 0)
    sp = <const double *>cnp.PyArray_DATA(sums)
    inv = <double *>malloc(C * sizeof(double) + 1)
    if inv == NULL:
        _oom()
    try:
        ip = _chan(invstd, C, "invstd", inv, False)
        if t == cnp.NPY_FLOAT32:
            for c in range(C):
                (<float *>cnp.PyArray_DATA(dw))[c] = <float>(sp[C + c] * ip[c])
                (<float *>cnp.PyArray_DATA(db))[c] = <float>sp[c]
        else:
            for c in range(C):
                (<double *>cnp.PyArray_DATA(dw))[c] = sp[C + c] * ip[c]
                (<double *>cnp.PyArray_DATA(db))[c] = sp[c]
    finally:
        free(inv)
    return dx, dw, db


cdef inline Py_ssize_t _probe_share(Py_ssize_t n, int nt) noexcept nogil:
    # one thread's contiguous share of an n-byte bandwidth probe: equal, a multiple of 64 bytes
    return (((n + nt - 1) // nt) + 63) & ~(<Py_ssize_t>63)


def stream_copy(src, dst, int nthreads):
    """dst[:] = src[:] with the kernels' threads: the bandwidth probe of `fastbn bench`.

    IN src; OUT dst (C-contiguous uint8 ndarrays of the same length). Each thread copies one
    contiguous equal share (a multiple of 64 bytes) in memcpy calls of at most 1 MiB, so no
    thread idles on rows of a few MiB.
    """
    cdef Py_ssize_t n, share, t, off, end, step
    cdef const unsigned char *sp
    cdef unsigned char *dp
    cdef int nt
    for a, name in ((src, "src"), (dst, "dst")):
        if cnp.PyArray_TYPE(_array(a, name)) != cnp.NPY_UINT8:
            raise TypeError(f"stream_copy: {name} must be uint8, got {a.dtype}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
            raise ValueError(f"stream_copy: {name} must be C-contiguous")
    n = cnp.PyArray_SIZE(<cnp.ndarray>src)
    if cnp.PyArray_SIZE(<cnp.ndarray>dst) != n:
        raise ValueError(f"stream_copy: dst must have {n} bytes, got {dst.size}")
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>dst):
        raise ValueError("stream_copy: dst must be writable")
    if n == 0:
        return
    sp = <const unsigned char *>cnp.PyArray_DATA(<cnp.ndarray>src)
    dp = <unsigned char *>cnp.PyArray_DATA(<cnp.ndarray>dst)
    nt = _nthreads(_clamp_threads(nthreads), n // 4)
    share = _probe_share(n, nt)
    with nogil:
        for t in prange(nt, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            off = t * share
            end = min(n, off + share)
            while off < end:
                step = min(<Py_ssize_t>(1 << 20), end - off)
                memcpy(dp + off, sp + off, step)
                off = off + step  # not `+=`: prange would make it a reduction


def stream_read(src, int nthreads):
    """Read src (a C-contiguous uint8 ndarray) once with the kernels' threads, at the active
    ISA level: the read-only bandwidth probe for the reductions. Each thread sums the 64-bit
    words of one contiguous equal share (a multiple of 64 bytes); returns that sum (mod 2^64,
    trailing bytes of a length not a multiple of 8 ignored) so the reads cannot be dropped.
    """
    cdef Py_ssize_t n, share, t, off, end
    cdef const unsigned char *sp
    cdef unsigned long long total = 0
    cdef int nt
    if cnp.PyArray_TYPE(_array(src, "src")) != cnp.NPY_UINT8:
        raise TypeError(f"stream_read: src must be uint8, got {src.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>src):
        raise ValueError("stream_read: src must be C-contiguous")
    n = cnp.PyArray_SIZE(<cnp.ndarray>src)
    if n == 0:
        return 0
    sp = <const unsigned char *>cnp.PyArray_DATA(<cnp.ndarray>src)
    nt = _nthreads(_clamp_threads(nthreads), n // 4)
    share = _probe_share(n, nt)
    with nogil:
        for t in prange(nt, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            off = t * share
            end = min(n, off + share)
            if off < end:
                total += fbn_stream_read(sp + off, (end - off) & ~(<Py_ssize_t>7))
    return total



# --------------------------------------------------------------------------- masked statistics
# Keras's/Flax's mask= (issue 18): a byte per (outer, inner) position of the canonical view,
# nonzero = the position counts towards its channels' mean and variance; one (O, I) mask row is
# shared by all C channels (for channels-last, I = 1: a byte per row). The statistics are the
# plain ones' shifted sums over the masked-in values only, on the same fixed partition (so the
# same thread-count invariance); y is then normalised everywhere by _normalize, and dx is
# formed everywhere from sums over every position (_bwd_sums) by a masked elementwise loop. So
# each costs the plain kernel's passes over x: none extra.

cdef extern from "_simd.h" nogil:
    void fbn_msums_float(const float *x, const unsigned char *mk, Py_ssize_t nseg,
                         Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C, Py_ssize_t mstride,
                         const float *k, int by_channel, double *s1, double *s2)
    void fbn_msums_double(const double *x, const unsigned char *mk, Py_ssize_t nseg,
                          Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C, Py_ssize_t mstride,
                          const double *k, int by_channel, double *s1, double *s2)
    void fbn_msums_rows_float(const float *x, const unsigned char *mk, Py_ssize_t nrows,
                              Py_ssize_t stride, Py_ssize_t width, const float *k, double *a1,
                              double *a2)
    void fbn_msums_rows_double(const double *x, const unsigned char *mk, Py_ssize_t nrows,
                               Py_ssize_t stride, Py_ssize_t width, const double *k,
                               double *a1, double *a2)
    void fbn_mbwd_dx_float(const float *dy, const float *x, const float *y,
                           const unsigned char *mk, float *dx, Py_ssize_t nseg, Py_ssize_t len,
                           Py_ssize_t c0, Py_ssize_t C, Py_ssize_t mstride, const float *mhi,
                           const float *a, const float *k, const float *c)
    void fbn_mbwd_dx_double(const double *dy, const double *x, const double *y,
                            const unsigned char *mk, double *dx, Py_ssize_t nseg,
                            Py_ssize_t len, Py_ssize_t c0, Py_ssize_t C, Py_ssize_t mstride,
                            const double *mhi, const double *a, const double *k,
                            const double *c)
    void fbn_mbwd_dx_rows_float(const float *dy, const float *x, const float *y,
                                const unsigned char *mk, float *dx, Py_ssize_t nrows,
                                Py_ssize_t stride, Py_ssize_t width, const float *mhi,
                                const float *a, const float *k, const float *c)
    void fbn_mbwd_dx_rows_double(const double *dy, const double *x, const double *y,
                                 const unsigned char *mk, double *dx, Py_ssize_t nrows,
                                 Py_ssize_t stride, Py_ssize_t width, const double *mhi,
                                 const double *a, const double *k, const double *c)


cdef inline const unsigned char *_ncl_mask(const Ctx *ctx, Py_ssize_t off) noexcept nogil:
    # the mask byte of the value at offset off (segment s = off // I, outer index s // C)
    cdef Py_ssize_t I = ctx.inner, s = off // I
    return ctx.mask + (s // ctx.channels) * I + (off - s * I)


cdef void _ncl_mstats(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t of _reduction: masked sums of x - k over a run; lanes = k (C of them).
    cdef Py_ssize_t c0, o, n
    cdef Block blk = _reduction_run(ctx, t, &c0, &o, &n)
    cdef const unsigned char *mk = _ncl_mask(ctx, blk.off)
    memset(ctx.p1 + o, 0, n * sizeof(double))
    memset(ctx.p2 + o, 0, n * sizeof(double))
    if floating is float:
        fbn_msums_float(x + blk.off, mk, blk.nseg, blk.len, c0, ctx.channels, ctx.inner,
                        <const float *>ctx.lanes, ctx.by_channel, ctx.p1 + o, ctx.p2 + o)
    else:
        fbn_msums_double(x + blk.off, mk, blk.nseg, blk.len, c0, ctx.channels, ctx.inner,
                         <const double *>ctx.lanes, ctx.by_channel, ctx.p1 + o, ctx.p2 + o)


cdef void _rows_mstats(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: rows [b*rb, (b+1)*rb) x channels [c0, c0 + cw) of the plain partition, walked a
    # row at a time (a mask byte per row: a super-row would mix rows in and out); lanes = k[C].
    cdef double a1[TILE]
    cdef double a2[TILE]
    cdef const Rows *p = &ctx.p
    cdef const floating *k = <const floating *>ctx.lanes
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = (t % p.ntiles) * p.tile
    cdef Py_ssize_t cw = min(p.tile, p.C - c0), c
    memset(a1, 0, cw * sizeof(double))
    memset(a2, 0, cw * sizeof(double))
    if floating is float:
        fbn_msums_rows_float(x + r0 * p.C + c0, ctx.mask + r0, r1 - r0, p.C, cw, k + c0, a1, a2)
    else:
        fbn_msums_rows_double(x + r0 * p.C + c0, ctx.mask + r0, r1 - r0, p.C, cw, k + c0, a1,
                              a2)
    for c in range(cw):
        ctx.p1[b * p.C + c0 + c] = a1[c]
        ctx.p2[b * p.C + c0 + c] = a2[c]


cdef void _mstats_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.inner > 1:
        if ctx.f32:
            _ncl_mstats(<const float *>ctx.x, ctx, t)
        else:
            _ncl_mstats(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_mstats(<const float *>ctx.x, ctx, t)
        else:
            _rows_mstats(<const double *>ctx.x, ctx, t)


cdef void *_mpilot_shift(const Ctx *ctx) noexcept nogil:
    """_pilot_shift over the masked-in positions: per channel the median of its values at the
    first, the middle (the first at or after the middle) and the last masked-in position (the
    mask has at least one). A masked-out value (padding) is never the shift."""
    cdef Py_ssize_t c, C = ctx.channels, I = ctx.inner, M = ctx.outer * ctx.inner
    cdef Py_ssize_t p0 = 0, p1 = M // 2, p2 = M - 1, i0, i1, i2
    cdef size_t size = sizeof(float) if ctx.f32 else sizeof(double)
    cdef char *k = <char *> malloc(C * size + 1)
    cdef const float *xf = <const float *>ctx.x
    cdef const double *xd = <const double *>ctx.x
    if k == NULL:
        return NULL
    while p0 < M - 1 and not ctx.mask[p0]:
        p0 += 1
    while p2 > 0 and not ctx.mask[p2]:
        p2 -= 1
    while p1 < p2 and not ctx.mask[p1]:
        p1 += 1
    if not ctx.mask[p1]:
        p1 = p2
    for c in range(C):
        i0 = ((p0 // I) * C + c) * I + p0 % I
        i1 = ((p1 // I) * C + c) * I + p1 % I
        i2 = ((p2 // I) * C + c) * I + p2 % I
        if ctx.f32:
            (<float *>k)[c] = _med3(xf[i0], xf[i1], xf[i2])
        else:
            (<double *>k)[c] = _med3(xd[i0], xd[i1], xd[i2])
    return k


cdef int _mstats(Ctx *ctx, double count, double *mean, double *m2, double *flag,
                 int nthreads) noexcept nogil:
    """Per-channel mean and M2 over the masked-in positions (count >= 1 of them), and flag[c] =
    1 where the one-pass result fails _stats's acceptance test (the caller recomputes those
    channels carefully), else 0. Returns -1 when out of memory."""
    cdef Py_ssize_t c, C = ctx.channels
    cdef double n = count, k, s1, s2, d, v
    cdef double vmin = VMIN_F32 if ctx.f32 else VMIN_F64
    cdef double kmin = KMIN_F32 if ctx.f32 else KMIN_F64
    cdef bint ok
    cdef int rc
    cdef void *shift
    # The masked loops read NCL segments, or channels-last rows a mask byte each: never the
    # short-segment rows reading of the plain passes (ctx.rep = inner), whose lanes would mix
    # positions of different mask bytes.
    ctx.rep = 0 if ctx.inner > 1 else 1
    shift = _mpilot_shift(ctx)
    if shift == NULL:
        return -1
    ctx.lanes = shift
    rc = _reduce(ctx, _mstats_task, mean, m2, nthreads)
    if rc == 0:
        for c in range(C):
            k = (<const float *>shift)[c] if ctx.f32 else (<const double *>shift)[c]
            s1 = mean[c]
            s2 = m2[c]
            d = s1 / n
            mean[c] = k + d
            m2[c] = s2 - s1 * d
            if m2[c] < 0:
                m2[c] = 0
            v = m2[c] / n
            ok = fabs(s1) < INFINITY and fabs(s2) < INFINITY and d * d <= SHIFT_SIGMAS2 * v
            if ok and v < vmin:
                ok = s2 == 0 and fabs(k) >= kmin
            flag[c] = 0.0 if ok else 1.0
    ctx.lanes = NULL
    free(shift)
    return rc


cdef void _ncl_mdx(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a run of segments in memory order (_ncl_runs). lanes = [mhi | a | k | c], C each.
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef Py_ssize_t c0, C = ctx.channels
    cdef Block blk = _ncl_run(ctx, t, &c0)
    cdef const unsigned char *mk = _ncl_mask(ctx, blk.off)
    c0 = c0 % C
    cdef const floating *L = <const floating *>ctx.lanes
    if floating is float:
        fbn_mbwd_dx_float(dy + blk.off, x + blk.off, y + blk.off if y != NULL else NULL, mk,
                          <float *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, ctx.inner, L,
                          L + C, L + 2 * C, L + 3 * C)
    else:
        fbn_mbwd_dx_double(dy + blk.off, x + blk.off, y + blk.off if y != NULL else NULL, mk,
                           <double *>ctx.out + blk.off, blk.nseg, blk.len, c0, C, ctx.inner, L,
                           L + C, L + 2 * C, L + 3 * C)


cdef void _rows_mdx(const floating *x, const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    # Task t: a row block x channel tile of the plain partition, a row at a time (see
    # _rows_mstats). lanes = [mhi | a | k | c], C each.
    cdef const floating *dy = <const floating *>ctx.dy
    cdef const floating *y = <const floating *>ctx.y
    cdef const Rows *p = &ctx.p
    cdef const floating *L = <const floating *>ctx.lanes
    cdef Py_ssize_t C = p.C
    cdef Py_ssize_t b = t // p.ntiles
    cdef Py_ssize_t r0 = b * p.rb
    cdef Py_ssize_t r1 = min(p.R, r0 + p.rb)
    cdef Py_ssize_t c0 = (t % p.ntiles) * p.tile
    cdef Py_ssize_t cw = min(p.tile, C - c0)
    cdef Py_ssize_t o = r0 * C + c0
    if floating is float:
        fbn_mbwd_dx_rows_float(dy + o, x + o, y + o if y != NULL else NULL, ctx.mask + r0,
                               <float *>ctx.out + o, r1 - r0, C, cw, L + c0, L + C + c0,
                               L + 2 * C + c0, L + 3 * C + c0)
    else:
        fbn_mbwd_dx_rows_double(dy + o, x + o, y + o if y != NULL else NULL, ctx.mask + r0,
                                <double *>ctx.out + o, r1 - r0, C, cw, L + c0, L + C + c0,
                                L + 2 * C + c0, L + 3 * C + c0)


cdef void _mdx_task(const Ctx *ctx, Py_ssize_t t) noexcept nogil:
    if ctx.inner > 1:
        if ctx.f32:
            _ncl_mdx(<const float *>ctx.x, ctx, t)
        else:
            _ncl_mdx(<const double *>ctx.x, ctx, t)
    else:
        if ctx.f32:
            _rows_mdx(<const float *>ctx.x, ctx, t)
        else:
            _rows_mdx(<const double *>ctx.x, ctx, t)


cdef int _mbwd_dx(Ctx *ctx, int nthreads) noexcept nogil:
    """ctx.out = a*g - k*(x - mean) + c where the mask is set, a*g elsewhere (see _bwd_dx)."""
    # segments, or rows walked one at a time, a mask byte each (see _mstats)
    return _dx_pass(ctx, _mdx_task, 0 if ctx.inner > 1 else 1, False, nthreads)


cdef double _mask_count(const unsigned char *mk, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i, n = 0
    for i in range(m):
        n += mk[i] != 0
    return <double>n


def masked_channel_stats(x, mask, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, out, int nthreads):
    """Per-channel mean and M2 over the masked-in positions; returns their count.

    IN x (O*C*I values), mask (O*I uint8, nonzero = counts, shared by all channels);
    OUT out = [mean | M2 | flag] (3*C float64): flag[c] = 1 where the one-pass sums could not
    be vouched for (see _stats; the caller recomputes that channel carefully). No values, or no
    masked-in position, gives zeros (and count 0).
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef const unsigned char *mp = <const unsigned char *>_data(
        mask, cnp.NPY_UINT8, O * I if n else cnp.PyArray_SIZE(_array(mask, "mask")), "mask")
    cdef double *o = <double *>_out(out, cnp.NPY_FLOAT64, 3 * C, "out")
    cdef double count = 0
    cdef int rc = 0
    if n > 0:
        count = _mask_count(mp, O * I)
    if count == 0:
        memset(o, 0, 3 * C * sizeof(double))
        return 0
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, NULL, O, C, I)
    ctx.mask = mp
    nthreads = _clamp_threads(nthreads)
    with nogil:
        rc = _mstats(&ctx, count, o, o + C, o + 2 * C, nthreads)
    if rc:
        _oom()
    return int(count)


def masked_forward_train(x, y, mask, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, weight, bias,
                         double eps, bint relu, stats, int nthreads):
    """masked_channel_stats, then y = (x - mean) * invstd * weight + bias (then ReLU) in the same
    call when every channel's one-pass statistics were vouched for. Returns the count, negated
    when some channel was flagged: y is then not written, and the caller recomputes the flagged
    channels' statistics and normalises (normalize).

    IN x, mask (O*I uint8, nonzero = counts), weight, bias (or None); OUT y (may be x),
    stats = [mean | M2 | flag | var | invstd] (5*C float64; var, invstd only when normalised).
    No values or no masked-in position writes zero statistics and leaves y as it is (count 0).
    """
    cdef Py_ssize_t n = _extent(O, C, I), c
    cdef int t = _typenum(x, "x")
    cdef const void *xp = _data(x, t, n, "x")
    cdef void *yp = _out(y, t, n, "y")
    cdef const unsigned char *mp = <const unsigned char *>_data(
        mask, cnp.NPY_UINT8, O * I if n else cnp.PyArray_SIZE(_array(mask, "mask")), "mask")
    cdef double *o = <double *>_out(stats, cnp.NPY_FLOAT64, 5 * C, "stats")
    cdef double count = 0, nflag = 0
    cdef int rc = 0
    cdef const double *wp
    cdef const double *bp
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, yp, O, C, I)
    cdef double *scratch = _scratch(4, C)
    try:
        wp = _chan(weight, C, "weight", scratch, True)
        bp = _chan(bias, C, "bias", scratch + C, True)
        if n > 0:
            count = _mask_count(mp, O * I)
        if count == 0:
            memset(o, 0, 5 * C * sizeof(double))
            return 0
        ctx.mask = mp
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _mstats(&ctx, count, o, o + C, o + 2 * C, nthreads)
            if rc == 0:
                for c in range(C):
                    nflag += o[2 * C + c]
            if rc == 0 and nflag == 0:
                for c in range(C):
                    o[3 * C + c] = o[C + c] / count
                    o[4 * C + c] = _invstd(o[3 * C + c], eps)
                    scratch[2 * C + c] = o[4 * C + c] * (wp[c] if wp != NULL else 1.0)
                    scratch[3 * C + c] = bp[c] if bp != NULL else 0.0
                ctx.mean = o
                ctx.a = scratch + 2 * C
                ctx.k = scratch + 3 * C
                ctx.relu = relu
                rc = _normalize(&ctx, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)
    return -int(count) if nflag else int(count)


def masked_backward(dy, x, y, mask, dx, Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, mean,
                    invstd, weight, sums, int nthreads):
    """The training backward of masked statistics; returns the mask's count n.

    dx = a*(g - m*(sum(g) + xhat*sum(g*xhat))/n), a = weight*invstd, xhat = (x - mean)*invstd,
    the sums over every position (y depends on the statistics everywhere), m the mask.
    IN dy, x, y (or None: g = dy, else dy where y > 0), mask (O*I uint8, nonzero = counts),
    mean, invstd, weight (or None); OUT dx (may be dy), sums = [sum(g) | sum(g * (x - mean))]
    (2*C float64). No masked-in position gives dx = a*g.
    """
    cdef Py_ssize_t n = _extent(O, C, I)
    cdef int t = _typenum(dy, "dy")
    cdef const void *dyp = _data(dy, t, n, "dy")
    cdef const void *xp = _data(x, t, n, "x")
    cdef const void *ym = _data(y, t, n, "y") if y is not None else NULL
    cdef const unsigned char *mp = <const unsigned char *>_data(
        mask, cnp.NPY_UINT8, O * I if n else cnp.PyArray_SIZE(_array(mask, "mask")), "mask")
    cdef void *dxp = _out(dx, t, n, "dx")
    cdef double *sp = <double *>_out(sums, cnp.NPY_FLOAT64, 2 * C, "sums")
    cdef int rc = 0
    cdef const double *mnp
    cdef const double *ip
    cdef const double *wp
    cdef double count = 0, a
    cdef Py_ssize_t c
    cdef Ctx ctx = _ctx(t == cnp.NPY_FLOAT32, xp, dxp, O, C, I)
    cdef double *scratch = _scratch(7, C)
    try:
        mnp = _chan(mean, C, "mean", scratch + 0 * C, False)
        ip = _chan(invstd, C, "invstd", scratch + 1 * C, False)
        wp = _chan(weight, C, "weight", scratch + 2 * C, True)
        if n == 0:
            memset(sp, 0, 2 * C * sizeof(double))
            return 0
        count = _mask_count(mp, O * I)
        ctx.dy = dyp
        ctx.y = ym
        ctx.mean = mnp
        ctx.mask = mp
        nthreads = _clamp_threads(nthreads)
        with nogil:
            rc = _bwd_sums(&ctx, sp, sp + C, nthreads)
            if rc == 0:
                for c in range(C):  # dx = a*g - k*(x - mean) + c where the mask is set
                    a = ip[c] * (wp[c] if wp != NULL else 1.0)
                    scratch[3 * C + c] = a
                    if count > 0:
                        scratch[4 * C + c] = a * ip[c] * ip[c] * sp[C + c] / count
                        scratch[5 * C + c] = -a * sp[c] / count
                    else:
                        scratch[4 * C + c] = 0
                        scratch[5 * C + c] = 0
                ctx.a = scratch + 3 * C
                ctx.k = scratch + 4 * C
                ctx.c = scratch + 5 * C
                rc = _mbwd_dx(&ctx, nthreads)
        if rc:
            _oom()
    finally:
        free(scratch)
    return int(count)


# --------------------------------------------------------------------------- 2-byte floats
# float16 and bfloat16 are computed in float32: the CPU backend converts them with these (NumPy's
# casts run at 1-5 ns a value on one thread, 15x the float32 kernels' time; these stream at
# memory speed on every thread). Each value is converted on its own, so the results cannot
# depend on the thread count; the fixed chunks only share the work. Bit for bit the results of
# NumPy's astype (float16) and ml_dtypes' (bfloat16), NaN payloads included (_half_loops.h).

cdef void *_half_side(object a, bint bf16, Py_ssize_t size, str fn, str name) except NULL:
    """Pointer to a C-contiguous, aligned, native 2-byte array: float16 (or bfloat16 when
    bf16) or its uint16 view, of `size` values (size < 0: any; the size is then the caller's)."""
    cdef cnp.ndarray arr = _array(a, name)
    cdef int t = cnp.PyArray_TYPE(arr)
    # bfloat16 (ml_dtypes) is a user dtype, recognised by name as fastbn._validation does
    if not (t == cnp.NPY_UINT16 or (t == cnp.NPY_FLOAT16 and not bf16)
            or (bf16 and arr.dtype.name == "bfloat16"
                and arr.dtype.itemsize == 2)):
        raise TypeError(f"{fn}: {name} must be {'bfloat16' if bf16 else 'float16'} (or its "
                        f"uint16 view), got {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{fn}: {name} must be C-contiguous")
    if cnp.PyArray_ISBYTESWAPPED(arr):
        raise ValueError(f"{fn}: {name} must be in native byte order")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{fn}: {name} must be aligned")
    if size >= 0 and cnp.PyArray_SIZE(arr) != size:
        raise ValueError(f"{fn}: {name} must have {size} values, got {arr.size}")
    return cnp.PyArray_DATA(arr)


cdef int _convert(const void *src, void *dst, Py_ssize_t n, int op, int nthreads) except -1:
    """dst = src converted by op (0 f16 -> f32, 1 bf16 -> f32, 2 f32 -> f16, 3 f32 -> bf16) in
    HALF_CHUNK tasks."""
    cdef Py_ssize_t ntasks = (n + HALF_CHUNK - 1) // HALF_CHUNK, t, off, m
    cdef int nt = _nthreads(_clamp_threads(nthreads), n)
    with nogil:
        for t in prange(ntasks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            off = t * HALF_CHUNK
            m = min(<Py_ssize_t>HALF_CHUNK, n - off)
            if op == 0:
                fbn_f16_to_f32(<const unsigned short *>src + off, <float *>dst + off, m)
            elif op == 1:
                fbn_bf16_to_f32(<const unsigned short *>src + off, <float *>dst + off, m)
            elif op == 2:
                fbn_f32_to_f16(<const float *>src + off, <unsigned short *>dst + off, m)
            else:
                fbn_f32_to_bf16(<const float *>src + off, <unsigned short *>dst + off, m)
    return 0


cdef int _disjoint(object src, object dst, str fn) except -1:
    cdef char *a = <char *>cnp.PyArray_DATA(<cnp.ndarray>src)
    cdef char *b = <char *>cnp.PyArray_DATA(<cnp.ndarray>dst)
    cdef Py_ssize_t na = cnp.PyArray_NBYTES(<cnp.ndarray>src)
    cdef Py_ssize_t nb = cnp.PyArray_NBYTES(<cnp.ndarray>dst)
    if na > 0 and nb > 0 and a < b + nb and b < a + na:
        raise ValueError(f"{fn}: src and dst must not overlap")
    return 0


def half_to_float(src, dst, bint bf16, int nthreads):
    """dst[...] = src as float32: IN src float16 (bfloat16 when bf16, or either's uint16 view);
    OUT dst float32, the same number of values. C-contiguous, aligned, native, not
    overlapping. Exactly NumPy's (ml_dtypes') astype, at every ISA level and thread count."""
    cdef const void *sp = _half_side(src, bf16, -1, "half_to_float", "src")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>src)
    cdef void *dp = _out(dst, cnp.NPY_FLOAT32, n, "dst")
    _disjoint(src, dst, "half_to_float")
    if n > 0:
        _convert(sp, dp, n, 1 if bf16 else 0, nthreads)


def float_to_half(src, dst, bint bf16, int nthreads):
    """dst[...] = src rounded to float16 (bfloat16 when bf16): IN src float32; OUT dst float16
    (bfloat16, or either's uint16 view), the same number of values. C-contiguous, aligned,
    native, not overlapping. Exactly NumPy's (ml_dtypes') astype (round to nearest even,
    overflow to inf, their NaN rules), at every ISA level and thread count."""
    cdef const void *sp = _data(src, cnp.NPY_FLOAT32, cnp.PyArray_SIZE(_array(src, "src")),
                                "src")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(<cnp.ndarray>src)
    cdef void *dp = _half_side(dst, bf16, n, "float_to_half", "dst")
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>dst):
        raise ValueError("float_to_half: dst must be writable")
    _disjoint(src, dst, "float_to_half")
    if n > 0:
        _convert(sp, dp, n, 3 if bf16 else 2, nthreads)
