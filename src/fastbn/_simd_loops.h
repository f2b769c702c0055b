/*
 * The loop bodies of the fastbn kernels, written once and compiled once per (dtype, ISA level).
 *
 * _simd.h includes this file six times, with
 *   FBN_T     the element type (float or double),
 *   FBN_VB    the bytes of one vector register of the level (16 baseline SSE2, 32 x86-64-v3,
 *             64 x86-64-v4): every accumulator is one native register,
 *   FBN_SFX   the suffix of the names (float_v3, ...): fbn_sums_float_v3 is a real function
 *             with real line numbers for compilers, profilers and debuggers,
 * inside `#pragma GCC target("arch=...")` for the levels above baseline. All names it defines
 * are suffixed, and it #undefs its own macros at the end.
 *
 * The statistics and gradient sums walk memory in order, one contiguous run of segments per
 * call (NCHW-style: segment s of a run belongs to channel (c0 + s) % C), or a block of rows
 * (channels-last, one accumulator lane per channel position). They never allocate, never fail
 * and never touch Python. Results depend on the level (vector width, FMA contraction), never on
 * the thread count: the partition into calls is fixed by _kernels.pyx.
 */

#define T FBN_T
#define FBN_N ((int)(FBN_VB / sizeof(FBN_T)))      /* lanes of T per register */
#define FBN_ND ((int)(FBN_VB / sizeof(double)))    /* lanes of double per register */
#define FBN_CAT_(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT_(a, b)
#define FBN_FN(name) FBN_CAT(fbn_##name, FBN_SFX)

/* ---------------------------------------------------------------- the level's vector type
 * vt: one register of T; vd: one register of double (the widened block sums).
 * GCC (>= 12) and Clang vector extensions keep them in registers; other compilers (and
 * -DFASTBN_NO_VECTOR_EXT) get structs of lanes and the same arithmetic in the same order. */
#if FBN_VECTOR_EXT
typedef T FBN_FN(vt) __attribute__((vector_size(FBN_VB)));
typedef double FBN_FN(vd) __attribute__((vector_size(FBN_VB)));
#define vt FBN_FN(vt)
#define vd FBN_FN(vd)
static inline vt FBN_FN(vzero)(void) { return (vt){0}; }
static inline vd FBN_FN(dzero)(void) { return (vd){0}; }
static inline vt FBN_FN(vload)(const T *p) { vt v; memcpy(&v, p, sizeof(v)); return v; }
static inline vt FBN_FN(vsubs)(vt a, T s) { return a - s; }
static inline vt FBN_FN(vadd)(vt a, vt b) { return a + b; }
static inline vd FBN_FN(dadd)(vd a, vd b) { return a + b; }
/* acc + a * b in one expression (contracted to an FMA where the level has one) */
static inline vt FBN_FN(vmadd)(vt acc, vt a, vt b) { return acc + a * b; }
/* g where y > 0, else 0: a select on the compare's all-ones/zeros lanes */
static inline vt FBN_FN(vmask)(vt g, vt y)
{
    return (vt)((__typeof__(y > y))g & (y > FBN_FN(vzero)()));
}
/* v with its first n lanes zeroed (0 <= n < FBN_N): a mask loaded from a 0/-1 table */
static inline vt FBN_FN(vdrop)(vt v, int n)
{
    __typeof__(v > v) m;
    memcpy(&m, (sizeof(T) == 4 ? (const void *)(fbn_tail32 + 16 - n)
                                : (const void *)(fbn_tail64 + 8 - n)), sizeof(m));
    return (vt)((__typeof__(v > v))v & m);
}
/* lanes j and j + FBN_N/2 of a float block, added in double (a double block as it is) */
static inline vd FBN_FN(widen)(vt b)
{
#if FBN_TF
    typedef float vh __attribute__((vector_size(FBN_VB / 2)));
    vh lo, hi;
    memcpy(&lo, &b, sizeof(lo));
    memcpy(&hi, (const char *)&b + sizeof(lo), sizeof(hi));
    return __builtin_convertvector(lo, vd) + __builtin_convertvector(hi, vd);
#else
    return b;
#endif
}
#else /* structs of lanes */
typedef struct { T v[FBN_N]; } FBN_FN(vt);
typedef struct { double v[FBN_ND]; } FBN_FN(vd);
#define vt FBN_FN(vt)
#define vd FBN_FN(vd)
static inline vt FBN_FN(vzero)(void) { vt r = {{0}}; return r; }
static inline vd FBN_FN(dzero)(void) { vd r = {{0}}; return r; }
static inline vt FBN_FN(vload)(const T *p) { vt v; memcpy(&v, p, sizeof(v)); return v; }
static inline vt FBN_FN(vsubs)(vt a, T s) { for (int j = 0; j < FBN_N; j++) a.v[j] -= s; return a; }
static inline vt FBN_FN(vadd)(vt a, vt b) { for (int j = 0; j < FBN_N; j++) a.v[j] += b.v[j]; return a; }
static inline vd FBN_FN(dadd)(vd a, vd b) { for (int j = 0; j < FBN_ND; j++) a.v[j] += b.v[j]; return a; }
static inline vt FBN_FN(vmadd)(vt acc, vt a, vt b)
{
    for (int j = 0; j < FBN_N; j++)
        acc.v[j] = acc.v[j] + a.v[j] * b.v[j];
    return acc;
}
static inline vt FBN_FN(vmask)(vt g, vt y)
{
    for (int j = 0; j < FBN_N; j++)
        g.v[j] = y.v[j] > 0 ? g.v[j] : (T)0;
    return g;
}
static inline vt FBN_FN(vdrop)(vt v, int n) { for (int j = 0; j < n; j++) v.v[j] = 0; return v; }
static inline vd FBN_FN(widen)(vt b)
{
    vd r;
#if FBN_TF
    for (int j = 0; j < FBN_ND; j++)
        r.v[j] = (double)b.v[j] + (double)b.v[j + FBN_ND];
#else
    memcpy(&r, &b, sizeof(r));
#endif
    return r;
}
#endif

