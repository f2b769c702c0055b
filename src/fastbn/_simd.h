/*
 * Innermost loops of the fastbn kernels, one function per (operation, layout, dtype).
 *
 * The Cython kernels (_kernels.pyx) own the partition of the work, the threads and the merging
 * of partial results; these functions only stream over a contiguous run of segments in memory
 * order (NCHW-style: segment s of a run belongs to channel (c0 + s) % C) or over a block of rows
 * (channels-last, one accumulator lane per channel position).
 * They never allocate, never fail and never touch Python.
 *
 * Why C and not Cython for these loops: reductions need several independent accumulators and
 * `omp simd` to vectorise without -ffast-math, and GCC's target_clones lets a portable build
 * (no -march=native) still run AVX2/AVX-512 code on CPUs that have it, chosen once at load time.
 * The result depends on the clone (FMA contraction), never on the thread count.
 *
 * Precision: statistics and gradient sums are taken on values shifted by a per-channel constant
 * (a sample of the channel, or the mean), so that a mean much larger than the standard deviation
 * costs no accuracy (never E[x^2] - E[x]^2). float64 input accumulates in double. float32 input
 * forms each difference, square and product in float and sums at most FBN_BLOCK of them per
 * lane in float before adding them into double lanes: a few float roundings per value (relative
 * 1e-7, far inside the 1e-5 contract) for twice the throughput of converting every value to
 * double, which had held these loops to ~30 GB/s a core.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(__AVX2__) && !defined(FASTBN_NO_CLONES)
#define FBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FBN_CLONES
#endif

#if defined(_MSC_VER)
#define FBN_RESTRICT __restrict
#else
#define FBN_RESTRICT __restrict__
#endif

#if defined(_OPENMP) || defined(__clang__) || defined(__GNUC__)
#define FBN_PRAGMA(x) _Pragma(#x)
#define FBN_SIMD FBN_PRAGMA(omp simd)
#else
#define FBN_SIMD
#endif

/* Values each lane sums in the working precision before adding them into its double lane. */
#define FBN_BLOCK 8

/* Rows of a channels-last block summed in registers (in T, like FBN_BLOCK) before each update
 * of the double accumulators: 8 for the statistics (x), 4 for the backward sums, which read
 * two or three arrays, so 8 rows were 16-24 streams side by side (17 GB/s against 20-27 for 4
 * from L3, 20 against 28-42 in cache; 2 rows were slower again). */
#define FBN_ROWS 8
#define FBN_BROWS 4

/* One 64-byte vector of T (16 floats or 8 doubles): the accumulators of the per-segment
 * reductions. GCC (>= 12) and Clang vector extensions keep them in registers; arrays indexed in
 * loops had been kept on the stack (a store and a reload per vector of input) as soon as a
 * serial tail or fold touched them. Other compilers (and -DFASTBN_NO_VECTOR_EXT) get structs
 * of lanes and the same arithmetic in the same order. A block of FBN_BLOCK vectors is summed in
 * T, then widened into double lanes (fbn_vd8); each segment folds its lanes pairwise at the end.
 */
#define FBN_VN(T) ((int)(64 / sizeof(T)))
#if !defined(FASTBN_NO_VECTOR_EXT) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
typedef float fbn_vfloat __attribute__((vector_size(64)));
typedef double fbn_vdouble __attribute__((vector_size(64)));
typedef double fbn_vd8 __attribute__((vector_size(64)));
typedef double fbn_vd4 __attribute__((vector_size(32)));
typedef float fbn_vf8 __attribute__((vector_size(32)));
typedef float fbn_vf4 __attribute__((vector_size(16)));
typedef float fbn_vf2 __attribute__((vector_size(8)));
typedef double fbn_vd2 __attribute__((vector_size(16)));
#define FBN_VZERO(T) ((fbn_v##T){0})
#define FBN_VLOAD(v, p) memcpy(&(v), (p), sizeof(v))
#define FBN_VSUBS(T, a, s) ((a) - (s))
#define FBN_VADD(T, a, b) ((a) + (b))
#define FBN_VMUL(T, a, b) ((a) * (b))
/* g where y > 0, else 0 (a compare yields an all-ones/zeros integer vector of T's width) */
#define FBN_VMASK(T, g, y) ((fbn_v##T)((__typeof__((y) > (y)))(g) & ((y) > FBN_VZERO(T))))
#define FBN_VWIDEN_float(b)                                                                        \
    (__builtin_convertvector(__builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7), fbn_vd8) +     \
     __builtin_convertvector(__builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15), fbn_vd8))
