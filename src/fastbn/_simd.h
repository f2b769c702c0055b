/*
 * Innermost loops of the fastbn kernels, one function per (operation, layout, dtype).
 *
 * The Cython kernels (_kernels.pyx) own the partition of the work, the threads and the merging
 * of partial results; these functions only stream over one contiguous span (NCHW-style, a single
 * channel) or over a block of rows (channels-last, one accumulator lane per channel position).
 * They never allocate, never fail and never touch Python.
 *
 * Why C and not Cython for these loops: reductions need several independent accumulators and
 * `omp simd` to vectorise without -ffast-math, and GCC's target_clones lets a portable build
 * (no -march=native) still run AVX2/AVX-512 code on CPUs that have it, chosen once at load time.
 * The result depends on the clone (FMA contraction), never on the thread count.
 *
 * Precision: statistics and gradient sums accumulate in double whatever the input dtype, and
 * subtract a shift (a sample of the channel, or the mean) before squaring, so that a mean much
 * larger than the standard deviation costs no accuracy (never E[x^2] - E[x]^2).
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>

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

/* Lanes of the span reductions: 16 doubles are 4 AVX2 or 2 AVX-512 registers per accumulator,
 * enough independent chains to hide the add latency without spilling. */
#define FBN_LANES 16

/* Rows of a channels-last block summed in registers before each accumulator update. */
#define FBN_ROWS 8

/* ReLU mask of the fused-activation backward: the gradient passes where the forward output
 * was positive, as torch.nn.functional.relu's backward does. Both values are loaded before the
 * select: written as `y > 0 ? dy[i] : 0` the load of dy[i] is conditional, which GCC may not
 * if-convert (it could fault), and the loop stayed scalar with a mispredicted branch per value
 * (5-10x slower than the unmasked backward). */
static inline double fbn_mask(double g, double y) { return y > 0 ? g : 0.0; }
#define FBN_MASK(dy, y) fbn_mask((double)(dy), (double)(y))

#define FBN_DEFINE(T)                                                                              \
                                                                                                   \
/* s1 += sum(x - k), s2 += sum((x - k)^2) over nseg segments of len values, stride apart (one     \
 * channel of an NCHW array: the lanes carry over from segment to segment, so short segments      \
 * cost no extra reductions). IN x, nseg, len, stride, k; INOUT s1, s2 */                          \