/* The lanes of a register folded pairwise (lane j += lane j + w for w = N/2, N/4, ..., 1): in
 * T for a one-block segment (a block's float sums are already rounded to float, and folding
 * them first is cheaper than widening), in double for the widened accumulators. */
static inline double FBN_FN(sumt)(vt v)
{
    T a[FBN_N];
    memcpy(a, &v, sizeof(a));
    for (int w = FBN_N / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            a[j] += a[j + w];
    return (double)a[0];
}
static inline double FBN_FN(sumd)(vd v)
{
    double a[FBN_ND];
    memcpy(a, &v, sizeof(a));
    for (int w = FBN_ND / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            a[j] += a[j + w];
    return a[0];
}

/* The last len - i < N values of a segment of len values as one register: the segment's last
 * N values with the ones already summed replaced by `pad` (no scalar loop), or, in a segment
 * shorter than N, a copy padded with `pad`. The caller subtracts pad-like shifts so padded lanes
 * add exactly zero. */
static inline vt FBN_FN(vtail)(const T *xs, ptrdiff_t i, ptrdiff_t len, T pad)
{
    if (len >= FBN_N) {
        vt v = FBN_FN(vsubs)(FBN_FN(vload)(xs + len - FBN_N), pad);
        return FBN_FN(vdrop)(v, FBN_N - (int)(len - i));
    }
    T t[FBN_N];
    for (int j = 0; j < FBN_N; j++)
        t[j] = j < len ? xs[j] : pad;
    return FBN_FN(vsubs)(FBN_FN(vload)(t), pad);
}

/* s1[o] += sum(x - k[c]), s2[o] += sum((x - k[c])^2) for each of nseg segments of len values,
 * contiguous in memory order: segment s belongs to channel c = (c0 + s) % C and adds into slot
 * o = c when by_channel (runs that span every channel), else o = s (a slot per segment).
 * Walking memory in order keeps the prefetchers streaming: gathering one channel's segments,
 * C * len values apart, ran at a third of the speed (7-16 GB/s) once x left L2.
 * A block is at most FBN_BLOCK registers per segment, summed in T by two independent pairs of
 * accumulators (even and odd registers: the adds' latency, not the loads, had bounded one pair),
 * then either folded straight into t1, t2 (a one-block segment: 7x7 maps) or widened into the
 * double lanes a1, a2.
 * IN x, k[C]; INOUT s1, s2 */
static void FBN_FN(sums)(const T *FBN_RESTRICT x, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0,
                         ptrdiff_t C, const T *FBN_RESTRICT k, int by_channel,
                         double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)
{
    const ptrdiff_t N = FBN_N;
    const int one_block = len <= FBN_BLOCK * N;
    ptrdiff_t c = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const T *xs = x + s * len;
        const T kc = k[c];
        vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
        double t1 = 0.0, t2 = 0.0;
        ptrdiff_t i = 0;
        while (i < len) {
            vt p1 = FBN_FN(vzero)(), p2 = p1, q1 = p1, q2 = p1, v, w;
            int q = 0;
            if (i + FBN_BLOCK * N <= len) { /* a whole block, unrolled: the same sums */
                FBN_PRAGMA(GCC unroll 8)
                for (int u = 0; u < FBN_BLOCK; u += 2) {
                    v = FBN_FN(vsubs)(FBN_FN(vload)(xs + i + u * N), kc);
                    w = FBN_FN(vsubs)(FBN_FN(vload)(xs + i + (u + 1) * N), kc);
                    p1 = FBN_FN(vadd)(p1, v);
                    p2 = FBN_FN(vmadd)(p2, v, v);
                    q1 = FBN_FN(vadd)(q1, w);
                    q2 = FBN_FN(vmadd)(q2, w, w);
                }
                q = FBN_BLOCK;
                i += FBN_BLOCK * N;
            }
            for (; q + 2 <= FBN_BLOCK && i + 2 * N <= len; q += 2, i += 2 * N) {
                v = FBN_FN(vsubs)(FBN_FN(vload)(xs + i), kc);
                w = FBN_FN(vsubs)(FBN_FN(vload)(xs + i + N), kc);
                p1 = FBN_FN(vadd)(p1, v);
                p2 = FBN_FN(vmadd)(p2, v, v);
                q1 = FBN_FN(vadd)(q1, w);
                q2 = FBN_FN(vmadd)(q2, w, w);
            }
            if (q < FBN_BLOCK && i + N <= len) {
                v = FBN_FN(vsubs)(FBN_FN(vload)(xs + i), kc);
                p1 = FBN_FN(vadd)(p1, v);
                p2 = FBN_FN(vmadd)(p2, v, v);
                q++;
                i += N;
            }
            if (q < FBN_BLOCK && i < len) {
                w = FBN_FN(vtail)(xs, i, len, kc);
                q1 = FBN_FN(vadd)(q1, w);
                q2 = FBN_FN(vmadd)(q2, w, w);
                i = len;
            }
            p1 = FBN_FN(vadd)(p1, q1);
            p2 = FBN_FN(vadd)(p2, q2);
            if (one_block) {
                t1 = FBN_FN(sumt)(p1);
                t2 = FBN_FN(sumt)(p2);
            } else {
                a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(p1));
                a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(p2));
            }
        }
        if (!one_block) {
            t1 = FBN_FN(sumd)(a1);
            t2 = FBN_FN(sumd)(a2);
        }
        s1[by_channel ? c : s] += t1;
        s2[by_channel ? c : s] += t2;
        if (++c == C)
            c = 0;
    }
}

