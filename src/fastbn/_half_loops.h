/*
 * Conversions between the 2-byte floats (IEEE float16, bfloat16) and float32, compiled once per
 * ISA level: _simd.h includes this file inside each level's target region with
 *   FBN_LEVEL  the suffix of the names (base, v3, v4),
 *   FBN_F16C   1 where the level has F16C (x86-64-v3 and up): the float16 loops use
 *              vcvtph2ps / vcvtps2ph, 8 values per instruction;
 *   FBN_HAVX2, FBN_HSSE2  1 where the level has AVX2 / SSE2 (every x86-64): the other loops
 *              are written with their intrinsics, in int32 lanes.
 * Halves are read and written as their 16-bit patterns (uint16_t).
 *
 * The results are those of NumPy's astype (float16) and ml_dtypes' astype (bfloat16), bit for
 * bit, for every input, at every level (tests/test_half_convert.py checks all 65536 halves and
 * a dense set of float32 values):
 *   float16 -> float32  exact (subnormals, +-0, inf); a NaN keeps its sign and its payload
 *                       shifted up 13 bits, a signalling NaN stays signalling (NumPy's
 *                       software conversion; vcvtph2ps would quiet it, so NaN lanes are redone);
 *   float32 -> float16  round to nearest even, overflow to inf, float32 subnormals to +-0; a
 *                       NaN keeps its sign and the top 10 bits of its payload, made nonzero
 *                       (0x7c01) when they are all zero (NumPy's rule; vcvtps2ph sets the quiet
 *                       bit instead, so NaN lanes are redone);
 *   bfloat16 -> float32 the 16 bits shifted up (exact, NaN payloads kept);
 *   float32 -> bfloat16 round to nearest even, overflow to inf; every NaN becomes 0x7fc0 or
 *                       0xffc0 by its sign (ml_dtypes/Eigen's rule). Not AVX512_BF16's
 *                       vcvtneps2bf16, which flushes subnormals to zero.
 * The scalar forms (h2f, f2h, f2bf) are the baseline loops' bodies; `omp simd` vectorises them
 * at every level (branch-free selects; the subnormal cases use one exact float add).
 * Level-independent results: the F16C loops' tails and NaN lanes use the same scalar forms.
 */

#define FBN_HCAT_(a, b) a##_##b
#define FBN_HCAT(a, b) FBN_HCAT_(a, b)
#define FBN_HFN(name) FBN_HCAT(fbn_##name, FBN_LEVEL)

static inline float FBN_HFN(u2f)(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t FBN_HFN(f2u)(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* The scalar forms work in int32 lanes: every value compared is non-negative, so signed
 * compares (which SSE2 and AVX2 have; unsigned ones they emulate) give the same answers. */

/* float16 bits -> float32 bits. Normal: exponent rebiased (+112 << 23); inf/NaN: exponent to
 * 255 (+224 << 23), payload kept; zero/subnormal: the 10 fraction bits as a float32 of exponent
 * 2^-14 minus 2^-14 (exact, and no float32 subnormal operand, which some CPUs handle slowly). */
static inline uint32_t FBN_HFN(h2f)(uint16_t h)
{
    int32_t o = (int32_t)(h & 0x7fffu) << 13;
    int32_t e = o & 0x0f800000;
    int32_t r = o + (112 << 23) + (e == 0x0f800000 ? (112 << 23) : 0);
    int32_t sub = (int32_t)FBN_HFN(f2u)(FBN_HFN(u2f)((uint32_t)(o + (113 << 23))) -
                                        FBN_HFN(u2f)(113u << 23));
    r = e == 0 ? sub : r;
    return (uint32_t)r | ((uint32_t)(h & 0x8000u) << 16);
}

/* float32 bits -> float16 bits, NumPy's npy_floatbits_to_halfbits. |f| >= 2^16: inf, or NaN
 * with the top 10 payload bits (0x7c01 when those are 0); below 2^-14: one float add of 0.5
 * rounds the value to a multiple of 2^-24 (round to nearest even in the FPU), whose low bits
 * are the half; otherwise the exponent is rebiased and the 13 dropped bits rounded to nearest
 * even by an integer add (a carry into the exponent gives the next binade, or inf at 65520). */
static inline uint16_t FBN_HFN(f2h)(uint32_t f)
{
    int32_t a = (int32_t)(f & 0x7fffffffu);
    int32_t sig = (a & 0x7fffff) >> 13;
    int32_t nan = (sig + (sig == 0)) | 0x7c00;
    int32_t big = a > 0x7f800000 ? nan : 0x7c00;
    int32_t sub = (int32_t)FBN_HFN(f2u)(FBN_HFN(u2f)((uint32_t)a) + 0.5f) - 0x3f000000;
    int32_t nrm = (a - 0x37fff001 + ((a >> 13) & 1)) >> 13; /* (a - (112 << 23) + 0xfff + odd) */
    int32_t r = a >= 0x47800000 ? big : (a < 0x38800000 ? sub : nrm);
    return (uint16_t)((uint32_t)r | ((f >> 16) & 0x8000u));
}

/* float32 bits -> bfloat16 bits: round to nearest even on the low 16 bits; NaN -> quiet NaN
 * of the same sign without payload (ml_dtypes). Inf + 0x7fff stays below the next pattern. */
static inline uint16_t FBN_HFN(f2bf)(uint32_t f)
{
    uint32_t r = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
    uint32_t nan = ((f >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)((int32_t)(f & 0x7fffffffu) > 0x7f800000 ? nan : r);
}

#if FBN_HSSE2
/* SSE2 forms of h2f / f2h / f2bf on four int32 lanes (the same operations as the scalar forms:
 * GCC's own vectorisation of those, with selects of selects, took 2-3x the instructions). */
static inline __m128i FBN_HFN(sel)(__m128i m, __m128i a, __m128i b)
{
    return _mm_or_si128(_mm_and_si128(m, a), _mm_andnot_si128(m, b));
}

static inline __m128i FBN_HFN(h2f4)(__m128i h) /* h: four halves zero-extended to int32 */
{
    __m128i o = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x7fff)), 13);
    __m128i e = _mm_and_si128(o, _mm_set1_epi32(0x0f800000));
    __m128i inf = _mm_cmpeq_epi32(e, _mm_set1_epi32(0x0f800000));
    __m128i r = _mm_add_epi32(_mm_add_epi32(o, _mm_set1_epi32(112 << 23)),
                              _mm_and_si128(inf, _mm_set1_epi32(112 << 23)));
    __m128 sub = _mm_sub_ps(_mm_castsi128_ps(_mm_add_epi32(o, _mm_set1_epi32(113 << 23))),
                            _mm_castsi128_ps(_mm_set1_epi32(113 << 23)));
    r = FBN_HFN(sel)(_mm_cmpeq_epi32(e, _mm_setzero_si128()), _mm_castps_si128(sub), r);
    return _mm_or_si128(r, _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16));
}