static FBN_CLONES void fbn_sums_##T(const T *FBN_RESTRICT x, ptrdiff_t nseg, ptrdiff_t len,       \
                                   ptrdiff_t stride, double k, double *s1, double *s2)             \
{                                                                                                  \
    double a1[FBN_LANES] = {0}, a2[FBN_LANES] = {0};                                               \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *xs = x + s * stride;                                                              \
        ptrdiff_t i = 0;                                                                           \
        for (; i + FBN_LANES <= len; i += FBN_LANES) {                                             \
            FBN_SIMD                                                                               \
            for (int j = 0; j < FBN_LANES; j++) {                                                  \
                double d = (double)xs[i + j] - k;                                                  \
                a1[j] += d;                                                                        \
                a2[j] += d * d;                                                                    \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; i < len; i++, j++) {                                                       \
            double d = (double)xs[i] - k;                                                          \
            a1[j] += d;                                                                            \
            a2[j] += d * d;                                                                        \
        }                                                                                          \
    }                                                                                              \
    double t1 = 0.0, t2 = 0.0;                                                                     \
    for (int j = 0; j < FBN_LANES; j++) {                                                          \
        t1 += a1[j];                                                                               \
        t2 += a2[j];                                                                               \
    }                                                                                              \
    *s1 += t1;                                                                                     \
    *s2 += t2;                                                                                     \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block: a1[j] += x[r, j] - k[j], a2[j] += (x[r, j] - k[j])^2.            \
 * Eight rows per pass: each lane sums its 8 values in registers, then updates its accumulator     \
 * once. One row per pass loaded and stored both accumulators for every value, which held the     \
 * loop to 18-29 GB/s in cache (28-31 GB/s now, 1.2-1.7x faster out of cache at C >= 512).        \
 * IN x (nrows rows of `width` values, `stride` apart), k[width]; INOUT a1[width], a2[width] */    \
static FBN_CLONES void fbn_sums_rows_##T(const T *FBN_RESTRICT x, ptrdiff_t nrows,                \
                                        ptrdiff_t stride, ptrdiff_t width,                         \
                                        const double *FBN_RESTRICT k,                              \
                                        double *FBN_RESTRICT a1, double *FBN_RESTRICT a2)          \
{                                                                                                  \
    ptrdiff_t r = 0;                                                                               \
    for (; r + FBN_ROWS <= nrows; r += FBN_ROWS) {                                                 \
        const T *xr = x + r * stride;                                                              \
        FBN_SIMD                                                                                   \
        for (ptrdiff_t j = 0; j < width; j++) {                                                    \
            double kj = k[j], s1 = 0.0, s2 = 0.0;                                                  \
            for (int q = 0; q < FBN_ROWS; q++) {                                                   \
                double d = (double)xr[q * stride + j] - kj;                                        \
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
            double d = (double)xr[j] - k[j];                                                       \
            a1[j] += d;                                                                            \
            a2[j] += d * d;                                                                        \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* y = ((x - mhi) - mlo) * a + b (then ReLU) over a contiguous run of nseg segments of len       \
 * values in memory order, segment s belonging to channel (c0 + s) % C, whose parameters are       \
 * mhi[c]...b[c]. Walking memory in order streams best; one call per run (not per segment) keeps   \
 * short segments (7x7 maps) cheap. The mean is split into a T-precision head and tail so that     \
 * x - mean keeps its digits when |mean| >> std (x - mhi is exact there).                          \
 * IN x, mhi/mlo/a/b[C]; OUT y (may alias x) */                                                    \
static FBN_CLONES void fbn_norm_##T(const T *x, T *y, ptrdiff_t nseg, ptrdiff_t len,              \
                                   ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT mhi,           \
                                   const T *FBN_RESTRICT mlo, const T *FBN_RESTRICT a,             \
                                   const T *FBN_RESTRICT b, int relu)                              \
{                                                                                                  \
    ptrdiff_t c = c0;                                                                              \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *xs = x + s * len;                                                                 \
        T *ys = y + s * len;                                                                       \
        const T h = mhi[c], l = mlo[c], m = a[c], o = b[c];                                        \
        if (relu) {                                                                                \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++) {                                                  \
                T v = ((xs[i] - h) - l) * m + o;                                                   \
                ys[i] = v > 0 ? v : (T)0;                                                          \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++)                                                    \
                ys[i] = ((xs[i] - h) - l) * m + o;                                                 \
        }                                                                                          \
        if (++c == C)                                                                              \
            c = 0;                                                                                 \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block, per-lane parameters (see fbn_norm).                              \
 * IN x, mhi/mlo/a/b[width]; OUT y (may alias x) */                                                \
static FBN_CLONES void fbn_norm_rows_##T(const T *x, T *y, ptrdiff_t nrows, ptrdiff_t stride,     \
                                        ptrdiff_t width, const T *FBN_RESTRICT mhi,                \
                                        const T *FBN_RESTRICT mlo, const T *FBN_RESTRICT a,        \
                                        const T *FBN_RESTRICT b, int relu)                         \
{                                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                                        \
        const T *xr = x + r * stride;                                                              \
        T *yr = y + r * stride;                                                                    \
        if (relu) {                                                                                \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T v = ((xr[j] - mhi[j]) - mlo[j]) * a[j] + b[j];                                   \
                yr[j] = v > 0 ? v : (T)0;                                                          \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++)                                                  \
                yr[j] = ((xr[j] - mhi[j]) - mlo[j]) * a[j] + b[j];                                 \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* s1 += sum(g), s2 += sum(g * (x - mean)) with g = dy, or dy masked by y > 0 when y != NULL,    \
 * over nseg segments of len values, stride apart.                                                 \
 * IN dy, x, y (or NULL), nseg, len, stride, mean; INOUT s1, s2 */                                 \
static FBN_CLONES void fbn_bwd_sums_##T(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,        \
                                       const T *FBN_RESTRICT y, ptrdiff_t nseg, ptrdiff_t len,     \
                                       ptrdiff_t stride, double mean, double *s1, double *s2)      \
{                                                                                                  \
    double a1[FBN_LANES] = {0}, a2[FBN_LANES] = {0};                                               \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *gs = dy + s * stride, *xs = x + s * stride;                                       \
        ptrdiff_t i = 0;                                                                           \
        if (y) {                                                                                   \
            const T *ys = y + s * stride;                                                          \
            for (; i + FBN_LANES <= len; i += FBN_LANES) {                                         \
                FBN_SIMD                                                                           \
                for (int j = 0; j < FBN_LANES; j++) {                                              \
                    double g = FBN_MASK(gs[i + j], ys[i + j]);                                     \
                    a1[j] += g;                                                                    \
                    a2[j] += g * ((double)xs[i + j] - mean);                                       \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; i < len; i++, j++) {                                                   \
                double g = FBN_MASK(gs[i], ys[i]);                                                 \
                a1[j] += g;                                                                        \
                a2[j] += g * ((double)xs[i] - mean);                                               \
            }                                                                                      \
        } else {                                                                                   \
            for (; i + FBN_LANES <= len; i += FBN_LANES) {                                         \
                FBN_SIMD                                                                           \
                for (int j = 0; j < FBN_LANES; j++) {                                              \
                    double g = (double)gs[i + j];                                                  \
                    a1[j] += g;                                                                    \
                    a2[j] += g * ((double)xs[i + j] - mean);                                       \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; i < len; i++, j++) {                                                   \
                double g = (double)gs[i];                                                          \
                a1[j] += g;                                                                        \
                a2[j] += g * ((double)xs[i] - mean);                                               \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    double t1 = 0.0, t2 = 0.0;                                                                     \
    for (int j = 0; j < FBN_LANES; j++) {                                                          \
        t1 += a1[j];                                                                               \
        t2 += a2[j];                                                                               \
    }                                                                                              \
    *s1 += t1;                                                                                     \
    *s2 += t2;                                                                                     \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block (see fbn_bwd_sums), per-lane mean.                                \
 * IN dy, x, y (or NULL), mean[width]; INOUT a1[width], a2[width] */                               \
static FBN_CLONES void fbn_bwd_sums_rows_##T(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,   \
                                            const T *FBN_RESTRICT y, ptrdiff_t nrows,              \
                                            ptrdiff_t stride, ptrdiff_t width,                     \
                                            const double *FBN_RESTRICT mean,                       \
                                            double *FBN_RESTRICT a1, double *FBN_RESTRICT a2)      \
{                                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                                        \
        const T *dyr = dy + r * stride, *xr = x + r * stride;                                      \
        if (y) {                                                                                   \
            const T *yr = y + r * stride;                                                          \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                double g = FBN_MASK(dyr[j], yr[j]);                                                \
                a1[j] += g;                                                                        \
                a2[j] += g * ((double)xr[j] - mean[j]);                                            \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                double g = (double)dyr[j];                                                         \
                a1[j] += g;                                                                        \
                a2[j] += g * ((double)xr[j] - mean[j]);                                            \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* dx = a*g - k*((x - mhi) - mlo) + c with g as in fbn_bwd_sums, over a contiguous run of nseg     \
 * segments as in fbn_norm (parameters per channel); k = c = 0 is the inference backward.          \
 * IN dy, x, y (or NULL), mhi/mlo/a/k/c[C]; OUT dx (may alias dy) */                               \
static FBN_CLONES void fbn_bwd_dx_##T(const T *dy, const T *FBN_RESTRICT x,                       \
                                     const T *FBN_RESTRICT y, T *dx, ptrdiff_t nseg,               \
                                     ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,                     \
                                     const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT mlo,         \
                                     const T *FBN_RESTRICT a, const T *FBN_RESTRICT k,             \
                                     const T *FBN_RESTRICT c)                                      \
{                                                                                                  \
    ptrdiff_t ch = c0;                                                                             \
    for (ptrdiff_t s = 0; s < nseg; s++) {                                                         \
        const T *gs = dy + s * len, *xs = x + s * len;                                             \
        T *ds = dx + s * len;                                                                      \
        const T h = mhi[ch], l = mlo[ch], m = a[ch], q = k[ch], o = c[ch];                         \
        if (y) {                                                                                   \
            const T *ys = y + s * len;                                                             \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++) {                                                  \
                T d = gs[i], g = ys[i] > 0 ? d : (T)0;                                             \
                ds[i] = m * g - q * ((xs[i] - h) - l) + o;                                         \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t i = 0; i < len; i++)                                                    \
                ds[i] = m * gs[i] - q * ((xs[i] - h) - l) + o;                                     \
        }                                                                                          \
        if (++ch == C)                                                                             \
            ch = 0;                                                                                \
    }                                                                                              \
}                                                                                                  \
                                                                                                   \
/* Rows of a channels-last block (see fbn_bwd_dx), per-lane parameters.                            \
 * IN dy, x, y (or NULL), mhi/mlo/a/k/c[width]; OUT dx (may alias dy) */                           \
static FBN_CLONES void fbn_bwd_dx_rows_##T(const T *dy, const T *FBN_RESTRICT x,                  \
                                          const T *FBN_RESTRICT y, T *dx, ptrdiff_t nrows,         \
                                          ptrdiff_t stride, ptrdiff_t width,                       \
                                          const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT mlo,    \
                                          const T *FBN_RESTRICT a, const T *FBN_RESTRICT k,        \
                                          const T *FBN_RESTRICT c)                                 \
{                                                                                                  \
    for (ptrdiff_t r = 0; r < nrows; r++) {                                                        \
        const T *dyr = dy + r * stride, *xr = x + r * stride;                                      \
        T *dxr = dx + r * stride;                                                                  \
        if (y) {                                                                                   \
            const T *yr = y + r * stride;                                                          \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++) {                                                \
                T d = dyr[j], g = yr[j] > 0 ? d : (T)0;                                            \
                dxr[j] = a[j] * g - k[j] * ((xr[j] - mhi[j]) - mlo[j]) + c[j];                     \
            }                                                                                      \
        } else {                                                                                   \
            FBN_SIMD                                                                               \
            for (ptrdiff_t j = 0; j < width; j++)                                                  \
                dxr[j] = a[j] * dyr[j] - k[j] * ((xr[j] - mhi[j]) - mlo[j]) + c[j];                \
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
