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
/* fold4: the lanes of four registers a, b, c, d (one per segment) halved pairwise in T (lane
 * j += lane j + N/2, then, for float, j += j + N/4) and widened to double, two segments per
 * double register: r0 = [a | b], r1 = [c | d], FBN_ND / 2 lanes each. fin: the FBN_ND / 2 lanes
 * of each half of a double register halved pairwise to one value (ta, tb). Explicit shuffles
 * (a generic loop over an array of lanes had been kept on the stack). */
#if FBN_TF
#define FBN_NL (FBN_VB / 4)
#else
#define FBN_NL (FBN_VB / 8)
#endif
#if FBN_NL == 16
#define FBN_LO1 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define FBN_HI1 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define FBN_LO2 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define FBN_HI2 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define FBN_LOH 0, 1, 2, 3, 4, 5, 6, 7
#define FBN_HIH 8, 9, 10, 11, 12, 13, 14, 15
#elif FBN_NL == 8
#define FBN_LO1 0, 1, 2, 3, 8, 9, 10, 11
#define FBN_HI1 4, 5, 6, 7, 12, 13, 14, 15
#define FBN_LO2 0, 1, 4, 5, 8, 9, 12, 13
#define FBN_HI2 2, 3, 6, 7, 10, 11, 14, 15
#define FBN_LOH 0, 1, 2, 3
#define FBN_HIH 4, 5, 6, 7
#elif FBN_NL == 4
#define FBN_LO1 0, 1, 4, 5
#define FBN_HI1 2, 3, 6, 7
#define FBN_LO2 0, 2, 4, 6
#define FBN_HI2 1, 3, 5, 7
#define FBN_LOH 0, 1
#define FBN_HIH 2, 3
#elif FBN_NL == 2
#define FBN_LO1 0, 2
#define FBN_HI1 1, 3
#else
#error "fastbn: unsupported vector width"
#endif
static inline void FBN_FN(fold4)(vt a, vt b, vt c, vt d, vd *r0, vd *r1)
{
    vt ab = __builtin_shufflevector(a, b, FBN_LO1) + __builtin_shufflevector(a, b, FBN_HI1);
    vt cd = __builtin_shufflevector(c, d, FBN_LO1) + __builtin_shufflevector(c, d, FBN_HI1);
#if FBN_TF
    typedef float vh __attribute__((vector_size(FBN_VB / 2)));
    vt r = __builtin_shufflevector(ab, cd, FBN_LO2) + __builtin_shufflevector(ab, cd, FBN_HI2);
    vh lo = __builtin_shufflevector(r, r, FBN_LOH), hi = __builtin_shufflevector(r, r, FBN_HIH);
    *r0 = __builtin_convertvector(lo, vd);
    *r1 = __builtin_convertvector(hi, vd);
#else
    *r0 = ab;
    *r1 = cd;
#endif
}
static inline void FBN_FN(fin)(vd v, double *ta, double *tb)
{
    typedef double vd2 __attribute__((vector_size(16)));
#if FBN_VB == 64
    vd f = v + __builtin_shufflevector(v, v, 2, 3, 2, 3, 6, 7, 6, 7);
    f = f + __builtin_shufflevector(f, f, 1, 1, 1, 1, 5, 5, 5, 5);
    vd2 r = __builtin_shufflevector(f, f, 0, 4);
#elif FBN_VB == 32
    vd f = v + __builtin_shufflevector(v, v, 1, 1, 3, 3);
    vd2 r = __builtin_shufflevector(f, f, 0, 2);
#else
    vd2 r = v;
#endif
    memcpy(ta, &r, sizeof(r)); /* ta, tb = ta + 1: one store, reloaded by store4 */
    (void)tb;
}
/* lanes j and j + FBN_N/2 of a float block, added in double (a double block as it is) */
static inline vd FBN_FN(widen)(vt b)
{
#if FBN_TF
    typedef float vh __attribute__((vector_size(FBN_VB / 2)));
    vh lo = __builtin_shufflevector(b, b, FBN_LOH), hi = __builtin_shufflevector(b, b, FBN_HIH);
    return __builtin_convertvector(lo, vd) + __builtin_convertvector(hi, vd);
#else
    return b;
#endif
}
/* the double lanes of one register halved pairwise (lane j += lane j + w, w = ND/2, ..., 1) */
static inline double FBN_FN(sumd)(vd v)
{
#if FBN_VB == 64
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7);
    v = v + __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3);
    v = v + __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1);
#elif FBN_VB == 32
    v = v + __builtin_shufflevector(v, v, 2, 3, 2, 3);
    v = v + __builtin_shufflevector(v, v, 1, 1, 1, 1);
#else
    v = v + __builtin_shufflevector(v, v, 1, 1);
#endif
    return v[0];
}
/* fold8t: the sums of a one-block segment (7x7 maps), four segments' two sums at once: each
 * register's lanes halved pairwise in T down to one (a block's T sums are already rounded to
 * T, and folding them first is cheaper than widening), then converted: t1[g] = fold(p_g),
 * t2[g] = fold(q_g). */