/* four float32 -> four halves, sign-extended in int32 lanes (for _mm_packs_epi32) */
static inline __m128i FBN_HFN(f2h4)(__m128i f)
{
    __m128i a = _mm_and_si128(f, _mm_set1_epi32(0x7fffffff));
    __m128i sig = _mm_srli_epi32(_mm_and_si128(a, _mm_set1_epi32(0x7fffff)), 13);
    __m128i nan = _mm_or_si128(_mm_sub_epi32(sig, _mm_cmpeq_epi32(sig, _mm_setzero_si128())),
                               _mm_set1_epi32(0x7c00));
    __m128i big = FBN_HFN(sel)(_mm_cmpgt_epi32(a, _mm_set1_epi32(0x7f800000)), nan,
                               _mm_set1_epi32(0x7c00));
    __m128i sub = _mm_sub_epi32(
        _mm_castps_si128(_mm_add_ps(_mm_castsi128_ps(a), _mm_set1_ps(0.5f))),
        _mm_set1_epi32(0x3f000000));
    __m128i odd = _mm_and_si128(_mm_srli_epi32(a, 13), _mm_set1_epi32(1));
    __m128i nrm = _mm_srli_epi32(
        _mm_add_epi32(_mm_add_epi32(a, _mm_set1_epi32((int)0xc8000fffu)), odd), 13);
    __m128i r = FBN_HFN(sel)(_mm_cmpgt_epi32(a, _mm_set1_epi32(0x477fffff)), big,
                             FBN_HFN(sel)(_mm_cmpgt_epi32(_mm_set1_epi32(0x38800000), a), sub,
                                          nrm));
    r = _mm_or_si128(r, _mm_and_si128(_mm_srli_epi32(f, 16), _mm_set1_epi32(0x8000)));
    return _mm_srai_epi32(_mm_slli_epi32(r, 16), 16);
}
#endif

#if FBN_HAVX2
/* eight float32 -> eight bfloat16, sign-extended in int32 lanes: the rounded top 16 bits by an
 * arithmetic shift (no NaN reaches the add's overflow: NaN lanes are replaced) */
