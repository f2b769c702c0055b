/*
 * The run-time choice of ISA level (included by _simd.h after the loops of every level).
 *
 * fbn_ops holds one pointer per loop; fbn_levels[] has one table per compiled level, lowest
 * first, and fbn_cur is the active table, copied from it by fbn_set_level. The entry points the
 * Cython kernels call (fbn_sums_float, ...) are inline wrappers that call through fbn_cur.
 * A level is switched for the whole process, between kernel calls: one call of a kernel reads
 * the table once per task, so switching while a kernel runs on another thread may mix levels in
 * its result (never an invalid instruction: only levels the CPU runs are ever selected).
 */
#ifndef FASTBN_SIMD_DISPATCH_H
#define FASTBN_SIMD_DISPATCH_H

#define FBN_OPS_T(T)                                                                             \
    void (*sums_##T)(const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *, int,     \
                     double *, double *);                                                        \
    void (*sums_rows_##T)(const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *, double *,      \
                          double *);                                                             \
    void (*norm_##T)(const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *,     \
                     const T *, const T *, int);                                                 \
    void (*norm_rows_##T)(const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *,           \
                          const T *, const T *, int);                                            \
    void (*bwd_sums_##T)(const T *, const T *, const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t,      \
                         ptrdiff_t, const T *, const T *, int, double *, double *);              \
    void (*bwd_sums_rows_##T)(const T *, const T *, const T *, ptrdiff_t, ptrdiff_t, ptrdiff_t, \
                              const T *, const T *, double *, double *);                         \
    void (*bwd_dx_##T)(const T *, const T *, const T *, T *, ptrdiff_t, ptrdiff_t, ptrdiff_t,   \
                       ptrdiff_t, const T *, const T *, const T *, const T *);                   \
    void (*bwd_dx_rows_##T)(const T *, const T *, const T *, T *, ptrdiff_t, ptrdiff_t,         \
                            ptrdiff_t, const T *, const T *, const T *, const T *);

/* the masked-statistics loops (issue 18), a mask byte per position or row */
#define FBN_MOPS_T(T)                                                                            \
    void (*msums_##T)(const T *, const unsigned char *, ptrdiff_t, ptrdiff_t, ptrdiff_t,        \
                      ptrdiff_t, ptrdiff_t, const T *, int, double *, double *);                 \
    void (*msums_rows_##T)(const T *, const unsigned char *, ptrdiff_t, ptrdiff_t, ptrdiff_t,   \
                           const T *, double *, double *);                                       \
    void (*mbwd_dx_##T)(const T *, const T *, const T *, const unsigned char *, T *, ptrdiff_t, \
                        ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *, const T *,       \
                        const T *, const T *);                                                   \
    void (*mbwd_dx_rows_##T)(const T *, const T *, const T *, const unsigned char *, T *,       \
                             ptrdiff_t, ptrdiff_t, ptrdiff_t, const T *, const T *, const T *,  \
                             const T *);

typedef struct {
    const char *name;
    FBN_OPS_T(float)
    FBN_OPS_T(double)
    uint64_t (*stream_read)(const unsigned char *, ptrdiff_t);
    FBN_MOPS_T(float)
    FBN_MOPS_T(double)
    /* the 2-byte float conversions (_half_loops.h) */
    void (*f16_to_f32)(const uint16_t *, float *, ptrdiff_t);
    void (*f32_to_f16)(const float *, uint16_t *, ptrdiff_t);
    void (*bf16_to_f32)(const uint16_t *, float *, ptrdiff_t);
    void (*f32_to_bf16)(const float *, uint16_t *, ptrdiff_t);
} fbn_ops;

/* L: the level of a table's loops; R: the level of its rows loops (channels-last, and short NCL
 * segments read as rows). x86-64-v4 takes x86-64-v3's 256-bit rows loops: on the Zen 5 (AMD
 * EPYC family 26 model 2, 1 thread, float32) the 512-bit ones ran channels-last inference at
 * 1.4-1.85x their time ((16, 112, 112, 64): 3.9 against 2.3 ms, a copy 2.0 ms), the training
 * forward at up to 1.5x and the backward at up to 1.4x, while their NCL loops are as fast as
 * AVX2's or faster. ResNet-50's channels-last step against PyTorch went 0.90x -> 1.02x. */