static inline void FBN_FN(fold8t)(vt p0, vt p1, vt p2, vt p3, vt q0, vt q1, vt q2, vt q3,
                                  double *t1, double *t2)
{
#define FBN_S __builtin_shufflevector
    vt ab = FBN_S(p0, p1, FBN_LO1) + FBN_S(p0, p1, FBN_HI1);
    vt cd = FBN_S(p2, p3, FBN_LO1) + FBN_S(p2, p3, FBN_HI1);
    vt ef = FBN_S(q0, q1, FBN_LO1) + FBN_S(q0, q1, FBN_HI1);
    vt gh = FBN_S(q2, q3, FBN_LO1) + FBN_S(q2, q3, FBN_HI1);
#if FBN_NL == 2
    t1[0] = ab[0]; t1[1] = ab[1]; t1[2] = cd[0]; t1[3] = cd[1];
    t2[0] = ef[0]; t2[1] = ef[1]; t2[2] = gh[0]; t2[3] = gh[1];
#else
    vt P = FBN_S(ab, cd, FBN_LO2) + FBN_S(ab, cd, FBN_HI2);
    vt Q = FBN_S(ef, gh, FBN_LO2) + FBN_S(ef, gh, FBN_HI2);
#if FBN_NL == 4
    typedef double vd4 __attribute__((vector_size(32)));
    vd4 r1 = __builtin_convertvector(P, vd4), r2 = __builtin_convertvector(Q, vd4);
    memcpy(t1, &r1, sizeof(r1)); /* whole-vector stores: store4 reloads them as vectors */
    memcpy(t2, &r2, sizeof(r2));
#else
    typedef double vd8 __attribute__((vector_size(64)));
#if FBN_NL == 8
    vt r = FBN_S(P, Q, 0, 2, 4, 6, 8, 10, 12, 14) + FBN_S(P, Q, 1, 3, 5, 7, 9, 11, 13, 15);
#else
    typedef T vh8 __attribute__((vector_size(8 * sizeof(T))));
    vt pq = FBN_S(P, Q, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            FBN_S(P, Q, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    vh8 r = FBN_S(pq, pq, 0, 2, 4, 6, 8, 10, 12, 14) + FBN_S(pq, pq, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
    vd8 rd = __builtin_convertvector(r, vd8);
    typedef double vd4 __attribute__((vector_size(32)));
    vd4 r1 = __builtin_shufflevector(rd, rd, 0, 1, 2, 3), r2 = __builtin_shufflevector(rd, rd, 4, 5, 6, 7);
    memcpy(t1, &r1, sizeof(r1)); /* whole-vector stores: store4 reloads them as vectors */
    memcpy(t2, &r2, sizeof(r2));
#endif
#endif
#undef FBN_S
}
#undef FBN_LO1
#undef FBN_HI1
#undef FBN_LO2
#undef FBN_HI2
#undef FBN_LOH
#undef FBN_HIH
#undef FBN_NL
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
static inline void FBN_FN(fold4)(vt a, vt b, vt c, vt d, vd *r0, vd *r1)
{
    const vt *in[4] = {&a, &b, &c, &d};
    vd *out[2] = {r0, r1};
    const int H = FBN_ND / 2;
    for (int g = 0; g < 4; g++) {
        T h[FBN_N];
        memcpy(h, in[g]->v, sizeof(h));
        for (int j = 0; j < FBN_N / 2; j++)
            h[j] = h[j] + h[j + FBN_N / 2];
#if FBN_TF
        for (int j = 0; j < FBN_N / 4; j++)
            h[j] = h[j] + h[j + FBN_N / 4];
#endif
        for (int j = 0; j < H; j++)
            out[g / 2]->v[(g % 2) * H + j] = (double)h[j];
    }
}
static inline void FBN_FN(fin)(vd v, double *ta, double *tb)
{
    const int H = FBN_ND / 2;
    for (int w = H / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) {
            v.v[j] = v.v[j] + v.v[j + w];
            v.v[H + j] = v.v[H + j] + v.v[H + j + w];
        }
    *ta = v.v[0];
    *tb = v.v[H];
}
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
static inline void FBN_FN(fold8t)(vt p0, vt p1, vt p2, vt p3, vt q0, vt q1, vt q2, vt q3,
                                  double *t1, double *t2)
{
    const vt *in[8] = {&p0, &p1, &p2, &p3, &q0, &q1, &q2, &q3};
    for (int g = 0; g < 8; g++) {
        T h[FBN_N];
        memcpy(h, in[g]->v, sizeof(h));
        for (int w = FBN_N / 2; w >= 1; w /= 2)
            for (int j = 0; j < w; j++)
                h[j] = h[j] + h[j + w];
        (g < 4 ? t1 : t2)[g % 4] = (double)h[0];
    }
}
static inline double FBN_FN(sumd)(vd v)
{
    for (int w = FBN_ND / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            v.v[j] += v.v[j + w];
    return v.v[0];
}
#endif

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

/* s1[o_g] += t1[g], s2[o_g] += t2[g] for the ng segments of a group: o_g = cg[g] (by channel) or
 * s + g (cg NULL); four consecutive slots as one vector add. */
static inline void FBN_FN(store4)(double *FBN_RESTRICT s1, double *FBN_RESTRICT s2,
                                  const ptrdiff_t *cg, ptrdiff_t s, int ng, const double *t1,
                                  const double *t2)
{
#if FBN_VECTOR_EXT
    if (ng == 4 && (!cg || cg[3] == cg[0] + 3)) {
        typedef double vq __attribute__((vector_size(32)));
        double *o1 = s1 + (cg ? cg[0] : s), *o2 = s2 + (cg ? cg[0] : s);
        vq a, b, u, w;
        memcpy(&a, o1, sizeof(a));
        memcpy(&b, o2, sizeof(b));
        memcpy(&u, t1, sizeof(u));
        memcpy(&w, t2, sizeof(w));
        a += u;
        b += w;
        memcpy(o1, &a, sizeof(a));
        memcpy(o2, &b, sizeof(b));
        return;
    }
#endif
    for (int g = 0; g < ng; g++) {
        ptrdiff_t o = cg ? cg[g] : s + g;
        s1[o] += t1[g];
        s2[o] += t2[g];
    }
}

/* Segments of more than FBN_GROUP_BYTES are summed one at a time, in memory order (four long
 * segments side by side were four streams, 15-40 % slower out of L2), widened into double lanes
 * per block: by two independent pairs of accumulators (even and odd registers) at 16- and
 * 32-byte levels, by one pair at x86-64-v4 (measured faster there, as main's clone had been). */
#define FBN_GROUP_BYTES 512
#if FBN_VB == 64 /* one pair: 43 -> 55 GB/s on (32,64,56,56), two were slower here */
static inline void FBN_FN(sums1)(const T *FBN_RESTRICT xs, ptrdiff_t len, T kc, double *t1,
                                 double *t2)
{
    const ptrdiff_t N = FBN_N;
    vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
    ptrdiff_t i = 0;
    while (i < len) {
        vt p1 = FBN_FN(vzero)(), p2 = p1, v;
        int q = 0;
        for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
            v = FBN_FN(vsubs)(FBN_FN(vload)(xs + i), kc);
            p1 = FBN_FN(vadd)(p1, v);
            p2 = FBN_FN(vmadd)(p2, v, v);
        }
        if (q < FBN_BLOCK && i < len) {
            v = FBN_FN(vtail)(xs, i, len, kc);
            p1 = FBN_FN(vadd)(p1, v);
            p2 = FBN_FN(vmadd)(p2, v, v);
            i = len;
        }
        a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(p1));
        a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(p2));
    }
    *t1 = FBN_FN(sumd)(a1);
    *t2 = FBN_FN(sumd)(a2);
}
#else
static inline void FBN_FN(sums1)(const T *FBN_RESTRICT xs, ptrdiff_t len, T kc, double *t1,
                                 double *t2)
{
    const ptrdiff_t N = FBN_N;
    vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
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
        } else {
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
        }
        a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(FBN_FN(vadd)(p1, q1)));
        a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(FBN_FN(vadd)(p2, q2)));
    }
    *t1 = FBN_FN(sumd)(a1);
    *t2 = FBN_FN(sumd)(a2);
}
#endif