static inline __m256i FBN_HFN(f2bf8)(__m256i f)
{
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(f, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srai_epi32(
        _mm256_add_epi32(_mm256_add_epi32(f, _mm256_set1_epi32(0x7fff)), odd), 16);
    __m256i nan = _mm256_or_si256(_mm256_and_si256(_mm256_srai_epi32(f, 16),
                                                   _mm256_set1_epi32((int)0xffff8000u)),
                                  _mm256_set1_epi32(0x7fc0));
    __m256i m = _mm256_cmpgt_epi32(_mm256_and_si256(f, _mm256_set1_epi32(0x7fffffff)),
                                   _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, nan, m);
}
#elif FBN_HSSE2
static inline __m128i FBN_HFN(f2bf4)(__m128i f)
{
    __m128i odd = _mm_and_si128(_mm_srli_epi32(f, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srai_epi32(_mm_add_epi32(_mm_add_epi32(f, _mm_set1_epi32(0x7fff)), odd), 16);
    __m128i nan = _mm_or_si128(_mm_and_si128(_mm_srai_epi32(f, 16),
                                             _mm_set1_epi32((int)0xffff8000u)),
                               _mm_set1_epi32(0x7fc0));
    __m128i m = _mm_cmpgt_epi32(_mm_and_si128(f, _mm_set1_epi32(0x7fffffff)),
                                _mm_set1_epi32(0x7f800000));
    return FBN_HFN(sel)(m, nan, r);
}
#endif

static void FBN_HFN(f16_to_f32)(const uint16_t *FBN_RESTRICT src, float *FBN_RESTRICT dst,
                                ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if FBN_F16C
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
        /* NaN lanes: |h| > 0x7c00 (signed 16-bit compare: |h| <= 0x7fff) */
        __m128i a = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
        if (_mm_movemask_epi8(_mm_cmpgt_epi16(a, _mm_set1_epi16(0x7c00)))) {
            for (int j = 0; j < 8; j++) {
                uint32_t u = FBN_HFN(h2f)(src[i + j]);
                memcpy(dst + i + j, &u, 4);
            }
        }
    }
#elif FBN_HSSE2
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm_storeu_si128((__m128i *)(dst + i),
                         FBN_HFN(h2f4)(_mm_unpacklo_epi16(h, _mm_setzero_si128())));
        _mm_storeu_si128((__m128i *)(dst + i + 4),
                         FBN_HFN(h2f4)(_mm_unpackhi_epi16(h, _mm_setzero_si128())));
    }
#endif
    FBN_SIMD
    for (ptrdiff_t k = i; k < n; k++) {
        uint32_t u = FBN_HFN(h2f)(src[k]);
        memcpy(dst + k, &u, 4);
    }
}

static void FBN_HFN(f32_to_f16)(const float *FBN_RESTRICT src, uint16_t *FBN_RESTRICT dst,
                                ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if FBN_F16C
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
            for (int j = 0; j < 8; j++)
                dst[i + j] = FBN_HFN(f2h)(FBN_HFN(f2u)(src[i + j]));
        }
    }
#elif FBN_HSSE2
    for (; i + 8 <= n; i += 8) {
        __m128i lo = FBN_HFN(f2h4)(_mm_loadu_si128((const __m128i *)(src + i)));
        __m128i hi = FBN_HFN(f2h4)(_mm_loadu_si128((const __m128i *)(src + i + 4)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_packs_epi32(lo, hi));
    }
#endif
    FBN_SIMD
    for (ptrdiff_t k = i; k < n; k++)
        dst[k] = FBN_HFN(f2h)(FBN_HFN(f2u)(src[k]));
}

static void FBN_HFN(bf16_to_f32)(const uint16_t *FBN_RESTRICT src, float *FBN_RESTRICT dst,
                                 ptrdiff_t n)
{
    FBN_SIMD
    for (ptrdiff_t k = 0; k < n; k++) {
        uint32_t u = (uint32_t)src[k] << 16;
        memcpy(dst + k, &u, 4);
    }
}

static void FBN_HFN(f32_to_bf16)(const float *FBN_RESTRICT src, uint16_t *FBN_RESTRICT dst,
                                 ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if FBN_HAVX2
    for (; i + 16 <= n; i += 16) {
        __m256i lo = FBN_HFN(f2bf8)(_mm256_loadu_si256((const __m256i *)(src + i)));
        __m256i hi = FBN_HFN(f2bf8)(_mm256_loadu_si256((const __m256i *)(src + i + 8)));
        /* packs works per 128-bit lane: [lo0 hi0 lo1 hi1] -> [lo0 lo1 hi0 hi1] */
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8));
    }
#elif FBN_HSSE2
    for (; i + 8 <= n; i += 8) {
        __m128i lo = FBN_HFN(f2bf4)(_mm_loadu_si128((const __m128i *)(src + i)));
        __m128i hi = FBN_HFN(f2bf4)(_mm_loadu_si128((const __m128i *)(src + i + 4)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_packs_epi32(lo, hi));
    }
#endif
    FBN_SIMD
    for (ptrdiff_t k = i; k < n; k++)
        dst[k] = FBN_HFN(f2bf)(FBN_HFN(f2u)(src[k]));
}

#undef FBN_HFN
#undef FBN_HCAT
#undef FBN_HCAT_