#define FBN_VWIDEN_double(b) (b)
#define FBN_VWIDEN(T, b) FBN_VWIDEN_##T(b)
/* v with its first n lanes zeroed (n < FBN_VN(T)) */
#define FBN_VDROP(T, v, n) ((fbn_v##T)((__typeof__((v) > (v)))(v) & (FBN_VIOTA_##T >= (T)(n))))
#define FBN_VIOTA_float ((fbn_vfloat){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
#define FBN_VIOTA_double ((fbn_vdouble){0, 1, 2, 3, 4, 5, 6, 7})
/* The lanes of a one-block segment summed in T (pairwise), as a double: cheaper than widening
 * them first, and a block's float sums are already rounded to float. */
#define FBN_VSUMT_float(v)                                                                         \
    __extension__({                                                                                \
        fbn_vf8 h8_ = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +                      \
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);                 \
        fbn_vf4 h4_ = __builtin_shufflevector(h8_, h8_, 0, 1, 2, 3) +                              \
                      __builtin_shufflevector(h8_, h8_, 4, 5, 6, 7);                               \
        fbn_vf2 h2_ = __builtin_shufflevector(h4_, h4_, 0, 1) +                                    \
                      __builtin_shufflevector(h4_, h4_, 2, 3);                                     \
        (double)(h2_[0] + h2_[1]);                                                                 \
    })
#define FBN_VSUMT_double(v) FBN_VSUMD(v)
#define FBN_VSUMT(T, v) FBN_VSUMT_##T(v)
#define FBN_VSUMD(v)                                                                               \
    __extension__({                                                                                \
        fbn_vd4 h4_ = __builtin_shufflevector(v, v, 0, 1, 2, 3) +                                  \
                      __builtin_shufflevector(v, v, 4, 5, 6, 7);                                   \
        fbn_vd2 h2_ = __builtin_shufflevector(h4_, h4_, 0, 1) +                                    \
                      __builtin_shufflevector(h4_, h4_, 2, 3);                                     \
        h2_[0] + h2_[1];                                                                           \
    })
#else
typedef struct { float v[16]; } fbn_vfloat;
typedef struct { double v[8]; } fbn_vdouble;
typedef fbn_vdouble fbn_vd8;
#define FBN_VOPS(T)                                                                                \
    static inline fbn_v##T fbn_vzero_##T(void) { fbn_v##T r = {{0}}; return r; }                  \
    static inline fbn_v##T fbn_vsubs_##T(fbn_v##T a, T s)                                          \
    { for (int j = 0; j < FBN_VN(T); j++) a.v[j] -= s; return a; }                                 \
    static inline fbn_v##T fbn_vadd_##T(fbn_v##T a, fbn_v##T b)                                    \
    { for (int j = 0; j < FBN_VN(T); j++) a.v[j] += b.v[j]; return a; }                            \
    static inline fbn_v##T fbn_vmul_##T(fbn_v##T a, fbn_v##T b)                                    \
    { for (int j = 0; j < FBN_VN(T); j++) a.v[j] *= b.v[j]; return a; }                            \
    static inline fbn_v##T fbn_vmask_##T(fbn_v##T g, fbn_v##T y)                                   \
    { for (int j = 0; j < FBN_VN(T); j++) g.v[j] = y.v[j] > 0 ? g.v[j] : 0; return g; }         \
    static inline fbn_v##T fbn_vdrop_##T(fbn_v##T v, int n)                                        \
    { for (int j = 0; j < n; j++) v.v[j] = 0; return v; }