/* s1[o] += sum(x - k[c]), s2[o] += sum((x - k[c])^2) for each of nseg segments of len values,
 * contiguous in memory order: segment s belongs to channel c = (c0 + s) % C and adds into slot
 * o = c when by_channel (runs that span every channel), else o = s (a slot per segment).
 * Walking memory in order keeps the prefetchers streaming: gathering one channel's segments,
 * C * len values apart, ran at a third of the speed (7-16 GB/s) once x left L2.
 * Four consecutive segments are summed side by side (four independent accumulator chains per
 * sum, and one transposed fold, fold4, per block of four segments instead of a fold per
 * segment: a 7x7 map is only 3-13 registers). A block is at most FBN_BLOCK registers per
 * segment, summed in T, then halved in T and widened into double lanes (fold4); the segment's
 * double lanes are folded at the end (fin). A last group of fewer than four segments repeats
 * its last segment in the missing places and drops those results: each segment's sums are the
 * same arithmetic wherever it falls, so the result does not depend on the partition into calls.
 * IN x, k[C]; INOUT s1, s2 */
static void FBN_FN(sums)(const T *FBN_RESTRICT x, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0,
                         ptrdiff_t C, const T *FBN_RESTRICT k, int by_channel,
                         double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)
{
    const ptrdiff_t N = FBN_N;
    ptrdiff_t c = c0;
    if (len * (ptrdiff_t)sizeof(T) > FBN_GROUP_BYTES) {
        for (ptrdiff_t s = 0; s < nseg; s++) {
            double t1, t2;
            FBN_FN(sums1)(x + s * len, len, k[c], &t1, &t2);
            s1[by_channel ? c : s] += t1;
            s2[by_channel ? c : s] += t2;
            if (++c == C)
                c = 0;
        }
        return;
    }
    const int one_block = len <= FBN_BLOCK * N; /* the block loop runs once */
    for (ptrdiff_t s = 0; s < nseg; s += 4) {
        const int ng = nseg - s < 4 ? (int)(nseg - s) : 4;
        ptrdiff_t cg[4];
        const T *xg[4];
        for (int g = 0; g < 4; g++) {
            int e = g < ng ? g : ng - 1;
            ptrdiff_t ce = c + e;
            while (ce >= C) /* C may be below 4 */
                ce -= C;
            cg[g] = ce;
            xg[g] = x + (s + e) * len;
        }
        const T *x0 = xg[0], *x1 = xg[1], *x2 = xg[2], *x3 = xg[3];
        const T k0 = k[cg[0]], k1 = k[cg[1]], k2 = k[cg[2]], k3 = k[cg[3]];
        vd d1a = FBN_FN(dzero)(), d1b = d1a, d2a = d1a, d2b = d1a, ra, rb;
        double t1[4], t2[4];
        ptrdiff_t i = 0;
        vt p0 = FBN_FN(vzero)(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
        while (i < len) {
            p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = FBN_FN(vzero)();
            vt v0, v1, v2, v3;
            int q = 0;
#define FBN_STEP(V0, V1, V2, V3)                                                                 \
    do {                                                                                         \
        v0 = (V0); v1 = (V1); v2 = (V2); v3 = (V3);                                              \
        p0 = FBN_FN(vadd)(p0, v0); q0 = FBN_FN(vmadd)(q0, v0, v0);                               \
        p1 = FBN_FN(vadd)(p1, v1); q1 = FBN_FN(vmadd)(q1, v1, v1);                               \
        p2 = FBN_FN(vadd)(p2, v2); q2 = FBN_FN(vmadd)(q2, v2, v2);                               \
        p3 = FBN_FN(vadd)(p3, v3); q3 = FBN_FN(vmadd)(q3, v3, v3);                               \
    } while (0)
#define FBN_LD(xp, kk, off) FBN_FN(vsubs)(FBN_FN(vload)((xp) + (off)), kk)
            if (i + FBN_BLOCK * N <= len) { /* a whole block, unrolled: the same sums */
                FBN_PRAGMA(GCC unroll 8)
                for (int u = 0; u < FBN_BLOCK; u++)
                    FBN_STEP(FBN_LD(x0, k0, i + u * N), FBN_LD(x1, k1, i + u * N),
                             FBN_LD(x2, k2, i + u * N), FBN_LD(x3, k3, i + u * N));
                q = FBN_BLOCK;
                i += FBN_BLOCK * N;
            }
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N)
                FBN_STEP(FBN_LD(x0, k0, i), FBN_LD(x1, k1, i), FBN_LD(x2, k2, i),
                         FBN_LD(x3, k3, i));
            if (q < FBN_BLOCK && i < len) {
                FBN_STEP(FBN_FN(vtail)(x0, i, len, k0), FBN_FN(vtail)(x1, i, len, k1),
                         FBN_FN(vtail)(x2, i, len, k2), FBN_FN(vtail)(x3, i, len, k3));
                i = len;
            }
#undef FBN_LD
#undef FBN_STEP
            if (one_block)
                break; /* i == len */
            FBN_FN(fold4)(p0, p1, p2, p3, &ra, &rb);
            d1a = FBN_FN(dadd)(d1a, ra);
            d1b = FBN_FN(dadd)(d1b, rb);
            FBN_FN(fold4)(q0, q1, q2, q3, &ra, &rb);
            d2a = FBN_FN(dadd)(d2a, ra);
            d2b = FBN_FN(dadd)(d2b, rb);
        }
        if (one_block) {
            FBN_FN(fold8t)(p0, p1, p2, p3, q0, q1, q2, q3, t1, t2);
        } else {
            FBN_FN(fin)(d1a, t1 + 0, t1 + 1);
            FBN_FN(fin)(d1b, t1 + 2, t1 + 3);
            FBN_FN(fin)(d2a, t2 + 0, t2 + 1);
            FBN_FN(fin)(d2b, t2 + 2, t2 + 3);
        }
        FBN_FN(store4)(s1, s2, by_channel ? cg : NULL, s, ng, t1, t2);
        c = cg[ng - 1] + 1 == C ? 0 : cg[ng - 1] + 1;
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

/* The last len - i < N values of a backward segment as (g, v) registers, as vtail: g = 0 pads.
 * IN gs, xs, ys (or NULL); OUT *g, *v (v = (x - h) - l) */
static inline void FBN_FN(btail)(const T *gs, const T *xs, const T *ys, ptrdiff_t i,
                                 ptrdiff_t len, T h, T l, vt *g, vt *v)
{
    vt gg, vv;
    if (len >= FBN_N) {
        gg = FBN_FN(vload)(gs + len - FBN_N);
        if (ys)
            gg = FBN_FN(vmask)(gg, FBN_FN(vload)(ys + len - FBN_N));
        gg = FBN_FN(vdrop)(gg, (int)(FBN_N - (len - i)));
        vv = FBN_FN(vload)(xs + len - FBN_N);
    } else {
        T tg[FBN_N], tx[FBN_N];
        for (int j = 0; j < FBN_N; j++) {
            tg[j] = j < len && (!ys || ys[j] > 0) ? gs[j] : (T)0;
            tx[j] = j < len ? xs[j] : h;
        }
        gg = FBN_FN(vload)(tg);
        vv = FBN_FN(vload)(tx);
    }
    *g = gg;
    *v = FBN_FN(vsubs)(FBN_FN(vsubs)(vv, h), l);
}

/* One long backward segment (more than FBN_GROUP_BYTES), in memory order, as fbn_sums1.
 * OUT *t1, *t2 */
static inline void FBN_FN(bwd1)(const T *FBN_RESTRICT gs, const T *FBN_RESTRICT xs,
                                const T *FBN_RESTRICT ys, ptrdiff_t len, T h, T l, double *t1,
                                double *t2)
{
    const ptrdiff_t N = FBN_N;
    vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
    ptrdiff_t i = 0;
    while (i < len) {
        vt b1 = FBN_FN(vzero)(), b2 = b1, g, v;
        int q = 0;
        if (ys) {
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
                g = FBN_FN(vmask)(FBN_FN(vload)(gs + i), FBN_FN(vload)(ys + i));
                v = FBN_FN(vsubs)(FBN_FN(vsubs)(FBN_FN(vload)(xs + i), h), l);
                b1 = FBN_FN(vadd)(b1, g);
                b2 = FBN_FN(vmadd)(b2, g, v);
            }
        } else {
            for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
                g = FBN_FN(vload)(gs + i);
                v = FBN_FN(vsubs)(FBN_FN(vsubs)(FBN_FN(vload)(xs + i), h), l);
                b1 = FBN_FN(vadd)(b1, g);
                b2 = FBN_FN(vmadd)(b2, g, v);
            }
        }
        if (q < FBN_BLOCK && i < len) {
            FBN_FN(btail)(gs, xs, ys, i, len, h, l, &g, &v);
            b1 = FBN_FN(vadd)(b1, g);
            b2 = FBN_FN(vmadd)(b2, g, v);
            i = len;
        }
        a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(b1));
        a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(b2));
    }
    *t1 = FBN_FN(sumd)(a1);
    *t2 = FBN_FN(sumd)(a2);
}