/* Rows of a channels-last block: a1[j] += x[r, j] - k[j], a2[j] += (x[r, j] - k[j])^2.
 * FBN_ROWS rows per pass: each lane sums its values in registers (in T), then updates its
 * double accumulators once. One row per pass loaded and stored both accumulators for every
 * value, which held the loop to 18-29 GB/s in cache.
 * IN x (nrows rows of `width` values, `stride` apart), k[width]; INOUT a1[width], a2[width] */
static void FBN_FN(sums_rows)(const T *FBN_RESTRICT x, ptrdiff_t nrows, ptrdiff_t stride,
                              ptrdiff_t width, const T *FBN_RESTRICT k,
                              double *FBN_RESTRICT a1, double *FBN_RESTRICT a2)
{
    ptrdiff_t r = 0;
    for (; r + FBN_ROWS <= nrows; r += FBN_ROWS) {
        const T *xr = x + r * stride;
        FBN_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            T kj = k[j], s1 = 0, s2 = 0;
            for (int q = 0; q < FBN_ROWS; q++) {
                T d = xr[q * stride + j] - kj;
                s1 += d;
                s2 += d * d;
            }
            a1[j] += s1;
            a2[j] += s2;
        }
    }
    for (; r < nrows; r++) {
        const T *xr = x + r * stride;
        FBN_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            double d = (double)xr[j] - (double)k[j];
            a1[j] += d;
            a2[j] += d * d;
        }
    }
}