FBN_VOPS(float)
FBN_VOPS(double)
#undef FBN_VOPS
static inline fbn_vd8 fbn_vwiden_float(fbn_vfloat b)
{ fbn_vd8 r; for (int j = 0; j < 8; j++) r.v[j] = (double)b.v[j] + (double)b.v[j + 8]; return r; }
static inline fbn_vd8 fbn_vwiden_double(fbn_vdouble b) { return b; }
static inline double fbn_vsumd(fbn_vd8 a)
{
    double h4[4], h2[2];
    for (int j = 0; j < 4; j++) h4[j] = a.v[j] + a.v[j + 4];
    for (int j = 0; j < 2; j++) h2[j] = h4[j] + h4[j + 2];
    return h2[0] + h2[1];
}
static inline double fbn_vsumt_float(fbn_vfloat a)
{
    float h8[8], h4[4], h2[2];
    for (int j = 0; j < 8; j++) h8[j] = a.v[j] + a.v[j + 8];
    for (int j = 0; j < 4; j++) h4[j] = h8[j] + h8[j + 4];
    for (int j = 0; j < 2; j++) h2[j] = h4[j] + h4[j + 2];
    return (double)(h2[0] + h2[1]);
}
static inline double fbn_vsumt_double(fbn_vdouble a) { return fbn_vsumd(a); }
#define FBN_VZERO(T) fbn_vzero_##T()
#define FBN_VLOAD(v, p) memcpy(&(v), (p), sizeof(v))
#define FBN_VSUBS(T, a, s) fbn_vsubs_##T(a, s)
#define FBN_VADD(T, a, b) fbn_vadd_##T(a, b)
#define FBN_VMUL(T, a, b) fbn_vmul_##T(a, b)
#define FBN_VMASK(T, g, y) fbn_vmask_##T(g, y)
#define FBN_VDROP(T, v, n) fbn_vdrop_##T(v, n)
#define FBN_VWIDEN(T, b) fbn_vwiden_##T(b)
#define FBN_VSUMD(v) fbn_vsumd(v)
#define FBN_VSUMT(T, v) fbn_vsumt_##T(v)
#endif

/* The end of a block of a segment's reduction (fbn_sums, fbn_bwd_sums): a segment that is one
 * block (7x7 maps) folds its T lanes straight into t1, t2 (cheaper than widening them first);
 * a longer one adds them into its double lanes a1, a2. */
#define FBN_BLOCK_END(T, one_block, b1, b2, a1, a2, t1, t2)                                        \
    do {                                                                                           \
        if (one_block) {                                                                           \
            t1 = FBN_VSUMT(T, b1);                                                                 \
            t2 = FBN_VSUMT(T, b2);                                                                 \
        } else {                                                                                   \
            a1 = FBN_VADD(double, a1, FBN_VWIDEN(T, b1));                                          \
            a2 = FBN_VADD(double, a2, FBN_VWIDEN(T, b2));                                          \
        }                                                                                          \
    } while (0)
/* ... and of the segment: its two sums added into slot o. */
#define FBN_SEGMENT_END(one_block, a1, a2, t1, t2, s1, s2, o)                                      \
    do {                                                                                           \
        if (!(one_block)) {                                                                        \
            t1 = FBN_VSUMD(a1);                                                                    \
            t2 = FBN_VSUMD(a2);                                                                    \
        }                                                                                          \
        (s1)[o] += t1;                                                                             \
        (s2)[o] += t2;                                                                             \
    } while (0)

/* ReLU mask of the fused-activation backward: the gradient passes where the forward output
 * was positive, as torch.nn.functional.relu's backward does. Both values are loaded before the
 * select: written as `y > 0 ? dy[i] : 0` the load of dy[i] is conditional, which GCC may not
 * if-convert (it could fault), and the loop stayed scalar with a mispredicted branch per value
 * (5-10x slower than the unmasked backward). */
static inline double fbn_mask(double g, double y) { return y > 0 ? g : 0.0; }
#define FBN_MASK(dy, y) fbn_mask((double)(dy), (double)(y))

#define FBN_DEFINE(T)                                                                              \
                                                                                                   \
/* s1[o] += sum(x - k[c]), s2[o] += sum((x - k[c])^2) for each of nseg segments of len values,     \
 * contiguous in memory order: segment s belongs to channel c = (c0 + s) % C and adds into slot    \
 * o = c when by_channel (runs that span every channel), else o = s (a slot per segment).          \
 * Walking memory in order keeps the prefetchers streaming: gathering one channel's segments,      \
 * C * len values apart, ran at a third of the speed (7-16 GB/s) once x left L2.                   \
 * IN x, k[C]; INOUT s1, s2 */                                                                     \