/* s1[o] += sum(g), s2[o] += sum(g * ((x - mhi[c]) - mlo[c])) with g = dy, or dy masked by y > 0
 * when y != NULL, over nseg segments in memory order (channels, slots, groups of four segments
 * and blocks as in fbn_sums). mhi + mlo is the channel's mean split into a T-precision head and
 * tail. The ReLU mask is a select on loaded values (a conditional load stays a branch).
 * IN dy, x, y (or NULL), mhi/mlo[C]; INOUT s1, s2 */
static void FBN_FN(bwd_sums)(const T *FBN_RESTRICT dy, const T *FBN_RESTRICT x,
                             const T *FBN_RESTRICT y, ptrdiff_t nseg, ptrdiff_t len,
                             ptrdiff_t c0, ptrdiff_t C, const T *FBN_RESTRICT mhi,
                             const T *FBN_RESTRICT mlo, int by_channel,
                             double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)
{
    const ptrdiff_t N = FBN_N;
    ptrdiff_t c = c0;
    if (len * (ptrdiff_t)sizeof(T) > FBN_GROUP_BYTES) {
        for (ptrdiff_t s = 0; s < nseg; s++) {
            double t1, t2;
            FBN_FN(bwd1)(dy + s * len, x + s * len, y ? y + s * len : NULL, len, mhi[c], mlo[c],
                         &t1, &t2);
            s1[by_channel ? c : s] += t1;
            s2[by_channel ? c : s] += t2;
            if (++c == C)
                c = 0;
        }
        return;
    }
    const int one_block = len <= FBN_BLOCK * N; /* the block loop runs once */
    for (ptrdiff_t s = 0; s < nseg; s += 4) {
        const int ng = nseg - s < 4 ? (int)(nseg - s) : 4;
        ptrdiff_t cg[4], og[4];
        for (int g = 0; g < 4; g++) {
            int e = g < ng ? g : ng - 1;
            ptrdiff_t ce = c + e;
            while (ce >= C)
                ce -= C;
            cg[g] = ce;
            og[g] = (s + e) * len;
        }
        const T *g0 = dy + og[0], *g1 = dy + og[1], *g2 = dy + og[2], *g3 = dy + og[3];
        const T *x0 = x + og[0], *x1 = x + og[1], *x2 = x + og[2], *x3 = x + og[3];
        const T *y0 = y ? y + og[0] : NULL, *y1 = y ? y + og[1] : NULL;
        const T *y2 = y ? y + og[2] : NULL, *y3 = y ? y + og[3] : NULL;
        const T h0 = mhi[cg[0]], h1 = mhi[cg[1]], h2 = mhi[cg[2]], h3 = mhi[cg[3]];
        const T l0 = mlo[cg[0]], l1 = mlo[cg[1]], l2 = mlo[cg[2]], l3 = mlo[cg[3]];
        vd d1a = FBN_FN(dzero)(), d1b = d1a, d2a = d1a, d2b = d1a, ra, rb;
        double t1[4], t2[4];
        ptrdiff_t i = 0;
        vt p0 = FBN_FN(vzero)(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
        while (i < len) {
            p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = FBN_FN(vzero)();
            vt a0, a1, a2, a3, v0, v1, v2, v3;
            int q = 0;
#define FBN_G(gp, yp) (yp ? FBN_FN(vmask)(FBN_FN(vload)(gp + i), FBN_FN(vload)(yp + i)) \
                          : FBN_FN(vload)(gp + i))
#define FBN_V(xp, hh, ll) FBN_FN(vsubs)(FBN_FN(vsubs)(FBN_FN(vload)(xp + i), hh), ll)
#define FBN_ACC()                                                                                \
    do {                                                                                         \
        p0 = FBN_FN(vadd)(p0, a0); q0 = FBN_FN(vmadd)(q0, a0, v0);                               \
        p1 = FBN_FN(vadd)(p1, a1); q1 = FBN_FN(vmadd)(q1, a1, v1);                               \
        p2 = FBN_FN(vadd)(p2, a2); q2 = FBN_FN(vmadd)(q2, a2, v2);                               \
        p3 = FBN_FN(vadd)(p3, a3); q3 = FBN_FN(vmadd)(q3, a3, v3);                               \
    } while (0)
            if (y) {
                for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
                    a0 = FBN_G(g0, y0); a1 = FBN_G(g1, y1); a2 = FBN_G(g2, y2); a3 = FBN_G(g3, y3);
                    v0 = FBN_V(x0, h0, l0); v1 = FBN_V(x1, h1, l1);
                    v2 = FBN_V(x2, h2, l2); v3 = FBN_V(x3, h3, l3);
                    FBN_ACC();
                }
            } else {
                for (; q < FBN_BLOCK && i + N <= len; q++, i += N) {
                    a0 = FBN_FN(vload)(g0 + i); a1 = FBN_FN(vload)(g1 + i);
                    a2 = FBN_FN(vload)(g2 + i); a3 = FBN_FN(vload)(g3 + i);
                    v0 = FBN_V(x0, h0, l0); v1 = FBN_V(x1, h1, l1);
                    v2 = FBN_V(x2, h2, l2); v3 = FBN_V(x3, h3, l3);
                    FBN_ACC();
                }
            }
            if (q < FBN_BLOCK && i < len) {
                FBN_FN(btail)(g0, x0, y0, i, len, h0, l0, &a0, &v0);
                FBN_FN(btail)(g1, x1, y1, i, len, h1, l1, &a1, &v1);
                FBN_FN(btail)(g2, x2, y2, i, len, h2, l2, &a2, &v2);
                FBN_FN(btail)(g3, x3, y3, i, len, h3, l3, &a3, &v3);
                FBN_ACC();
                i = len;
            }
#undef FBN_G
#undef FBN_V
#undef FBN_ACC
            if (one_block)
                break; /* i == len */
            FBN_FN(fold4)(p0, p1, p2, p3, &ra, &rb);
            d1a = FBN_FN(dadd)(d1a, ra);
            d1b = FBN_FN(dadd)(d1b, rb);
            FBN_FN(fold4)(q0, q1, q2, q3, &ra, &rb);
            d2a = FBN_FN(dadd)(d2a, ra);
            d2b = FBN_FN(dadd)(d2b, rb);
        }
        if (one_block) {
            FBN_FN(fold8t)(p0, p1, p2, p3, q0, q1, q2, q3, t1, t2);
        } else {
            FBN_FN(fin)(d1a, t1 + 0, t1 + 1);
            FBN_FN(fin)(d1b, t1 + 2, t1 + 3);
            FBN_FN(fin)(d2a, t2 + 0, t2 + 1);
            FBN_FN(fin)(d2b, t2 + 2, t2 + 3);
        }
        FBN_FN(store4)(s1, s2, by_channel ? cg : NULL, s, ng, t1, t2);
        c = cg[ng - 1] + 1 == C ? 0 : cg[ng - 1] + 1;
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
 * IN dy, x (NULL: no x term), y (or NULL), mhi/a/k/c[C]; OUT dx (may alias dy) */
static void FBN_FN(bwd_dx)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                           T *dx, ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,
                           const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                           const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)
{
    ptrdiff_t ch = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const T *gs = dy + s * len, *xs = x ? x + s * len : NULL;
        T *ds = dx + s * len;
        const T h = mhi[ch], m = a[ch], q = k[ch], o = c[ch];
        if (!xs) {
            /* x NULL: no x term (inference, dx = a*g): nothing multiplies 0 by a NaN of x, or
             * of dy where the ReLU masks it. */
            if (y) {
                const T *ys = y + s * len;
                FBN_SIMD
                for (ptrdiff_t i = 0; i < len; i++) {
                    T d = gs[i], g = ys[i] > 0 ? d : (T)0;
                    ds[i] = m * g + o;
                }
            } else {
                FBN_SIMD
                for (ptrdiff_t i = 0; i < len; i++)
                    ds[i] = m * gs[i] + o;
            }
        } else if (y) {
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
 * IN dy, x (NULL: no x term), y (or NULL), mhi/a/k/c[width]; OUT dx (may alias dy) */
static void FBN_FN(bwd_dx_rows)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                                T *dx, ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t width,
                                const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                                const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *dyr = dy + r * stride, *xr = x ? x + r * stride : NULL;
        T *dxr = dx + r * stride;
        if (!xr && y) { /* x NULL: no x term, as in fbn_bwd_dx */
            const T *yr = y + r * stride;
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++) {
                T d = dyr[j], g = yr[j] > 0 ? d : (T)0;
                dxr[j] = a[j] * g + c[j];
            }
        } else if (!xr) {
            FBN_SIMD
            for (ptrdiff_t j = 0; j < width; j++)
                dxr[j] = a[j] * dyr[j] + c[j];
        } else if (y) {
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

/* ---------------------------------------------------------------- masked statistics (issue 18)
 * Keras's/Flax's mask=: a byte per position (nonzero = counts), shared by every channel. The
 * statistics sum x - k over the masked-in values only; y and dx are formed everywhere. The loops
 * below are separate functions (the plain ones are untouched): a masked-out lane is zeroed by a
 * select after the subtraction, so a NaN or inf there (padding) never reaches a sum. */

/* The loops read the mask widened to T's lane width (0 or -1 per value, widen_mask), one and
 * per register (vkeepl). The segments of one outer index share their mask row, so a row of up
 * to FBN_MEXP values is widened once for all of them (7x7 maps: 512 channels share a row of 49
 * bytes); a longer segment is taken FBN_MEXP values at a time, each chunk's mask widened as it
 * comes (8 or 16 KB on the stack). Widening the bytes inside the loops instead cost an extra
 * compare and sign-extension per register at x86-64-v3/v4, and at baseline (SSE2: no pmovsx)
 * 13x the plain statistics' time on 3136-value segments; GCC 12 had scalarised a
 * convert-then-compare of the bytes at every level. */
#if FBN_TF
typedef int32_t FBN_FN(mi);
#else
typedef int64_t FBN_FN(mi);
#endif
#define FBN_MEXP 4096
static inline vt FBN_FN(vkeepl)(vt v, const FBN_FN(mi) *FBN_RESTRICT l)
{
#if FBN_VECTOR_EXT
    __typeof__(v > v) k;
    memcpy(&k, l, sizeof(k));
    return (vt)((__typeof__(v > v))v & k);
#else
    for (int j = 0; j < FBN_N; j++)
        if (!l[j])
            v.v[j] = 0;
    return v;
#endif
}
#if FBN_VECTOR_EXT && FBN_VB >= 32
/* v with the lanes whose mask byte (m[0..N)) is 0 zeroed, widening as it goes: the bytes
 * compared with 0, then sign-extended (vpcmpeqb + vpmovsx + vpand), for segments too long to
 * widen once per row, at the levels that have vpmovsx (SSE2 widens chunk by chunk instead:
 * shuffles per register cost it 13x the plain time; comparing after converting the bytes was
 * scalarised by GCC 12 at every level). */
#define FBN_BYTE_KEEP 1
static inline vt FBN_FN(vkeep)(vt v, const unsigned char *FBN_RESTRICT m)
{
    typedef unsigned char vbu __attribute__((vector_size(FBN_N), aligned(1)));
    typedef __typeof__(v > v) vi;
    vi k = __builtin_convertvector(*(const vbu *)m != 0, vi);
    return (vt)((vi)v & k);
}
#else
#define FBN_BYTE_KEEP 0
#endif
/* Whether segments of len values read a row widened once (else bytes, or chunks): at the
 * levels with FBN_BYTE_KEEP only rows that stay in L1 beside the data (8 KB: a 3136-value
 * float64 row of 25 KB was 1.5x slower than the bytes). */
#if FBN_BYTE_KEEP
#define FBN_WIDE_ROWS(len) ((len) * (ptrdiff_t)sizeof(T) <= 8192)
#else
#define FBN_WIDE_ROWS(len) ((len) <= FBN_MEXP)
#endif
/* the widened row: l[i] = -1 where m[i] != 0, else 0 */
static inline void FBN_FN(widen_mask)(const unsigned char *FBN_RESTRICT m, ptrdiff_t len,
                                      FBN_FN(mi) *FBN_RESTRICT l)
{
    FBN_SIMD
    for (ptrdiff_t i = 0; i < len; i++)
        l[i] = -(FBN_FN(mi))(m[i] != 0);
}

/* One segment's masked sums: t1 = sum(m ? x - kc : 0), t2 = sum(m ? (x - kc)^2 : 0), two
 * independent register pairs per block of at most FBN_BLOCK registers summed in T, widened into
 * double lanes per block (as fbn_sums1); the last len % N values as one overlapping register
 * (a scalar tail with a branch per mask byte had cost 1.5x on 7x7 maps), and a segment shorter
 * than a register in double.
 * IN xs[len], ml[len] (the widened mask) or ms[len] (bytes); OUT *t1, *t2 */
static inline void FBN_FN(msums1)(const T *FBN_RESTRICT xs, const unsigned char *FBN_RESTRICT ms,
                                  const FBN_FN(mi) *FBN_RESTRICT ml, ptrdiff_t len, T kc,
                                  double *t1, double *t2)
{
    /* the mask: ml (widened) when given, else the bytes ms (only where FBN_BYTE_KEEP) */
#if FBN_BYTE_KEEP
#define FBN_KEEP(v, off) (ml ? FBN_FN(vkeepl)((v), ml + (off)) : FBN_FN(vkeep)((v), ms + (off)))
#else
#define FBN_KEEP(v, off) FBN_FN(vkeepl)((v), ml + (off))
    (void)ms;
#endif
    const ptrdiff_t N = FBN_N;
    vd a1 = FBN_FN(dzero)(), a2 = FBN_FN(dzero)();
    ptrdiff_t i = 0;
    while (i < len && len >= N) {
        vt p1 = FBN_FN(vzero)(), p2 = p1, q1 = p1, q2 = p1, v, w;
        int q = 0;
        if (i + FBN_BLOCK * N <= len) { /* a whole block, unrolled (as fbn_sums1): the same sums */
            FBN_PRAGMA(GCC unroll 8)
            for (int u = 0; u < FBN_BLOCK; u += 2) {
                v = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + i + u * N), kc), i + u * N);
                w = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + i + (u + 1) * N), kc),
                             i + (u + 1) * N);
                p1 = FBN_FN(vadd)(p1, v);
                p2 = FBN_FN(vmadd)(p2, v, v);
                q1 = FBN_FN(vadd)(q1, w);
                q2 = FBN_FN(vmadd)(q2, w, w);
            }
            a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(FBN_FN(vadd)(p1, q1)));
            a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(FBN_FN(vadd)(p2, q2)));
            i += FBN_BLOCK * N;
            continue;
        }
        for (; q + 2 <= FBN_BLOCK && i + 2 * N <= len; q += 2, i += 2 * N) {
            v = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + i), kc), i);
            w = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + i + N), kc), i + N);
            p1 = FBN_FN(vadd)(p1, v);
            p2 = FBN_FN(vmadd)(p2, v, v);
            q1 = FBN_FN(vadd)(q1, w);
            q2 = FBN_FN(vmadd)(q2, w, w);
        }
        if (q < FBN_BLOCK && i + N <= len) {
            v = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + i), kc), i);
            p1 = FBN_FN(vadd)(p1, v);
            p2 = FBN_FN(vmadd)(p2, v, v);
            q++;
            i += N;
        }
        if (q < FBN_BLOCK && i < len && len >= N) {
            /* the last len - i values: the segment's last register, its first lanes (already
             * summed) dropped, as fbn_vtail */
            w = FBN_KEEP(FBN_FN(vsubs)(FBN_FN(vload)(xs + len - N), kc), len - N);
            w = FBN_FN(vdrop)(w, (int)(N - (len - i)));
            q1 = FBN_FN(vadd)(q1, w);
            q2 = FBN_FN(vmadd)(q2, w, w);
            i = len;
        }
        a1 = FBN_FN(dadd)(a1, FBN_FN(widen)(FBN_FN(vadd)(p1, q1)));
        a2 = FBN_FN(dadd)(a2, FBN_FN(widen)(FBN_FN(vadd)(p2, q2)));
    }
    double r1 = FBN_FN(sumd)(a1), r2 = FBN_FN(sumd)(a2);
    for (; i < len; i++) { /* a segment shorter than a register: branch-free selects */
        double d = (ml ? ml[i] : ms[i]) ? (double)xs[i] - (double)kc : 0.0;
        r1 += d;
        r2 += d * d;
    }
