/* Vector helpers shared by ember's C kernels: a vectorised exp and bfloat16 <-> float32 for 16
   lanes with AVX-512F and for 8 with AVX2 + FMA (rounding to nearest even as torch's casts and
   `float_to_bf16` do). Empty without AVX2. */
#ifndef EMBER_VECTOR_MATH_H
#define EMBER_VECTOR_MATH_H

#if defined(__AVX512F__)
#include <immintrin.h>

/* e^x for x <= 0 (the scores less their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by
   its degree-6 Taylor polynomial (error below 2e-7 relative), times 2^n. Below -87.3 the
   result is flushed to zero, which the softmax weights allow. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 floor = _mm512_set1_ps(-87.3f);
    __mmask16 tiny = _mm512_cmp_ps_mask(x, floor, _CMP_LT_OQ);
    x = _mm512_max_ps(x, floor);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

static inline __m512 load_bf16(const uint16_t *bits) {
    __m256i half = _mm256_loadu_si256((const __m256i *)bits);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* 16 floats -> 16 bfloat16 bits, rounded to nearest even (NaN stays NaN). */
static inline __m256i bf16_from_ps(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i rounded = _mm512_add_epi32(
        bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                               _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
#endif


#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* exp_ps for 8 lanes: the same reduction and polynomial, 2^n built in the exponent bits. */
static inline __m256 exp_ps8(__m256 x) {
    const __m256 floor = _mm256_set1_ps(-87.3f);
    __m256 tiny = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
    x = _mm256_max_ps(x, floor);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* n >= -126 here (x >= -87.3), so 2^n is a normal float */
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}

static inline float reduce_add_ps8(__m256 values) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

static inline float reduce_max_ps8(__m256 values) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline __m256 load_bf16_8(const uint16_t *bits) {
    __m128i half = _mm_loadu_si128((const __m128i *)bits);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* 8 floats -> 8 bfloat16 bits, rounded to nearest even (NaN stays NaN). */
static inline __m128i bf16_from_ps8(__m256 values) {
    __m256i bits = _mm256_castps_si256(values);
    __m256i rounded = _mm256_add_epi32(
        bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                               _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
    __m256i shifted = _mm256_srli_epi32(rounded, 16); /* 8 words in the low halves of 32 bits */
    __m128i low = _mm256_castsi256_si128(shifted), high = _mm256_extracti128_si256(shifted, 1);
    return _mm_packus_epi32(low, high);
}
#endif

#endif