/* y = (x - mhi) * a + b (then ReLU) over a contiguous run of nseg segments of len values in
 * memory order, segment s belonging to channel (c0 + s) % C, whose parameters are mhi[c], a[c],
 * b[c]. Walking memory in order streams best; one call per run (not per segment) keeps short
 * segments (7x7 maps) cheap. mhi is the mean rounded to T and b absorbs the rest (b = shift -
 * (mean - mhi) * a): x - mhi is exact when |mean| >> std, so y keeps its digits where x * a +
 * (shift - mean * a) would lose them; and a third parameter row instead of a fourth was worth
 * ~1.3x to the channels-last loop out of cache.
 * IN x, mhi/a/b[C]; OUT y (may alias x) */
static void FBN_FN(norm)(const T *x, T *y, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0,
                         ptrdiff_t C, const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                         const T *FBN_RESTRICT b, int relu)
{
    ptrdiff_t c = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const T *xs = x + s * len;
        T *ys = y + s * len;
        const T h = mhi[c], m = a[c], o = b[c];
        if (relu) {
            FBN_SIMD
            for (ptrdiff_t i = 0; i < len; i++) {
                T v = (xs[i] - h) * m + o;
                ys[i] = v > 0 ? v : (T)0;
            }
        } else {
            FBN_SIMD
            for (ptrdiff_t i = 0; i < len; i++)
                ys[i] = (xs[i] - h) * m + o;
        }
        if (++c == C)
            c = 0;
    }
}

/* Rows of a channels-last block, per-lane parameters (see fbn_norm).
 * IN x, mhi/a/b[width]; OUT y (may alias x) */
static void FBN_FN(norm_rows)(const T *x, T *y, ptrdiff_t nrows, ptrdiff_t stride,
                              ptrdiff_t width, const T *FBN_RESTRICT mhi,
                              const T *FBN_RESTRICT a, const T *FBN_RESTRICT b, int relu)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *xr = x + r * stride;
        T *yr = y + r * stride;
        if (relu) {
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                T v = (xr[j] - mhi[j]) * a[j] + b[j];
                yr[j] = v > 0 ? v : (T)0;
            }
        } else {
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                yr[j] = (xr[j] - mhi[j]) * a[j] + b[j];
        }
    }
}

/* s1[o] += sum(g), s2[o] += sum(g * ((x - mhi[c]) - mlo[c])) with g = dy, or dy masked by y > 0
 * when y != NULL, over nseg segments in memory order (channels, slots and blocks as in
 * fbn_sums). mhi + mlo is the channel's mean split into a T-precision head and tail. The ReLU
 * mask is a select on loaded values (a conditional load stays a branch).
 * IN dy, x, y (or NULL), mhi/mlo[C]; INOUT s1, s2 */