#undef FBN_KEEP
    *t1 = r1;
    *t2 = r2;
}

/* Four consecutive segments of N <= len <= FBN_BLOCK * N values (one block) sharing the
 * widened mask row ml, summed side by side (four independent chains per sum) and folded
 * together by fold8t, as fbn_sums does for short segments: a fold per segment (widen + sumd)
 * had been half the instructions of a 7x7 map. IN xs (4 * len values), ml[len], k[4];
 * OUT t1[4], t2[4] */
static inline void FBN_FN(msums4)(const T *FBN_RESTRICT xs, const FBN_FN(mi) *FBN_RESTRICT ml,
                                  ptrdiff_t len, const T *FBN_RESTRICT k, double *t1,
                                  double *t2)
{
    const ptrdiff_t N = FBN_N;
    const T *x0 = xs, *x1 = xs + len, *x2 = xs + 2 * len, *x3 = xs + 3 * len;
    const T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3];
    vt p0 = FBN_FN(vzero)(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
    vt v0, v1, v2, v3;
#define FBN_MSTEP(off, drop)                                                                     \
    do {                                                                                         \
        v0 = FBN_FN(vkeepl)(FBN_FN(vsubs)(FBN_FN(vload)(x0 + (off)), k0), ml + (off));           \
        v1 = FBN_FN(vkeepl)(FBN_FN(vsubs)(FBN_FN(vload)(x1 + (off)), k1), ml + (off));           \
        v2 = FBN_FN(vkeepl)(FBN_FN(vsubs)(FBN_FN(vload)(x2 + (off)), k2), ml + (off));           \
        v3 = FBN_FN(vkeepl)(FBN_FN(vsubs)(FBN_FN(vload)(x3 + (off)), k3), ml + (off));           \
        if (drop) {                                                                              \
            v0 = FBN_FN(vdrop)(v0, (drop)); v1 = FBN_FN(vdrop)(v1, (drop));                      \
            v2 = FBN_FN(vdrop)(v2, (drop)); v3 = FBN_FN(vdrop)(v3, (drop));                      \
        }                                                                                        \
        p0 = FBN_FN(vadd)(p0, v0); q0 = FBN_FN(vmadd)(q0, v0, v0);                               \
        p1 = FBN_FN(vadd)(p1, v1); q1 = FBN_FN(vmadd)(q1, v1, v1);                               \
        p2 = FBN_FN(vadd)(p2, v2); q2 = FBN_FN(vmadd)(q2, v2, v2);                               \
        p3 = FBN_FN(vadd)(p3, v3); q3 = FBN_FN(vmadd)(q3, v3, v3);                               \
    } while (0)
    ptrdiff_t i = 0;
    for (; i + N <= len; i += N)
        FBN_MSTEP(i, 0);
    if (i < len) /* the last len - i values: the segments' last registers, lanes dropped */
        FBN_MSTEP(len - N, (int)(N - (len - i)));
#undef FBN_MSTEP
    FBN_FN(fold8t)(p0, p1, p2, p3, q0, q1, q2, q3, t1, t2);
}

