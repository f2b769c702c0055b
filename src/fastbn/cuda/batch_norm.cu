/*
 * fastbn CUDA kernels: batch-norm statistics, normalisation and backward on canonical
 * (outer, C, inner) C-contiguous arrays, the GPU twin of _kernels.pyx + _simd.h.
 *
 * Loaded by fastbn/cuda/kernels.py with cupy.RawModule (NVRTC). The file is self-contained: no
 * #include (NVRTC has no host headers), float16 converted with PTX cvt instructions instead of
 * cuda_fp16.h, and every kernel is an extern "C" symbol per dtype (suffix _f32, _f64, _f16), so
 * the loader needs no name mangling and `nvcc -cubin` compiles every instantiation.
 *
 * Layouts, as on the CPU:
 *   inner > 1  "NCL": each channel is `outer` runs of `inner` contiguous values.
 *   inner == 1 "NLC" (channels-last, and 2-D (N, C)): rows of C values.
 * The elementwise kernels need no layout switch: they walk the flat array and track
 * (i, c) = (flat % inner, flat / inner % C) incrementally.
 *
 * Precision: statistics and gradient sums accumulate in double whatever the input (float32
 * sums of millions of values lose digits; the mean-shift trick below needs the wide
 * accumulator), and subtract a shift (the first value of the block, or the mean) before
 * squaring, never E[x^2] - E[x]^2. float16 is loaded, converted to float32, computed in float32
 * and rounded back on store (round to nearest even, as NumPy's astype). Elementwise passes use
 * the compute precision (float for float16/float32) with the mean split into head + tail, so
 * (x - mhi) - mlo keeps the digits of x - mean when |mean| >> std.
 *
 * Determinism: every reduction is cut into blocks whose boundaries depend only on the shape
 * (never on the device or the grid size), each block reduces in a fixed tree, and the partials
 * are merged per channel in a fixed order. Results are bitwise identical from run to run.
 */

#define FBN_THREADS 256      /* threads of every block; the reductions assume exactly this   */
#define FBN_NCL_CHUNK 4096   /* values of one channel reduced by one NCL block (16/thread)  */
#define FBN_ROW_ITEMS 16     /* rows per row-lane of one NLC block                           */
#define FBN_UNROLL 4         /* independent loads in flight per thread, elementwise kernels  */

typedef long long fbn_i64;

/* ------------------------------------------------------------------ loads and stores
 * Storage type S, compute type: float for float and float16 (unsigned short), double for
 * double. Plain loads (not __ldg) in the elementwise kernels, where y may alias x. */

__device__ __forceinline__ float fbn_ld(const float *p, fbn_i64 i) { return p[i]; }
__device__ __forceinline__ double fbn_ld(const double *p, fbn_i64 i) { return p[i]; }
#ifdef FBN_HOST_EMULATION
/* tests/test_cuda_compile.py runs these kernels on the CPU under a host emulation of the CUDA
 * execution model (no GPU in CI); it supplies the conversions that PTX provides below. */
__device__ __forceinline__ float fbn_ld(const unsigned short *p, fbn_i64 i)
{
    return fbn_emu_h2f(p[i]);
}
#else
__device__ __forceinline__ float fbn_ld(const unsigned short *p, fbn_i64 i)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
    return f;
}
#endif

__device__ __forceinline__ void fbn_st(float *p, fbn_i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void fbn_st(double *p, fbn_i64 i, double v) { p[i] = v; }
#ifdef FBN_HOST_EMULATION
__device__ __forceinline__ void fbn_st(unsigned short *p, fbn_i64 i, float v)
{
    p[i] = fbn_emu_f2h(v);
}
#else
__device__ __forceinline__ void fbn_st(unsigned short *p, fbn_i64 i, float v)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}
#endif