static void FBN_FN(bwd_sums)(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,
                             const T *FBN_RESTRICT y, ptrdiff_t nseg, ptrdiff_t len,
                             ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT mhi,
                             const T *FBN_RESTRICT mlo, int by_channel,
                             double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)
{
    const ptrdiff_t N = FBN_N;
    const int one_block = len <= FBN_BLOCK * N;
    ptrdiff_t c = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const T *gs = dy + s * len, *xs = x + s * len, *ys = y ? y + s * len : NULL;
        const T h = mhi[c], l = mlo[c];
        vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
        double t1 = 0.0, t2 = 0.0;
        ptrdiff_t i = 0;
        while (i < len) {
            vt b1 = FBN_FN(vzero)(), b2 = b1, g, v;
            int q = 0;
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
                g = FBN_FN(vload)(gs + i);
                if (ys)
                    g = FBN_FN(vmask)(g, FBN_FN(vload)(ys + i));
                v = FBN_FN(vsubs)(FBN_FN(vsubs)(FBN_FN(vload)(xs + i), h), l);
                b1 = FBN_FN(vadd)(b1, g);
                b2 = FBN_FN(vmadd)(b2, g, v);
            }
            if (q < FBN_BLOCK && i < len) { /* the last values, as in fbn_sums (g = 0 pads) */
                if (len >= N) {
                    g = FBN_FN(vload)(gs + len - N);
                    if (ys)
                        g = FBN_FN(vmask)(g, FBN_FN(vload)(ys + len - N));
                    g = FBN_FN(vdrop)(g, (int)(N - (len - i)));
                    v = FBN_FN(vload)(xs + len - N);
                } else {
                    T tg[FBN_N], tx[FBN_N];
                    for (int j = 0; j < N; j++) {
                        tg[j] = j < len && (!ys || ys[j] > 0) ? gs[j] : (T)0;
                        tx[j] = j < len ? xs[j] : h;
                    }
                    g = FBN_FN(vload)(tg);
                    v = FBN_FN(vload)(tx);
                }
                v = FBN_FN(vsubs)(FBN_FN(vsubs)(v, h), l);
                b1 = FBN_FN(vadd)(b1, g);
                b2 = FBN_FN(vmadd)(b2, g, v);
                i = len;
            }
            if (one_block) {
                t1 = FBN_FN(sumt)(b1);
                t2 = FBN_FN(sumt)(b2);
            } else {
                a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(b1));
                a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(b2));
            }
        }
        if (!one_block) {
            t1 = FBN_FN(sumd)(a1);
            t2 = FBN_FN(sumd)(a2);
        }
        s1[by_channel ? c : s] += t1;
        s2[by_channel ? c : s] += t2;
        if (++c == C)
            c = 0;
    }
}

/* Rows of a channels-last block (see fbn_bwd_sums), per-lane mhi/mlo, FBN_BROWS rows per pass
 * summed in registers as in fbn_sums_rows (one row per pass was 1.4-1.8x slower in cache).
 * IN dy, x, y (or NULL), mhi/mlo[width]; INOUT a1[width], a2[width] */
static void FBN_FN(bwd_sums_rows)(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,
                                  const T *FBN_RESTRICT y, ptrdiff_t nrows, ptrdiff_t stride,
                                  ptrdiff_t width, const T *FBN_RESTRICT mhi,
                                  const T *FBN_RESTRICT mlo, double *FBN_RESTRICT a1,
                                  double *FBN_RESTRICT a2)
{
    ptrdiff_t r = 0;
    for (; r + FBN_BROWS <= nrows; r += FBN_BROWS) {
        const T *dyr = dy + r * stride, *xr = x + r * stride;
        if (y) {
            const T *yr = y + r * stride;
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                T h = mhi[j], l = mlo[j], s1 = 0, s2 = 0;
                for (int q = 0; q < FBN_BROWS; q++) {
                    T d = dyr[q * stride + j], g = yr[q * stride + j] > 0 ? d : (T)0;
                    s1 += g;
                    s2 += g * ((xr[q * stride + j] - h) - l);
                }
                a1[j] += s1;
                a2[j] += s2;
            }
        } else {
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                T h = mhi[j], l = mlo[j], s1 = 0, s2 = 0;
                for (int q = 0; q < FBN_BROWS; q++) {
                    T g = dyr[q * stride + j];
                    s1 += g;
                    s2 += g * ((xr[q * stride + j] - h) - l);
                }
                a1[j] += s1;
                a2[j] += s2;
            }
        }
    }
    for (; r < nrows; r++) {
        const T *dyr = dy + r * stride, *xr = x + r * stride;
        const T *yr = y ? y + r * stride : NULL;
        for (ptrdiff_t j = 0; j < width; j++) {
            double g = yr ? (yr[j] > 0 ? (double)dyr[j] : 0.0) : (double)dyr[j];
            a1[j] += g;
            a2[j] += g * (((double)xr[j] - (double)mhi[j]) - (double)mlo[j]);
        }
    }
}