/* fbn_sums over the masked-in values: nseg segments of len values in memory order, segment s of
 * channel c = (c0 + s) % C (slot c when by_channel, else s); the segments of one outer index
 * share one mask row, and the next row (mstride bytes on) starts where c wraps to 0. Rows of
 * up to FBN_MEXP values are widened once (widen_mask) and one-block segments go four at a time
 * (msums4) where four remain in the row; longer segments are read with their mask bytes
 * (x86-64-v3/v4), or summed FBN_MEXP values at a time and the chunks' sums added in double
 * (baseline). The grouping and chunks depend only on the run's place
 * in the shape, never on the thread count.
 * IN x, mk (the first segment's mask), k[C]; INOUT s1, s2 */
static void FBN_FN(msums)(const T *FBN_RESTRICT x, const unsigned char *FBN_RESTRICT mk,
                          ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C,
                          ptrdiff_t mstride, const T *FBN_RESTRICT k, int by_channel,
                          double *FBN_RESTRICT s1, double *FBN_RESTRICT s2)
{
    FBN_FN(mi) lm[FBN_MEXP];
    ptrdiff_t c = c0;
    if (FBN_WIDE_ROWS(len)) {
        const int grouped = len >= FBN_N && len <= FBN_BLOCK * FBN_N;
        int fresh = 1;
        ptrdiff_t s = 0;
        while (s < nseg) {
            double t1[4], t2[4];
            if (fresh)
                FBN_FN(widen_mask)(mk, len, lm);
            if (grouped && s + 4 <= nseg && c + 4 <= C) {
                /* four one-block segments of one mask row side by side, folded together */
                FBN_FN(msums4)(x + s * len, lm, len, k + c, t1, t2);
                if (by_channel) {
                    ptrdiff_t cg[4] = {c, c + 1, c + 2, c + 3};
                    FBN_FN(store4)(s1, s2, cg, s, 4, t1, t2);
                } else {
                    FBN_FN(store4)(s1, s2, NULL, s, 4, t1, t2);
                }
                s += 4;
                c += 4;
            } else {
                FBN_FN(msums1)(x + s * len, NULL, lm, len, k[c], t1, t2);
                s1[by_channel ? c : s] += t1[0];
                s2[by_channel ? c : s] += t2[0];
                s++;
                c++;
            }
            fresh = c == C;
            if (fresh) {
                c = 0;
                mk += mstride;
            }
        }
        return;
    }
    for (ptrdiff_t s = 0; s < nseg; s++) { /* long segments, FBN_MEXP values at a time */
        double u1 = 0, u2 = 0, t1, t2;
#if FBN_BYTE_KEEP /* or straight on the bytes */
        FBN_FN(msums1)(x + s * len, mk, NULL, len, k[c], &t1, &t2);
        u1 = t1;
        u2 = t2;
#else
        for (ptrdiff_t off = 0; off < len; off += FBN_MEXP) {
            const ptrdiff_t cl = len - off < FBN_MEXP ? len - off : FBN_MEXP;
            FBN_FN(widen_mask)(mk + off, cl, lm);
            FBN_FN(msums1)(x + s * len + off, NULL, lm, cl, k[c], &t1, &t2);
            u1 += t1;
            u2 += t2;
        }
#endif
        s1[by_channel ? c : s] += u1;
        s2[by_channel ? c : s] += u2;
        if (++c == C) {
            c = 0;
            mk += mstride;
        }
    }
}

