/*
 * Conversions between the 2-byte floats (IEEE float16, bfloat16) and float32, compiled once per
 * ISA level: _simd.h includes this file inside each level's target region with
 *   FBN_LEVEL  the suffix of the names (base, v3, v4),
 *   FBN_F16C   1 where the level has F16C (x86-64-v3 and up): the float16 loops use
 *              vcvtph2ps / vcvtps2ph, 8 values per instruction.
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
    FBN_SIMD
    for (ptrdiff_t k = 0; k < n; k++)
        dst[k] = FBN_HFN(f2bf)(FBN_HFN(f2u)(src[k]));
}

#undef FBN_HFN
#undef FBN_HCAT
#undef FBN_HCAT_