/* dx = a*g - k*(x - mhi) + c with g as in fbn_bwd_sums, over a contiguous run of nseg segments
 * as in fbn_norm (parameters per channel; c absorbs k * (mean - mhi) as b does there); k = c = 0
 * is the inference backward.
 * IN dy, x, y (or NULL), mhi/a/k/c[C]; OUT dx (may alias dy) */
static void FBN_FN(bwd_dx)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                           T *dx, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,
                           const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                           const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)
{
    ptrdiff_t ch = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const T *gs = dy + s * len, *xs = x + s * len;
        T *ds = dx + s * len;
        const T h = mhi[ch], m = a[ch], q = k[ch], o = c[ch];
        if (y) {
            const T *ys = y + s * len;
            FBN_SIMD
            for (ptrdiff_t i = 0; i < len; i++) {
                T d = gs[i], g = ys[i] > 0 ? d : (T)0;
                ds[i] = m * g - q * (xs[i] - h) + o;
            }
        } else {
            FBN_SIMD
            for (ptrdiff_t i = 0; i < len; i++)
                ds[i] = m * gs[i] - q * (xs[i] - h) + o;
        }
        if (++ch == C)
            ch = 0;
    }
}

/* Rows of a channels-last block (see fbn_bwd_dx), per-lane parameters.
 * IN dy, x, y (or NULL), mhi/a/k/c[width]; OUT dx (may alias dy) */
static void FBN_FN(bwd_dx_rows)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                                T *dx, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t width,
                                const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                                const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *dyr = dy + r * stride, *xr = x + r * stride;
        T *dxr = dx + r * stride;
        if (y) {
            const T *yr = y + r * stride;
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                T d = dyr[j], g = yr[j] > 0 ? d : (T)0;
                dxr[j] = a[j] * g - k[j] * (xr[j] - mhi[j]) + c[j];
            }
        } else {
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                dxr[j] = a[j] * dyr[j] - k[j] * (xr[j] - mhi[j]) + c[j];
        }
    }
}

#if FBN_TF
/* The read-only bandwidth probe at this level (stream_read): the 64-bit words of n bytes
 * (n a multiple of 8) summed in four register-wide accumulators. */
static uint64_t FBN_CAT(fbn_stream_read, FBN_LEVEL)(const unsigned char *p, ptrdiff_t n)
{
#if FBN_VECTOR_EXT
    typedef uint64_t vu __attribute__((vector_size(FBN_VB)));
    const ptrdiff_t V = FBN_VB;
    vu s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t;
    ptrdiff_t i = 0;
    for (; i + 4 * V <= n; i += 4 * V) {
        memcpy(&t, p + i, V); s0 += t;
        memcpy(&t, p + i + V, V); s1 += t;
        memcpy(&t, p + i + 2 * V, V); s2 += t;
        memcpy(&t, p + i + 3 * V, V); s3 += t;
    }
    s0 += s1 + s2 + s3;
    uint64_t r = 0, w;
    for (int j = 0; j < (int)(V / 8); j++)
        r += s0[j];
#else
    uint64_t r = 0, w, u[4] = {0, 0, 0, 0};
    ptrdiff_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 4; j++) {
            memcpy(&w, p + i + 8 * j, 8);
            u[j] += w;
        }
    r = u[0] + u[1] + u[2] + u[3];
#endif
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        r += w;
    }
    return r;
}
#endif

#undef vt
#undef vd
#undef FBN_FN
#undef FBN_CAT
#undef FBN_CAT_
#undef FBN_N
#undef FBN_ND
#undef T