/* Masked rows of a channels-last block: a1[j] += x[r, j] - k[j], a2[j] += (x[r, j] - k[j])^2
 * for the rows r with mk[r] != 0 (a byte per row), FBN_ROWS consecutive rows per pass summed
 * in T as in fbn_sums_rows, each row's values selected by its mask byte (a broadcast compare
 * and a blend, or a zeroing mask at x86-64-v4). Every row is read, in memory order: reading
 * only the masked-in rows (gathered by pointer) was 2x slower from DRAM on (100352, 64), the
 * gaps breaking the prefetchers' streams; gathering rows until FBN_ROWS were found had also
 * mispredicted once per pass. The last nrows % FBN_ROWS rows one at a time in double.
 * IN x (nrows rows of `width` values, `stride` apart), mk[nrows], k[width];
 * INOUT a1[width], a2[width] */
static void FBN_FN(msums_rows)(const T *FBN_RESTRICT x, const unsigned char *FBN_RESTRICT mk,
                               ptrdiff_t nrows, ptrdiff_t stride, ptrdiff_t width,
                               const T *FBN_RESTRICT k, double *FBN_RESTRICT a1,
                               double *FBN_RESTRICT a2)
{
    ptrdiff_t r = 0;
    for (; r + FBN_ROWS <= nrows; r += FBN_ROWS) {
        const T *xr = x + r * stride;
        const unsigned char *m = mk + r;
        if (!(m[0] | m[1] | m[2] | m[3] | m[4] | m[5] | m[6] | m[7]))
            continue;
        const int m0 = m[0] != 0, m1 = m[1] != 0, m2 = m[2] != 0, m3 = m[3] != 0;
        const int m4 = m[4] != 0, m5 = m[5] != 0, m6 = m[6] != 0, m7 = m[7] != 0;
        FBN_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            T kj = k[j], d, s1, s2;
#define FBN_MROW(q, mq)                                                                          \
    d = xr[(q) * stride + j] - kj;                                                               \
    d = mq ? d : (T)0;
            FBN_MROW(0, m0) s1 = d; s2 = d * d;
            FBN_MROW(1, m1) s1 += d; s2 += d * d;
            FBN_MROW(2, m2) s1 += d; s2 += d * d;
            FBN_MROW(3, m3) s1 += d; s2 += d * d;
            FBN_MROW(4, m4) s1 += d; s2 += d * d;
            FBN_MROW(5, m5) s1 += d; s2 += d * d;
            FBN_MROW(6, m6) s1 += d; s2 += d * d;
            FBN_MROW(7, m7) s1 += d; s2 += d * d;
#undef FBN_MROW
            a1[j] += s1;
            a2[j] += s2;
        }
    }
    for (; r < nrows; r++) {
        if (!mk[r])
            continue;
        const T *xr = x + r * stride;
        FBN_SIMD
        for (ptrdiff_t j = 0; j < width; j++) {
            double d = (double)xr[j] - (double)k[j];
            a1[j] += d;
            a2[j] += d * d;
        }
    }
}
#if FBN_ROWS != 8
#error "fbn_msums_rows unrolls FBN_ROWS = 8 rows"
#endif