__device__ __forceinline__ fbn_i64 fbn_min(fbn_i64 a, fbn_i64 b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ block reduction
 * Threads t = rl * tw + cl (cl: channel lane, rl: row lane, rl < nrl) hold a[t], b[t]. After
 * the call, a[cl], b[cl] are the sums over the row lanes of channel lane cl, added in a fixed
 * pairwise tree (so the result does not depend on scheduling). All threads must call it. */
__device__ void fbn_tree_sum(double *a, double *b, int t, int tw, int nrl)
{
    const int rl = t / tw;
    for (int s = 1; s < nrl; s <<= 1) {
        __syncthreads();
        if (t < tw * nrl && (rl & (2 * s - 1)) == 0 && rl + s < nrl) {
            a[t] += a[t + s * tw];
            b[t] += b[t + s * tw];
        }
    }
    __syncthreads();
}

/* (mean, M2) of a block of cnt values from sums shifted by k (a sample of the block), as
 * _block_moments in _kernels.pyx. */
__device__ __forceinline__ void fbn_block_moments(double cnt, double k, double s1, double s2,
                                                  double *mean, double *m2)
{
    const double d = s1 / cnt;
    double v = s2 - s1 * d;
    if (v < 0) /* rounding when all values are (nearly) equal; NaN stays NaN */
        v = 0;
    *mean = k + d;
    *m2 = v;
}

/* Merge a partial (nb, mb, m2b) into (n, mean, m2) (Chan, Golub & LeVeque). */
__device__ __forceinline__ void fbn_chan(double &n, double &mean, double &m2, double nb,
                                         double mb, double m2b)
{
    if (nb == 0)
        return;
    if (n == 0) {
        n = nb;
        mean = mb;
        m2 = m2b;
        return;
    }
    const double nt = n + nb;
    const double delta = mb - mean;
    mean = mean + delta * (nb / nt);
    m2 = m2 + m2b + delta * delta * (n * (nb / nt));
    n = nt;
}

/* ------------------------------------------------------------------ statistics, pass 1
 * NCL: block (c, q) reduces values [q*CHUNK, (q+1)*CHUNK) of channel c in (outer, inner)
 * order; grid = C * nq, partial index c * nq + q. */
template <class S>
__device__ void fbn_stats_ncl(const S *__restrict__ x, fbn_i64 O, int C, fbn_i64 I, fbn_i64 nq,
                              double *__restrict__ pmean, double *__restrict__ pm2)
{
    __shared__ double sa[FBN_THREADS];
    __shared__ double sb[FBN_THREADS];
    const fbn_i64 blk = blockIdx.x;
    const int c = (int)(blk / nq);
    const fbn_i64 q = blk - (fbn_i64)c * nq;
    const fbn_i64 M = O * I;
    const fbn_i64 e0 = q * FBN_NCL_CHUNK;
    const fbn_i64 e1 = fbn_min(M, e0 + FBN_NCL_CHUNK);
    const int t = threadIdx.x;
    const fbn_i64 CI = (fbn_i64)C * I;
    const double k = (double)fbn_ld(x, (e0 / I) * CI + (fbn_i64)c * I + e0 % I);
    double s1 = 0.0, s2 = 0.0;
    fbn_i64 e = e0 + t;
    if (e < e1) {
        fbn_i64 i = e % I;
        fbn_i64 off = (e / I) * CI + (fbn_i64)c * I + i;
        /* advancing e by FBN_THREADS moves (o, i) by (step / I, step % I) */
        const fbn_i64 di = FBN_THREADS % I;
        const fbn_i64 jump = (FBN_THREADS / I) * CI + di;
        const fbn_i64 wrap = CI - I;
#pragma unroll 4
        for (; e < e1; e += FBN_THREADS) {
            const double d = (double)fbn_ld(x, off) - k;
            s1 += d;
            s2 += d * d;
            off += jump;
            i += di;
            if (i >= I) {
                i -= I;
                off += wrap;
            }
        }
    }
    sa[t] = s1;
    sb[t] = s2;
    fbn_tree_sum(sa, sb, t, 1, FBN_THREADS);
    if (t == 0)
        fbn_block_moments((double)(e1 - e0), k, sa[0], sb[0], pmean + blk, pm2 + blk);
}

/* NLC: rows (R, C). A block covers rows [b*rb, (b+1)*rb) of a tile of tw channels; thread
 * t = rl * tw + cl reads channel tile*tw + cl of rows rl, rl + nrl, ... so that a warp reads
 * consecutive addresses (tw = C when C <= FBN_THREADS: whole rows, nrl = FBN_THREADS / C rows
 * at a time). grid = nb * ntiles, partial index b * C + c. */
template <class S>
__device__ void fbn_stats_nlc(const S *__restrict__ x, fbn_i64 R, int C, int tw, fbn_i64 rb,
                              int ntiles, double *__restrict__ pmean, double *__restrict__ pm2)
{
    __shared__ double sa[FBN_THREADS];
    __shared__ double sb[FBN_THREADS];
    const fbn_i64 blk = blockIdx.x;
    const fbn_i64 b = blk / ntiles;
    const int tile = (int)(blk - b * ntiles);
    const int nrl = FBN_THREADS / tw;
    const int t = threadIdx.x;
    const int cl = t % tw, rl = t / tw;
    const int c = tile * tw + cl;
    const fbn_i64 r0 = b * rb;
    const fbn_i64 r1 = fbn_min(R, r0 + rb);
    double s1 = 0.0, s2 = 0.0, k = 0.0;
    if (rl < nrl && c < C) {
        k = (double)fbn_ld(x, r0 * C + c);
#pragma unroll 4
        for (fbn_i64 r = r0 + rl; r < r1; r += nrl) {
            const double d = (double)fbn_ld(x, r * C + c) - k;
            s1 += d;
            s2 += d * d;
        }
    }
    sa[t] = s1;
    sb[t] = s2;
    fbn_tree_sum(sa, sb, t, tw, nrl);
    if (rl == 0 && c < C)
        fbn_block_moments((double)(r1 - r0), k, sa[cl], sb[cl], pmean + b * C + c,
                          pm2 + b * C + c);
}

/* ------------------------------------------------------------------ per-channel coefficients
 * The elementwise passes read per-channel coefficients in the compute type CT, prepared once
 * per channel in double (as _kernels.pyx does on the host) and rounded once. */

/* Normalise: coefs = [mhi | mlo | scale | shift], each C long. */
template <class CT>
__device__ __forceinline__ void fbn_put_norm(CT *coefs, int C, int c, double mean, double scale,
                                             double shift)
{
    const CT hi = (CT)mean;
    coefs[c] = hi;
    coefs[C + c] = (CT)(mean - (double)hi);
    coefs[2 * C + c] = (CT)scale;
    coefs[3 * C + c] = (CT)shift;
}

/* 1/sqrt(var + eps), 0 where var + eps == 0 (x_hat = 0 there); NaN and inf propagate. */
__device__ __forceinline__ double fbn_invstd(double var, double eps)
{
    const double v = var + eps;
    return v == 0.0 ? 0.0 : 1.0 / sqrt(v);
}

/* ------------------------------------------------------------------ statistics, pass 2
 * One warp per channel (8 channels per block): lane l merges partials l, l+32, ... in order,
 * then the lanes merge in a fixed shuffle tree. Partial (c, q) is at c*sc + q*sq and holds
 * min(M, (q+1)*chunk) - q*chunk values. OUT mean, m2. With finalize (training forward): also
 * var = m2 / M (biased), invstd, and the normalisation coefficients. */
template <class CT>
__device__ void fbn_stats_merge(const double *__restrict__ pmean, const double *__restrict__ pm2,
                                int C, fbn_i64 nq, fbn_i64 sc, fbn_i64 sq, fbn_i64 M,
                                fbn_i64 chunk, double *__restrict__ mean,
                                double *__restrict__ m2, int finalize, double eps,
                                const double *__restrict__ weight,
                                const double *__restrict__ bias, int has_weight, int has_bias,
                                double *__restrict__ var, double *__restrict__ invstd,
                                CT *__restrict__ coefs)
{
    const int lane = threadIdx.x & 31;
    const fbn_i64 c = (fbn_i64)blockIdx.x * (FBN_THREADS / 32) + threadIdx.x / 32;
    if (c >= C) /* whole warps leave together: the shuffles below see full warps */
        return;
    double n = 0.0, mu = 0.0, s = 0.0;
    for (fbn_i64 q = lane; q < nq; q += 32) {
        const double nb = (double)(fbn_min(M, (q + 1) * chunk) - q * chunk);
        fbn_chan(n, mu, s, nb, pmean[c * sc + q * sq], pm2[c * sc + q * sq]);
    }
    for (int off = 16; off > 0; off >>= 1) {
        const double n2 = __shfl_down_sync(0xffffffffu, n, off);
        const double mu2 = __shfl_down_sync(0xffffffffu, mu, off);
        const double s2 = __shfl_down_sync(0xffffffffu, s, off);
        fbn_chan(n, mu, s, n2, mu2, s2); /* lanes >= off merge junk that lane 0 never reads */
    }
    if (lane != 0)
        return;
    mean[c] = mu;
    m2[c] = s;
    if (finalize) {
        const double v = s / (double)M;
        const double inv = fbn_invstd(v, eps);
        var[c] = v;
        invstd[c] = inv;
        fbn_put_norm<CT>(coefs, C, (int)c, mu, inv * (has_weight ? weight[c] : 1.0),
                         has_bias ? bias[c] : 0.0);
    }
}

/* Normalisation coefficients for given statistics (inference, functional normalize).
 * from_var: `stat` is a variance and invstd = 1/sqrt(stat + eps); otherwise it is invstd. */
template <class CT>
__device__ void fbn_norm_coefs(int C, const double *__restrict__ mean,
                               const double *__restrict__ stat, int from_var, double eps,
                               const double *__restrict__ weight, const double *__restrict__ bias,
                               int has_weight, int has_bias, CT *__restrict__ coefs)
{
    const int c = blockIdx.x * FBN_THREADS + threadIdx.x;
    if (c >= C)
        return;
    const double inv = from_var ? fbn_invstd(stat[c], eps) : stat[c];
    fbn_put_norm<CT>(coefs, C, c, mean[c], inv * (has_weight ? weight[c] : 1.0),
                     has_bias ? bias[c] : 0.0);
}

/* ------------------------------------------------------------------ elementwise walk
 * Thread state for the flat index f = blockIdx*blockDim + threadIdx, f += stride: the inner
 * position i and channel c, updated with adds only (a 64-bit division per element would cost
 * more than the memory access). */
struct FbnWalk {
    fbn_i64 f, i, stride, di, I, total;
    int c, dc, C;

    __device__ __forceinline__ FbnWalk(fbn_i64 total_, fbn_i64 I_, int C_)
    {
        total = total_;
        I = I_;
        C = C_;
        f = (fbn_i64)blockIdx.x * blockDim.x + threadIdx.x;
        stride = (fbn_i64)gridDim.x * blockDim.x;
        i = f % I;
        c = (int)((f / I) % C);
        di = stride % I;
        dc = (int)((stride / I) % C);
    }

    __device__ __forceinline__ void next()
    {
        f += stride;
        i += di;
        int carry = 0;
        if (i >= I) {
            i -= I;
            carry = 1;
        }
        c += dc + carry; /* < 2C */
        if (c >= C)
            c -= C;
    }
};

/* y = ((x - mhi) - mlo) * scale + shift per channel, then ReLU (y > 0 ? y : 0) if relu.
 * IN x, coefs [mhi | mlo | scale | shift]; OUT y (may be x itself: each element is read, then
 * written, by one thread). */
template <class S, class CT>
__device__ void fbn_normalize(const S *x, S *y, fbn_i64 total, fbn_i64 I, int C,
                              const CT *__restrict__ coefs, int relu)
{
    FbnWalk w(total, I, C);
    const CT *mhi = coefs, *mlo = coefs + C, *sc = coefs + 2 * C, *sh = coefs + 3 * C;
    while (w.f < total) {
        fbn_i64 f[FBN_UNROLL];
        int cc[FBN_UNROLL];
        CT v[FBN_UNROLL];
        /* all loads first: FBN_UNROLL independent requests in flight per thread */
#pragma unroll
        for (int u = 0; u < FBN_UNROLL; u++) {
            f[u] = w.f;
            cc[u] = w.c;
            v[u] = w.f < total ? fbn_ld(x, w.f) : (CT)0;
            w.next();
        }
#pragma unroll
        for (int u = 0; u < FBN_UNROLL; u++) {
            if (f[u] < total) {
                const int c = cc[u];
                CT r = ((v[u] - mhi[c]) - mlo[c]) * sc[c] + sh[c];
                if (relu)
                    r = r > (CT)0 ? r : (CT)0;
                fbn_st(y, f[u], r);
            }
        }
    }
}

/* ------------------------------------------------------------------ backward, pass 1
 * g = dy, or dy where y > 0 (the fused ReLU's mask, y the forward output) when has_y.
 * Partial sums of g and g * (x - mean) per (channel, block), same partitions as the
 * statistics. */
template <class S>
__device__ __forceinline__ double fbn_grad(const S *dy, const S *y, int has_y, fbn_i64 off)
{
    if (has_y)
        return fbn_ld(y, off) > 0 ? (double)fbn_ld(dy, off) : 0.0;
    return (double)fbn_ld(dy, off);
}

template <class S>
__device__ void fbn_bwd_ncl(const S *__restrict__ dy, const S *__restrict__ x,
                            const S *__restrict__ y, int has_y, fbn_i64 O, int C, fbn_i64 I,
                            fbn_i64 nq, const double *__restrict__ mean, double *__restrict__ p1,
                            double *__restrict__ p2)
{
    __shared__ double sa[FBN_THREADS];
    __shared__ double sb[FBN_THREADS];
    const fbn_i64 blk = blockIdx.x;
    const int c = (int)(blk / nq);
    const fbn_i64 q = blk - (fbn_i64)c * nq;
    const fbn_i64 M = O * I;
    const fbn_i64 e0 = q * FBN_NCL_CHUNK;
    const fbn_i64 e1 = fbn_min(M, e0 + FBN_NCL_CHUNK);
    const int t = threadIdx.x;
    const fbn_i64 CI = (fbn_i64)C * I;
    const double mu = mean[c];
    double s1 = 0.0, s2 = 0.0;
    fbn_i64 e = e0 + t;
    if (e < e1) {
        fbn_i64 i = e % I;
        fbn_i64 off = (e / I) * CI + (fbn_i64)c * I + i;
        const fbn_i64 di = FBN_THREADS % I;
        const fbn_i64 jump = (FBN_THREADS / I) * CI + di;
        const fbn_i64 wrap = CI - I;
#pragma unroll 4
        for (; e < e1; e += FBN_THREADS) {
            const double g = fbn_grad(dy, y, has_y, off);
            s1 += g;
            s2 += g * ((double)fbn_ld(x, off) - mu);
            off += jump;
            i += di;
            if (i >= I) {
                i -= I;
                off += wrap;
            }
        }
    }
    sa[t] = s1;
    sb[t] = s2;
    fbn_tree_sum(sa, sb, t, 1, FBN_THREADS);
    if (t == 0) {
        p1[blk] = sa[0];
        p2[blk] = sb[0];
    }
}

template <class S>
__device__ void fbn_bwd_nlc(const S *__restrict__ dy, const S *__restrict__ x,
                            const S *__restrict__ y, int has_y, fbn_i64 R, int C, int tw,
                            fbn_i64 rb, int ntiles, const double *__restrict__ mean,
                            double *__restrict__ p1, double *__restrict__ p2)
{
    __shared__ double sa[FBN_THREADS];
    __shared__ double sb[FBN_THREADS];
    const fbn_i64 blk = blockIdx.x;
    const fbn_i64 b = blk / ntiles;
    const int tile = (int)(blk - b * ntiles);
    const int nrl = FBN_THREADS / tw;
    const int t = threadIdx.x;
    const int cl = t % tw, rl = t / tw;
    const int c = tile * tw + cl;
    const fbn_i64 r0 = b * rb;
    const fbn_i64 r1 = fbn_min(R, r0 + rb);
    double s1 = 0.0, s2 = 0.0;
    if (rl < nrl && c < C) {
        const double mu = mean[c];
#pragma unroll 4
        for (fbn_i64 r = r0 + rl; r < r1; r += nrl) {
            const fbn_i64 off = r * C + c;
            const double g = fbn_grad(dy, y, has_y, off);
            s1 += g;
            s2 += g * ((double)fbn_ld(x, off) - mu);
        }
    }
    sa[t] = s1;
    sb[t] = s2;
    fbn_tree_sum(sa, sb, t, tw, nrl);
    if (rl == 0 && c < C) {
        p1[b * C + c] = sa[cl];
        p2[b * C + c] = sb[cl];
    }
}

/* dx coefficients [mhi | mlo | a | k | cc], as backward_dx in _kernels.pyx:
 * training: a = invstd*weight, k = a*invstd^2*sum_dy_xmu/count, cc = -a*sum_dy/count;
 * inference: k = cc = 0. */
template <class CT>
__device__ __forceinline__ void fbn_put_dx(CT *coefs, int C, int c, double mean, double inv,
                                           double wt, double s1, double s2, double count,
                                           int training)
{
    const double a = inv * wt;
    double k = 0.0, cc = 0.0;
    if (training && count > 0) {
        k = a * inv * inv * s2 / count;
        cc = -a * s1 / count;
    }
    const CT hi = (CT)mean;
    coefs[c] = hi;
    coefs[C + c] = (CT)(mean - (double)hi);
    coefs[2 * C + c] = (CT)a;
    coefs[3 * C + c] = (CT)k;
    coefs[4 * C + c] = (CT)cc;
}

/* ------------------------------------------------------------------ backward, pass 2
 * Per channel: sum_dy, sum_dy_xmu (double), summed in a fixed order (one warp per channel, as
 * fbn_stats_merge). With finalize: also dweight = sum_dy_xmu*invstd, dbias = sum_dy (CT) and
 * the dx coefficients. */
template <class CT>
__device__ void fbn_bwd_merge(const double *__restrict__ p1, const double *__restrict__ p2, int C,
                              fbn_i64 nq, fbn_i64 sc, fbn_i64 sq, double *__restrict__ sum_dy,
                              double *__restrict__ sum_dy_xmu, int finalize,
                              const double *__restrict__ mean, const double *__restrict__ invstd,
                              const double *__restrict__ weight, int has_weight, double count,
                              int training, CT *__restrict__ dweight, CT *__restrict__ dbias,
                              CT *__restrict__ coefs)
{
    const int lane = threadIdx.x & 31;
    const fbn_i64 c = (fbn_i64)blockIdx.x * (FBN_THREADS / 32) + threadIdx.x / 32;
    if (c >= C)
        return;
    double s1 = 0.0, s2 = 0.0;
    for (fbn_i64 q = lane; q < nq; q += 32) {
        s1 += p1[c * sc + q * sq];
        s2 += p2[c * sc + q * sq];
    }
    for (int off = 16; off > 0; off >>= 1) {
        s1 += __shfl_down_sync(0xffffffffu, s1, off);
        s2 += __shfl_down_sync(0xffffffffu, s2, off);
    }
    if (lane != 0)
        return;
    sum_dy[c] = s1;
    sum_dy_xmu[c] = s2;
    if (finalize) {
        const double inv = invstd[c];
        dweight[c] = (CT)(s2 * inv);
        dbias[c] = (CT)s1;
        fbn_put_dx<CT>(coefs, C, (int)c, mean[c], inv, has_weight ? weight[c] : 1.0, s1, s2,
                       count, training);
    }
}

/* dx coefficients from given sums (functional backward_dx). */
template <class CT>
__device__ void fbn_dx_coefs(int C, const double *__restrict__ mean,
                             const double *__restrict__ invstd, const double *__restrict__ weight,
                             int has_weight, const double *__restrict__ sum_dy,
                             const double *__restrict__ sum_dy_xmu, double count, int training,
                             CT *__restrict__ coefs)
{
    const int c = blockIdx.x * FBN_THREADS + threadIdx.x;
    if (c >= C)
        return;
    fbn_put_dx<CT>(coefs, C, c, mean[c], invstd[c], has_weight ? weight[c] : 1.0, sum_dy[c],
                   sum_dy_xmu[c], count, training);
}

/* dx = a*g - k*((x - mhi) - mlo) + cc with g as in fbn_grad (training); dx = a*g (inference,
 * where x is not read). IN dy, x, y (if has_y), coefs; OUT dx (may be dy itself). */
template <class S, class CT>
__device__ void fbn_backward_dx(const S *dy, const S *x, const S *y, int has_y, S *dx,
                                fbn_i64 total, fbn_i64 I, int C, const CT *__restrict__ coefs,
                                int training)
{
    FbnWalk w(total, I, C);
    const CT *mhi = coefs, *mlo = coefs + C, *a = coefs + 2 * C, *k = coefs + 3 * C,
             *cc = coefs + 4 * C;
    while (w.f < total) {
        fbn_i64 f[FBN_UNROLL];
        int ch[FBN_UNROLL];
        CT g[FBN_UNROLL], xv[FBN_UNROLL];
#pragma unroll
        for (int u = 0; u < FBN_UNROLL; u++) {
            f[u] = w.f;
            ch[u] = w.c;
            g[u] = (CT)0;
            xv[u] = (CT)0;
            if (w.f < total) {
                g[u] = fbn_ld(dy, w.f);
                if (has_y && !(fbn_ld(y, w.f) > 0))
                    g[u] = (CT)0;
                if (training)
                    xv[u] = fbn_ld(x, w.f);
            }
            w.next();
        }
#pragma unroll
        for (int u = 0; u < FBN_UNROLL; u++) {
            if (f[u] < total) {
                const int c = ch[u];
                CT r = a[c] * g[u];
                if (training)
                    r = r - k[c] * ((xv[u] - mhi[c]) - mlo[c]) + cc[c];
                fbn_st(dx, f[u], r);
            }
        }
    }
}

/* ------------------------------------------------------------------ extern "C" entry points
 * One symbol per (kernel, dtype): _f32 (float), _f64 (double), _f16 (float16 storage, float
 * compute). Scalars: fbn_i64 is int64, int is int32, double is float64 (kernels.py passes
 * NumPy scalars of exactly these types). Pointers to per-channel double arrays are never
 * NULL: a has_* flag says whether the array is meaningful. */

#define FBN_DEFINE(SFX, S, CT)                                                                   \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_stats_ncl_##SFX(const S *x, fbn_i64 O, int C, fbn_i64 I, fbn_i64 nq, double *pmean,         \
                    double *pm2)                                                                \
{                                                                                               \
    fbn_stats_ncl<S>(x, O, C, I, nq, pmean, pm2);                                               \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_stats_nlc_##SFX(const S *x, fbn_i64 R, int C, int tw, fbn_i64 rb, int ntiles,               \
                    double *pmean, double *pm2)                                                 \
{                                                                                               \
    fbn_stats_nlc<S>(x, R, C, tw, rb, ntiles, pmean, pm2);                                      \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_stats_merge_##SFX(const double *pmean, const double *pm2, int C, fbn_i64 nq, fbn_i64 sc,    \
                      fbn_i64 sq, fbn_i64 M, fbn_i64 chunk, double *mean, double *m2,           \
                      int finalize, double eps, const double *weight, const double *bias,       \
                      int has_weight, int has_bias, double *var, double *invstd, CT *coefs)     \
{                                                                                               \
    fbn_stats_merge<CT>(pmean, pm2, C, nq, sc, sq, M, chunk, mean, m2, finalize, eps, weight,   \
                        bias, has_weight, has_bias, var, invstd, coefs);                        \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_norm_coefs_##SFX(int C, const double *mean, const double *stat, int from_var, double eps,   \
                     const double *weight, const double *bias, int has_weight, int has_bias,    \
                     CT *coefs)                                                                 \
{                                                                                               \
    fbn_norm_coefs<CT>(C, mean, stat, from_var, eps, weight, bias, has_weight, has_bias,        \
                       coefs);                                                                  \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_normalize_##SFX(const S *x, S *y, fbn_i64 total, fbn_i64 I, int C, const CT *coefs,         \
                    int relu)                                                                   \
{                                                                                               \
    fbn_normalize<S, CT>(x, y, total, I, C, coefs, relu);                                       \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_bwd_ncl_##SFX(const S *dy, const S *x, const S *y, int has_y, fbn_i64 O, int C, fbn_i64 I,  \
                  fbn_i64 nq, const double *mean, double *p1, double *p2)                       \
{                                                                                               \
    fbn_bwd_ncl<S>(dy, x, y, has_y, O, C, I, nq, mean, p1, p2);                                 \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_bwd_nlc_##SFX(const S *dy, const S *x, const S *y, int has_y, fbn_i64 R, int C, int tw,     \
                  fbn_i64 rb, int ntiles, const double *mean, double *p1, double *p2)           \
{                                                                                               \
    fbn_bwd_nlc<S>(dy, x, y, has_y, R, C, tw, rb, ntiles, mean, p1, p2);                        \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_bwd_merge_##SFX(const double *p1, const double *p2, int C, fbn_i64 nq, fbn_i64 sc,          \
                    fbn_i64 sq, double *sum_dy, double *sum_dy_xmu, int finalize,               \
                    const double *mean, const double *invstd, const double *weight,             \
                    int has_weight, double count, int training, CT *dweight, CT *dbias,         \
                    CT *coefs)                                                                  \
{                                                                                               \
    fbn_bwd_merge<CT>(p1, p2, C, nq, sc, sq, sum_dy, sum_dy_xmu, finalize, mean, invstd,        \
                      weight, has_weight, count, training, dweight, dbias, coefs);              \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_dx_coefs_##SFX(int C, const double *mean, const double *invstd, const double *weight,       \
                   int has_weight, const double *sum_dy, const double *sum_dy_xmu,              \
                   double count, int training, CT *coefs)                                       \
{                                                                                               \
    fbn_dx_coefs<CT>(C, mean, invstd, weight, has_weight, sum_dy, sum_dy_xmu, count, training,  \
                     coefs);                                                                    \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(FBN_THREADS)                                       \
fbn_backward_dx_##SFX(const S *dy, const S *x, const S *y, int has_y, S *dx, fbn_i64 total,     \
                      fbn_i64 I, int C, const CT *coefs, int training)                          \
{                                                                                               \
    fbn_backward_dx<S, CT>(dy, x, y, has_y, dx, total, I, C, coefs, training);                  \
}

FBN_DEFINE(f32, float, float)
FBN_DEFINE(f64, double, double)
FBN_DEFINE(f16, unsigned short, float)

#undef FBN_DEFINE