static FBN_CLONES void fbn_sums_##T(const T *FBN_RESTRICT x, ptrdiff_t nseg, ptrdiff_t len,        \
                                   ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT k,             \
                                   int by_channel, double *FBN_RESTRICT s1,                        \
                                   double *FBN_RESTRICT s2)                                        \
{                                                                                                  \
    const int N = FBN_VN(T);                                                                       \
    ptrdiff_t c = c0;                                                                              \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *xs = x + s * len;                                                                 \
        const T kc = k[c];                                                                         \
        fbn_vd8 a1 = FBN_VZERO(double), a2 = FBN_VZERO(double);                                    \
        double t1 = 0.0, t2 = 0.0;                                                                 \
        ptrdiff_t i = 0;                                                                           \
        while (i < len) {                                                                          \
            fbn_v##T b1 = FBN_VZERO(T), b2 = FBN_VZERO(T), v;                                      \
            int q = 0;                                                                             \
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {                                   \
                FBN_VLOAD(v, xs + i);                                                              \
                v = FBN_VSUBS(T, v, kc);                                                           \
                b1 = FBN_VADD(T, b1, v);                                                           \
                b2 = FBN_VADD(T, b2, FBN_VMUL(T, v, v));                                           \
            }                                                                                      \
            if (q < FBN_BLOCK && i < len) {                                                        \
                /* The last len - i < N values: the segment's last N values, the ones already      \
                 * summed zeroed (no scalar loop), or, in a segment shorter than N, a copy         \
                 * padded with kc. */                                                              \
                if (len >= N) {                                                                    \
                    FBN_VLOAD(v, xs + len - N);                                                    \
                    v = FBN_VDROP(T, FBN_VSUBS(T, v, kc), N - (len - i));                          \
                } else {                                                                           \
                    T tail[16];                                                                    \
                    for (int j = 0; j < N; j++)                                                    \
                        tail[j] = j < len ? xs[j] : kc;                                            \
                    FBN_VLOAD(v, tail);                                                            \
                    v = FBN_VSUBS(T, v, kc);                                                       \
                }                                                                                  \
                b1 = FBN_VADD(T, b1, v);                                                           \
                b2 = FBN_VADD(T, b2, FBN_VMUL(T, v, v));                                           \
                i = len;                                                                           \
            }                                                                                      \
            FBN_BLOCK_END(T, len <= FBN_BLOCK * N, b1, b2, a1, a2, t1, t2);                        \
        }                                                                                          \
        FBN_SEGMENT_END(len <= FBN_BLOCK * N, a1, a2, t1, t2, s1, s2, by_channel ? c : s);         \
        if (++c == C)                                                                              \
            c = 0;                                                                                 \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block: a1[j] += x[r, j] - k[j], a2[j] += (x[r, j] - k[j])^2.            \
 * FBN_ROWS rows per pass: each lane sums its values in registers (in T), then updates its         \
 * double accumulators once. One row per pass loaded and stored both accumulators for every        \
 * value, which held the loop to 18-29 GB/s in cache.                                              \
 * IN x (nrows rows of `width` values, `stride` apart), k[width]; INOUT a1[width], a2[width] */    \
static FBN_CLONES void fbn_sums_rows_##T(const T *FBN_RESTRICT x, ptrdiff_t nrows,                 \
                                        ptrdiff_t stride, ptrdiff_t width,                         \
                                        const T *FBN_RESTRICT k,                                   \
                                        double *FBN_RESTRICT a1, double *FBN_RESTRICT a2)          \
{                                                                                                  \
    ptrdiff_t r = 0;                                                                               \
    for (; r + FBN_ROWS <= nrows; r += FBN_ROWS) {                                                 \
        const T *xr = x + r * stride;                                                              \
        FBN_SIMD                                                                                   \
        for (ptrdiff_t j = 0; j < width; j++) {                                                    \
            T kj = k[j], s1 = 0, s2 = 0;                                                           \
            for (int q = 0; q < FBN_ROWS; q++) {                                                   \
                T d = xr[q * stride + j] - kj;                                                     \
                s1 += d;                                                                           \
                s2 += d * d;                                                                       \
            }                                                                                      \
            a1[j] += s1;                                                                           \
            a2[j] += s2;                                                                           \
        }                                                                                          \
    }                                                                                              \
    for (; r < nrows; r++) {                                                                       \
        const T *xr = x + r * stride;                                                              \
        FBN_SIMD                                                                                   \
        for (ptrdiff_t j = 0; j < width; j++) {                                                    \
            double d = (double)xr[j] - (double)k[j];                                               \
            a1[j] += d;                                                                            \
            a2[j] += d * d;                                                                        \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* y = (x - mhi) * a + b (then ReLU) over a contiguous run of nseg segments of len values in       \
 * memory order, segment s belonging to channel (c0 + s) % C, whose parameters are mhi[c], a[c],   \
 * b[c]. Walking memory in order streams best; one call per run (not per segment) keeps short      \
 * segments (7x7 maps) cheap. mhi is the mean rounded to T and b absorbs the rest (b = shift -     \
 * (mean - mhi) * a): x - mhi is exact when |mean| >> std, so y keeps its digits where x * a +     \
 * (shift - mean * a) would lose them; and a third parameter row instead of a fourth was worth     \
 * ~1.3x to the channels-last loop out of cache.                                                   \
 * IN x, mhi/a/b[C]; OUT y (may alias x) */                                                        \
static FBN_CLONES void fbn_norm_##T(const T *x, T *y, ptrdiff_t nseg, ptrdiff_t len,               \
                                   ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT mhi,           \
                                   const T *FBN_RESTRICT a, const T *FBN_RESTRICT b, int relu)     \
{                                                                                                  \
    ptrdiff_t c = c0;                                                                              \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *xs = x + s * len;                                                                 \
        T *ys = y + s * len;                                                                       \
        const T h = mhi[c], m = a[c], o = b[c];                                                    \
        if (relu) {                                                                                \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++) {                                                  \
                T v = (xs[i] - h) * m + o;                                                         \
                ys[i] = v > 0 ? v : (T)0;                                                          \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++)                                                    \
                ys[i] = (xs[i] - h) * m + o;                                                       \
        }                                                                                          \
        if (++c == C)                                                                              \
            c = 0;                                                                                 \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block, per-lane parameters (see fbn_norm).                              \
 * IN x, mhi/a/b[width]; OUT y (may alias x) */                                                    \
static FBN_CLONES void fbn_norm_rows_##T(const T *x, T *y, ptrdiff_t nrows, ptrdiff_t stride,      \
                                        ptrdiff_t width, const T *FBN_RESTRICT mhi,                \
                                        const T *FBN_RESTRICT a, const T *FBN_RESTRICT b,          \
                                        int relu)                                                  \
{                                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                                        \
        const T *xr = x + r * stride;                                                              \
        T *yr = y + r * stride;                                                                    \
        if (relu) {                                                                                \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T v = (xr[j] - mhi[j]) * a[j] + b[j];                                              \
                yr[j] = v > 0 ? v : (T)0;                                                          \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++)                                                  \
                yr[j] = (xr[j] - mhi[j]) * a[j] + b[j];                                            \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* s1[o] += sum(g), s2[o] += sum(g * ((x - mhi[c]) - mlo[c])) with g = dy, or dy masked by y > 0   \
 * when y != NULL, over nseg segments in memory order (channels and slots as in fbn_sums).         \
 * mhi + mlo is the channel's mean split into a T-precision head and tail.                         \
 * IN dy, x, y (or NULL), mhi/mlo[C]; INOUT s1, s2 */                                              \
static FBN_CLONES void fbn_bwd_sums_##T(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,         \
                                       const T *FBN_RESTRICT y, ptrdiff_t nseg, ptrdiff_t len,     \
                                       ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT mhi,       \
                                       const T *FBN_RESTRICT mlo, int by_channel,                  \
                                       double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)           \
{                                                                                                  \
    const int N = FBN_VN(T);                                                                       \
    ptrdiff_t c = c0;                                                                              \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *gs = dy + s * len, *xs = x + s * len, *ys = y ? y + s * len : NULL;               \
        const T h = mhi[c], l = mlo[c];                                                            \
        fbn_vd8 a1 = FBN_VZERO(double), a2 = FBN_VZERO(double);                                    \
        double t1 = 0.0, t2 = 0.0;                                                                 \
        ptrdiff_t i = 0;                                                                           \
        while (i < len) {                                                                          \
            fbn_v##T b1 = FBN_VZERO(T), b2 = FBN_VZERO(T), g, v, m;                                \
            int q = 0;                                                                             \
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {                                   \
                FBN_VLOAD(g, gs + i);                                                              \
                FBN_VLOAD(v, xs + i);                                                              \
                if (ys) {                                                                          \
                    FBN_VLOAD(m, ys + i);                                                          \
                    g = FBN_VMASK(T, g, m);                                                        \
                }                                                                                  \
                v = FBN_VSUBS(T, FBN_VSUBS(T, v, h), l);                                           \
                b1 = FBN_VADD(T, b1, g);                                                           \
                b2 = FBN_VADD(T, b2, FBN_VMUL(T, g, v));                                           \
            }                                                                                      \
            if (q < FBN_BLOCK && i < len) { /* the last values, as in fbn_sums (g = 0 pads) */     \
                if (len >= N) {                                                                    \
                    FBN_VLOAD(g, gs + len - N);                                                    \
                    FBN_VLOAD(v, xs + len - N);                                                    \
                    if (ys) {                                                                      \
                        FBN_VLOAD(m, ys + len - N);                                                \
                        g = FBN_VMASK(T, g, m);                                                    \
                    }                                                                              \
                    g = FBN_VDROP(T, g, N - (len - i));                                            \
                } else {                                                                           \
                    T tg[16], tx[16];                                                              \
                    for (int j = 0; j < N; j++) {                                                  \
                        tg[j] = j < len && (!ys || ys[j] > 0) ? gs[j] : (T)0;                      \
                        tx[j] = j < len ? xs[j] : h;                                               \
                    }                                                                              \
                    FBN_VLOAD(g, tg);                                                              \
                    FBN_VLOAD(v, tx);                                                              \
                }                                                                                  \
                v = FBN_VSUBS(T, FBN_VSUBS(T, v, h), l);                                           \
                b1 = FBN_VADD(T, b1, g);                                                           \
                b2 = FBN_VADD(T, b2, FBN_VMUL(T, g, v));                                           \
                i = len;                                                                           \
            }                                                                                      \
            FBN_BLOCK_END(T, len <= FBN_BLOCK * N, b1, b2, a1, a2, t1, t2);                        \
        }                                                                                          \
        FBN_SEGMENT_END(len <= FBN_BLOCK * N, a1, a2, t1, t2, s1, s2, by_channel ? c : s);         \
        if (++c == C)                                                                              \
            c = 0;                                                                                 \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block (see fbn_bwd_sums), per-lane mhi/mlo, FBN_BROWS rows per pass     \
 * summed in registers as in fbn_sums_rows (one row per pass was 1.4-1.8x slower in cache).        \
 * IN dy, x, y (or NULL), mhi/mlo[width]; INOUT a1[width], a2[width] */                            \
static FBN_CLONES void fbn_bwd_sums_rows_##T(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,    \
                                            const T *FBN_RESTRICT y, ptrdiff_t nrows,              \
                                            ptrdiff_t stride, ptrdiff_t width,                     \
                                            const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT mlo,  \
                                            double *FBN_RESTRICT a1, double *FBN_RESTRICT a2)      \
{                                                                                                  \
    ptrdiff_t r = 0;                                                                               \
    for (; r + FBN_BROWS <= nrows; r += FBN_BROWS) {                                               \
        const T *dyr = dy + r * stride, *xr = x + r * stride;                                      \
        if (y) {                                                                                   \
            const T *yr = y + r * stride;                                                          \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T h = mhi[j], l = mlo[j], s1 = 0, s2 = 0;                                          \
                for (int q = 0; q < FBN_BROWS; q++) {                                              \
                    T d = dyr[q * stride + j], g = yr[q * stride + j] > 0 ? d : (T)0;              \
                    s1 += g;                                                                       \
                    s2 += g * ((xr[q * stride + j] - h) - l);                                      \
                }                                                                                  \
                a1[j] += s1;                                                                       \
                a2[j] += s2;                                                                       \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T h = mhi[j], l = mlo[j], s1 = 0, s2 = 0;                                          \
                for (int q = 0; q < FBN_BROWS; q++) {                                              \
                    T g = dyr[q * stride + j];                                                     \
                    s1 += g;                                                                       \
                    s2 += g * ((xr[q * stride + j] - h) - l);                                      \
                }                                                                                  \
                a1[j] += s1;                                                                       \
                a2[j] += s2;                                                                       \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (; r < nrows; r++) {                                                                       \
        const T *dyr = dy + r * stride, *xr = x + r * stride;                                      \
        const T *yr = y ? y + r * stride : NULL;                                                   \
        for (ptrdiff_t j = 0; j < width; j++) {                                                    \
            double g = yr ? FBN_MASK(dyr[j], yr[j]) : (double)dyr[j];                              \
            a1[j] += g;                                                                            \
            a2[j] += g * (((double)xr[j] - (double)mhi[j]) - (double)mlo[j]);                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* dx = a*g - k*(x - mhi) + c with g as in fbn_bwd_sums, over a contiguous run of nseg segments    \
 * as in fbn_norm (parameters per channel; c absorbs k * (mean - mhi) as b does there); k = c = 0  \
 * is the inference backward.                                                                      \
 * IN dy, x, y (or NULL), mhi/a/k/c[C]; OUT dx (may alias dy) */                                   \
static FBN_CLONES void fbn_bwd_dx_##T(const T *dy, const T *FBN_RESTRICT x,                        \
                                     const T *FBN_RESTRICT y, T *dx, ptrdiff_t nseg,               \
                                     ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,                     \
                                     const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,           \
                                     const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)             \
{                                                                                                  \
    ptrdiff_t ch = c0;                                                                             \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *gs = dy + s * len, *xs = x + s * len;                                             \
        T *ds = dx + s * len;                                                                      \
        const T h = mhi[ch], m = a[ch], q = k[ch], o = c[ch];                                      \
        if (y) {                                                                                   \
            const T *ys = y + s * len;                                                             \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++) {                                                  \
                T d = gs[i], g = ys[i] > 0 ? d : (T)0;                                             \
                ds[i] = m * g - q * (xs[i] - h) + o;                                               \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++)                                                    \
                ds[i] = m * gs[i] - q * (xs[i] - h) + o;                                           \
        }                                                                                          \
        if (++ch == C)                                                                             \
            ch = 0;                                                                                \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block (see fbn_bwd_dx), per-lane parameters.                            \
 * IN dy, x, y (or NULL), mhi/a/k/c[width]; OUT dx (may alias dy) */                               \
static FBN_CLONES void fbn_bwd_dx_rows_##T(const T *dy, const T *FBN_RESTRICT x,                   \
                                          const T *FBN_RESTRICT y, T *dx, ptrdiff_t nrows,         \
                                          ptrdiff_t stride, ptrdiff_t width,                       \
                                          const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,      \
                                          const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)        \
{                                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                                        \
        const T *dyr = dy + r * stride, *xr = x + r * stride;                                      \
        T *dxr = dx + r * stride;                                                                  \
        if (y) {                                                                                   \
            const T *yr = y + r * stride;                                                          \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T d = dyr[j], g = yr[j] > 0 ? d : (T)0;                                            \
                dxr[j] = a[j] * g - k[j] * (xr[j] - mhi[j]) + c[j];                                \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++)                                                  \
                dxr[j] = a[j] * dyr[j] - k[j] * (xr[j] - mhi[j]) + c[j];                           \
        }                                                                                          \
    }                                                                                              \
}

FBN_DEFINE(float)
FBN_DEFINE(double)

#undef FBN_DEFINE

/* OpenMP shim: the same kernels build without OpenMP (serial). */
#ifdef _OPENMP
#include <omp.h>
static int fbn_openmp_enabled(void) { return 1; }
static int fbn_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static int fbn_openmp_enabled(void) { return 0; }
static int fbn_omp_max_threads(void) { return 1; }
#endif

#endif /* FASTBN_SIMD_H */