/* Masked dx: dx = a*g - k*(x - mhi) + c where the position's mask byte is nonzero, a*g where it
 * is 0 (the mean and variance do not depend on a masked-out x; y there still depends on them,
 * which is what sum_dy and sum_dy_xmu, taken over every position, carry). g as in fbn_bwd_dx.
 * Segments, mask rows and chunks as in fbn_msums (a select on the widened mask is one compare;
 * on the bytes it also widened them in every segment: 2.3x the plain loop's time on 7x7 maps).
 * IN dy, x, y (or NULL), mk, mhi/a/k/c[C]; OUT dx (may alias dy) */
static inline void FBN_FN(mdx1)(const T *gs, const T *FBN_RESTRICT xs, const T *FBN_RESTRICT ys,
                                const unsigned char *FBN_RESTRICT ms,
                                const FBN_FN(mi) *FBN_RESTRICT ml, T *ds, ptrdiff_t len, T h,
                                T m, T q, T o)
{
    /* the mask: ml (widened) when given, else the bytes ms (FBN_BYTE_KEEP levels only) */
    if (ml && ys) {
        FBN_SIMD
        for (ptrdiff_t i = 0; i < len; i++) {
            T d = gs[i], g = ys[i] > 0 ? d : (T)0;
            T full = m * g - q * (xs[i] - h) + o;
            ds[i] = ml[i] ? full : m * g;
        }
    } else if (ml) {
        FBN_SIMD
        for (ptrdiff_t i = 0; i < len; i++) {
            T g = gs[i];
            T full = m * g - q * (xs[i] - h) + o;
            ds[i] = ml[i] ? full : m * g;
        }
    } else if (ys) {
        FBN_SIMD
        for (ptrdiff_t i = 0; i < len; i++) {
            T d = gs[i], g = ys[i] > 0 ? d : (T)0;
            T full = m * g - q * (xs[i] - h) + o;
            ds[i] = ms[i] ? full : m * g;
        }
    } else {
        FBN_SIMD
        for (ptrdiff_t i = 0; i < len; i++) {
            T g = gs[i];
            T full = m * g - q * (xs[i] - h) + o;
            ds[i] = ms[i] ? full : m * g;
        }
    }
}

static void FBN_FN(mbwd_dx)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                            const unsigned char *FBN_RESTRICT mk, T *dx, ptrdiff_t nseg,
                            ptrdiff_t len, ptrdiff_t c0, ptrdiff_t C, ptrdiff_t mstride,
                            const T *FBN_RESTRICT mhi, const T *FBN_RESTRICT a,
                            const T *FBN_RESTRICT k, const T *FBN_RESTRICT c)
{
    FBN_FN(mi) lm[FBN_MEXP];
    int fresh = 1;
    ptrdiff_t ch = c0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const ptrdiff_t o = s * len;
        if (FBN_WIDE_ROWS(len)) {
            if (fresh)
                FBN_FN(widen_mask)(mk, len, lm);
            FBN_FN(mdx1)(dy + o, x + o, y ? y + o : NULL, NULL, lm, dx + o, len, mhi[ch], a[ch],
                         k[ch], c[ch]);
        } else if (FBN_BYTE_KEEP) {
            FBN_FN(mdx1)(dy + o, x + o, y ? y + o : NULL, mk, NULL, dx + o, len, mhi[ch], a[ch],
                         k[ch], c[ch]);
        } else {
            for (ptrdiff_t off = 0; off < len; off += FBN_MEXP) {
                const ptrdiff_t cl = len - off < FBN_MEXP ? len - off : FBN_MEXP;
                FBN_FN(widen_mask)(mk + off, cl, lm);
                FBN_FN(mdx1)(dy + o + off, x + o + off, y ? y + o + off : NULL, NULL, lm,
                             dx + o + off, cl, mhi[ch], a[ch], k[ch], c[ch]);
            }
        }
        fresh = ++ch == C;
        if (fresh) {
            ch = 0;
            mk += mstride;
        }
    }
}

/* Masked dx on rows of a channels-last block, a mask byte per row (see fbn_mbwd_dx).
 * IN dy, x, y (or NULL), mk[nrows], mhi/a/k/c[width]; OUT dx (may alias dy) */
static void FBN_FN(mbwd_dx_rows)(const T *dy, const T *FBN_RESTRICT x, const T *FBN_RESTRICT y,
                                 const unsigned char *FBN_RESTRICT mk, T *dx, ptrdiff_t nrows,
                                 ptrdiff_t stride, ptrdiff_t width, const T *FBN_RESTRICT mhi,
                                 const T *FBN_RESTRICT a, const T *FBN_RESTRICT k,
                                 const T *FBN_RESTRICT c)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *dyr = dy + r * stride, *xr = x + r * stride, *yr = y ? y + r * stride : NULL;
        T *dxr = dx + r * stride;
        if (!mk[r]) {
            if (yr) {
                FBN_SIMD
                for (ptrdiff_t j = 0; j < width; j++) {
                    T d = dyr[j], g = yr[j] > 0 ? d : (T)0;
                    dxr[j] = a[j] * g;
                }
            } else {
                FBN_SIMD
                for (ptrdiff_t j = 0; j < width; j++)
                    dxr[j] = a[j] * dyr[j];
            }
        } else if (yr) {
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

#undef FBN_BYTE_KEEP
#undef FBN_WIDE_ROWS
#undef FBN_MEXP
#undef vt
#undef vd
#undef FBN_FN
#undef FBN_CAT
#undef FBN_CAT_
#undef FBN_N
#undef FBN_ND
#undef T