#define FBN_OPS_ENTRIES_T(T, L, R)                                                               \
    fbn_sums_##T##_##L, fbn_sums_rows_##T##_##R, fbn_norm_##T##_##L, fbn_norm_rows_##T##_##R,   \
        fbn_bwd_sums_##T##_##L, fbn_bwd_sums_rows_##T##_##R, fbn_bwd_dx_##T##_##L,              \
        fbn_bwd_dx_rows_##T##_##R
#define FBN_MOPS_ENTRIES_T(T, L)                                                                 \
    fbn_msums_##T##_##L, fbn_msums_rows_##T##_##L, fbn_mbwd_dx_##T##_##L,                       \
        fbn_mbwd_dx_rows_##T##_##L
#define FBN_OPS_TABLE(name, L, R)                                                                \
    { name, FBN_OPS_ENTRIES_T(float, L, R), FBN_OPS_ENTRIES_T(double, L, R), fbn_stream_read_##L, \
      FBN_MOPS_ENTRIES_T(float, L), FBN_MOPS_ENTRIES_T(double, L),                               \
      fbn_f16_to_f32_##L, fbn_f32_to_f16_##L, fbn_bf16_to_f32_##L, fbn_f32_to_bf16_##L }

static const fbn_ops fbn_levels[FBN_LEVELS] = {
    FBN_OPS_TABLE("baseline", base, base),
#if FBN_LEVELS == 3
    FBN_OPS_TABLE("x86-64-v3", v3, v3),
    FBN_OPS_TABLE("x86-64-v4", v4, v3),
#endif
};

static fbn_ops fbn_cur = FBN_OPS_TABLE("baseline", base, base);
static int fbn_cur_level = 0;

static int fbn_nlevels(void) { return FBN_LEVELS; }
static const char *fbn_level_name(int i) { return i >= 0 && i < FBN_LEVELS ? fbn_levels[i].name : NULL; }
static int fbn_current_level(void) { return fbn_cur_level; }

/* The highest level index this CPU (and its OS, for the AVX/AVX-512 register state) runs. */
static int fbn_best_level(void)
{
#if FBN_LEVELS == 3
    __builtin_cpu_init();
#if defined(__clang__) && __clang_major__ < 16
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    int v3 = __builtin_cpu_supports("x86-64-v3");
    int v4 = __builtin_cpu_supports("x86-64-v4");
#endif
    return v4 ? 2 : v3 ? 1 : 0;
#else
    return 0;
#endif
}

/* Make level i the active one: 0 on success, -1 when i is not a level this CPU runs. */
static int fbn_set_level(int i)
{
    if (i < 0 || i > fbn_best_level())
        return -1;
    fbn_cur = fbn_levels[i];
    fbn_cur_level = i;
    return 0;
}

/* The index of a level name, or -1. */
static int fbn_level_index(const char *name)
{
    for (int i = 0; i < FBN_LEVELS; i++)
        if (strcmp(name, fbn_levels[i].name) == 0)
            return i;
    return -1;
}

/* ------------------------------------------------------------ the entry points of _kernels */
#define FBN_WRAP_T(T)                                                                            \
    static inline void fbn_sums_##T(const T *x, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0,    \
                                    ptrdiff_t C, const T *k, int by_channel, double *s1,        \
                                    double *s2)                                                  \
    { fbn_cur.sums_##T(x, nseg, len, c0, C, k, by_channel, s1, s2); }                           \
    static inline void fbn_sums_rows_##T(const T *x, ptrdiff_t nrows, ptrdiff_t stride,         \
                                         ptrdiff_t width, const T *k, double *a1, double *a2)   \
    { fbn_cur.sums_rows_##T(x, nrows, stride, width, k, a1, a2); }                              \
    static inline void fbn_norm_##T(const T *x, T *y, ptrdiff_t nseg, ptrdiff_t len,            \
                                    ptrdiff_t c0, ptrdiff_t C, const T *mhi, const T *a,        \
                                    const T *b, int relu)                                        \
    { fbn_cur.norm_##T(x, y, nseg, len, c0, C, mhi, a, b, relu); }                              \
    static inline void fbn_norm_rows_##T(const T *x, T *y, ptrdiff_t nrows, ptrdiff_t stride,   \
                                         ptrdiff_t width, const T *mhi, const T *a, const T *b, \
                                         int relu)                                               \
    { fbn_cur.norm_rows_##T(x, y, nrows, stride, width, mhi, a, b, relu); }                     \
    static inline void fbn_bwd_sums_##T(const T *dy, const T *x, const T *y, ptrdiff_t nseg,    \
                                        ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,               \
                                        const T *mhi, const T *mlo, int by_channel,             \
                                        double *s1, double *s2)                                  \
    { fbn_cur.bwd_sums_##T(dy, x, y, nseg, len, c0, C, mhi, mlo, by_channel, s1, s2); }         \
    static inline void fbn_bwd_sums_rows_##T(const T *dy, const T *x, const T *y,               \
                                             ptrdiff_t nrows, ptrdiff_t stride,                 \
                                             ptrdiff_t width, const T *mhi, const T *mlo,       \
                                             double *a1, double *a2)                             \
    { fbn_cur.bwd_sums_rows_##T(dy, x, y, nrows, stride, width, mhi, mlo, a1, a2); }            \
    static inline void fbn_bwd_dx_##T(const T *dy, const T *x, const T *y, T *dx,               \
                                      ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C, \
                                      const T *mhi, const T *a, const T *k, const T *c)         \
    { fbn_cur.bwd_dx_##T(dy, x, y, dx, nseg, len, c0, C, mhi, a, k, c); }                       \
    static inline void fbn_bwd_dx_rows_##T(const T *dy, const T *x, const T *y, T *dx,          \
                                           ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t width,  \
                                           const T *mhi, const T *a, const T *k, const T *c)    \
    { fbn_cur.bwd_dx_rows_##T(dy, x, y, dx, nrows, stride, width, mhi, a, k, c); }
FBN_WRAP_T(float)
FBN_WRAP_T(double)
#undef FBN_WRAP_T

#define FBN_MWRAP_T(T)                                                                           \
    static inline void fbn_msums_##T(const T *x, const unsigned char *mk, ptrdiff_t nseg,       \
                                     ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,                  \
                                     ptrdiff_t mstride, const T *k, int by_channel, double *s1, \
                                     double *s2)                                                 \
    { fbn_cur.msums_##T(x, mk, nseg, len, c0, C, mstride, k, by_channel, s1, s2); }             \
    static inline void fbn_msums_rows_##T(const T *x, const unsigned char *mk, ptrdiff_t nrows, \
                                          ptrdiff_t stride, ptrdiff_t width, const T *k,        \
                                          double *a1, double *a2)                                \
    { fbn_cur.msums_rows_##T(x, mk, nrows, stride, width, k, a1, a2); }                         \
    static inline void fbn_mbwd_dx_##T(const T *dy, const T *x, const T *y,                     \
                                       const unsigned char *mk, T *dx, ptrdiff_t nseg,          \
                                       ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,                \
                                       ptrdiff_t mstride, const T *mhi, const T *a, const T *k, \
                                       const T *c)                                               \
    { fbn_cur.mbwd_dx_##T(dy, x, y, mk, dx, nseg, len, c0, C, mstride, mhi, a, k, c); }         \
    static inline void fbn_mbwd_dx_rows_##T(const T *dy, const T *x, const T *y,                \
                                            const unsigned char *mk, T *dx, ptrdiff_t nrows,    \
                                            ptrdiff_t stride, ptrdiff_t width, const T *mhi,    \
                                            const T *a, const T *k, const T *c)                 \
    { fbn_cur.mbwd_dx_rows_##T(dy, x, y, mk, dx, nrows, stride, width, mhi, a, k, c); }
FBN_MWRAP_T(float)
FBN_MWRAP_T(double)
#undef FBN_MWRAP_T

static inline uint64_t fbn_stream_read(const unsigned char *p, ptrdiff_t n)
{
    return fbn_cur.stream_read(p, n);
}

/* dst[i] = src[i] converted, i < n (see _half_loops.h for the rounding and NaN rules) */
static inline void fbn_f16_to_f32(const uint16_t *src, float *dst, ptrdiff_t n)
{ fbn_cur.f16_to_f32(src, dst, n); }
static inline void fbn_f32_to_f16(const float *src, uint16_t *dst, ptrdiff_t n)
{ fbn_cur.f32_to_f16(src, dst, n); }
static inline void fbn_bf16_to_f32(const uint16_t *src, float *dst, ptrdiff_t n)
{ fbn_cur.bf16_to_f32(src, dst, n); }
static inline void fbn_f32_to_bf16(const float *src, uint16_t *dst, ptrdiff_t n)
{ fbn_cur.f32_to_bf16(src, dst, n); }

#endif /* FASTBN_SIMD_DISPATCH_H */
