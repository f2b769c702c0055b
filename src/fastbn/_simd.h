/*
 * Innermost loops of the fastbn kernels: one function per (operation, layout, dtype, ISA level),
 * and the dispatch table that picks the level at run time.
 *
 * The Cython kernels (_kernels.pyx) own the partition of the work, the threads and the merging
 * of partial results; the loops (_simd_loops.h, written once) only stream over a contiguous run
 * of segments or a block of rows.
 *
 * ISA levels. On x86-64 with GCC >= 12 or Clang >= 14 the loops are compiled three times, for
 * "baseline" (x86-64, SSE2: 16-byte registers), "x86-64-v3" (AVX2 + FMA: 32 bytes) and
 * "x86-64-v4" (AVX-512: 64 bytes), each with accumulators of its own register width, by
 * including _simd_loops.h under `#pragma GCC target`. (They had been written with 64-byte vector
 * types for all three target_clones: on AVX2 every vector was two registers and the NCL
 * reductions ran slower than the baseline clone.) fbn_cpu_init() picks the best level the CPU
 * and OS support (__builtin_cpu_supports checks cpuid and the xgetbv-enabled register state),
 * capped by FASTBN_CPU_LEVEL; fbn_set_level() switches the table for the process. Elsewhere there
 * is one level, "baseline", compiled with the build's flags. A portable build (no -march=native)
 * thus runs AVX2/AVX-512 code where the CPU has it. Results depend on the level (vector width,
 * FMA contraction), never on the thread count.
 *
 * The conversions between float16/bfloat16 and float32 (_half_loops.h) are compiled per level
 * the same way (F16C at x86-64-v3 and up) and sit in the same table; their results are the same
 * at every level (NumPy's and ml_dtypes' casts, bit for bit).
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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h> /* F16C, for the float16 conversions of the levels that have it */
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

/* GCC (>= 12) and Clang vector extensions; -DFASTBN_NO_VECTOR_EXT forces structs of lanes. */
#if !defined(FASTBN_NO_VECTOR_EXT) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
#define FBN_VECTOR_EXT 1
#else
#define FBN_VECTOR_EXT 0
#endif

/* Several ISA levels: x86-64 Linux/BSD/macOS with GCC >= 12 or Clang >= 14, unless the build
 * already targets AVX2 (-march=native etc.: then one level, the build's own) or asks for one
 * level (-DFASTBN_ONE_LEVEL). */
#if defined(__x86_64__) && !defined(__AVX2__) && !defined(FASTBN_ONE_LEVEL) && \
    ((defined(__clang__) && __clang_major__ >= 14) ||                          \
     (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12))
#define FBN_LEVELS 3
#else
#define FBN_LEVELS 1
#endif

/* Values each lane sums in the working precision before adding them into its double lane. */
#define FBN_BLOCK 8

/* Rows of a channels-last block summed in registers (in T, like FBN_BLOCK) before each update
 * of the double accumulators: 8 for the statistics (x), 4 for the backward sums, which read
 * two or three arrays, so 8 rows were 16-24 streams side by side (17 GB/s against 20-27 for 4
 * from L3, 20 against 28-42 in cache; 2 rows were slower again). */
#define FBN_ROWS 8
#define FBN_BROWS 4

/* Lane masks of the overlapping tails: lanes [16 - n, ...) of fbn_tail32 zero the first n. */
static const int32_t fbn_tail32[32] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       -1, -1, -1, -1, -1, -1, -1, -1,
                                       -1, -1, -1, -1, -1, -1, -1, -1};
static const int64_t fbn_tail64[16] = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};

/* ------------------------------------------------------------------ the loops, per level */
#if FBN_LEVELS == 3
#define FBN_TARGET_PUSH(t) _Pragma("GCC push_options") FBN_PRAGMA(GCC target(t))
#define FBN_TARGET_POP _Pragma("GCC pop_options")
#if defined(__clang__)
#undef FBN_TARGET_PUSH
#undef FBN_TARGET_POP
#define FBN_TARGET_PUSH(t) \
    FBN_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define FBN_TARGET_POP _Pragma("clang attribute pop")
#endif
#endif

/* baseline: the build's own flags (x86-64: SSE2, 16-byte registers) */
#define FBN_LEVEL base
/* F16C in the baseline only where the build itself targets it (-march=native etc.) */
#if defined(__F16C__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FBN_F16C 1
#else
#define FBN_F16C 0
#endif
#if defined(__AVX2__) && FBN_F16C
#define FBN_HAVX2 1
#else
#define FBN_HAVX2 0
#endif
#if defined(__SSE2__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FBN_HSSE2 1
#else
#define FBN_HSSE2 0
#endif
#if defined(__AVX512F__)
#define FBN_VB 64
#elif defined(__AVX__)
#define FBN_VB 32
#else
#define FBN_VB 16
#endif
#define FBN_T float
#define FBN_TF 1
#define FBN_SFX float_base
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#define FBN_T double
#define FBN_TF 0
#define FBN_SFX double_base
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#include "_half_loops.h"
#undef FBN_F16C
#undef FBN_HAVX2
#undef FBN_HSSE2
#undef FBN_VB
#undef FBN_LEVEL

#if FBN_LEVELS == 3
FBN_TARGET_PUSH("arch=x86-64-v3")
#define FBN_LEVEL v3
#define FBN_F16C 1
#define FBN_HAVX2 1
#define FBN_HSSE2 1
#define FBN_VB 32
#define FBN_T float
#define FBN_TF 1
#define FBN_SFX float_v3
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#define FBN_T double
#define FBN_TF 0
#define FBN_SFX double_v3
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#include "_half_loops.h"
#undef FBN_F16C
#undef FBN_HAVX2
#undef FBN_HSSE2
#undef FBN_VB
#undef FBN_LEVEL
FBN_TARGET_POP

FBN_TARGET_PUSH("arch=x86-64-v4")
#define FBN_LEVEL v4
#define FBN_F16C 1
#define FBN_HAVX2 1
#define FBN_HSSE2 1
#define FBN_VB 64
#define FBN_T float
#define FBN_TF 1
#define FBN_SFX float_v4
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#define FBN_T double
#define FBN_TF 0
#define FBN_SFX double_v4
#include "_simd_loops.h"
#undef FBN_T
#undef FBN_TF
#undef FBN_SFX
#include "_half_loops.h"
#undef FBN_F16C
#undef FBN_HAVX2
#undef FBN_HSSE2
#undef FBN_VB
#undef FBN_LEVEL
FBN_TARGET_POP
#endif

#include "_simd_dispatch.h"

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
