/* e4m3 (float8_e4m3fn: sign, 4 exponent bits of bias 7, 3 mantissa bits, no infinities, NaN
   0x7f / 0xff) <-> float32 for ember's C kernels, exactly as torch converts.

   e4m3 -> float32: one value, 16 lanes with AVX-512F, 8 with AVX2. The magnitude's 7 bits
   shifted under a float32 exponent rebiased by 120 are the value when the e4m3 exponent is
   not 0; a subnormal (exponent 0) is its 3 mantissa bits times 2^-9. No float32 subnormal is
   formed on the way, so a denormals-are-zero mode changes nothing.

   float32 -> e4m3 (`float_to_e4m3`, one value: what an FP8 cache stores of a key or value):
   torch's `x.clamp(-448, 448).to(torch.float8_e4m3fn)`, rounded to nearest even, NaN kept
   with its sign. */
#ifndef EMBER_FLOAT8_H
#define EMBER_FLOAT8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float e4m3_to_float(uint8_t bits) {
    uint32_t magnitude = bits & 0x7fu;
    float value;
    if (magnitude == 0x7fu) {
        value = NAN;
    } else if (magnitude < 8u) {
        value = (float)magnitude * 0x1p-9f;
    } else {
        uint32_t u = (magnitude << 20) + (120u << 23);
        memcpy(&value, &u, sizeof value);
    }
    return (bits & 0x80u) ? -value : value;
}

static inline uint8_t float_to_e4m3(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7fu; /* NaN */
    if (magnitude >= 0x43e00000u) return sign | 0x7eu; /* 448 and beyond: 448 */
    if (magnitude < 0x3c800000u) {                      /* below 2^-6: multiples of 2^-9 */
        float absolute;
        memcpy(&absolute, &magnitude, sizeof absolute);
        return sign | (uint8_t)rintf(absolute * 512.0f);
    }
    /* the float32 mantissa rounded to 3 bits (a carry moves into the exponent), the exponent
       rebiased from 127 to 7 */
    uint32_t rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);
    return sign | (uint8_t)((rounded >> 20) - (120u << 3));
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_e4m3(const uint8_t *bytes) {
    __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
    __m512 value = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(magnitude, 20),
                                                        _mm512_set1_epi32(120 << 23)));
    __mmask16 subnormal = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8));
    value = _mm512_mask_mov_ps(
        value, subnormal,
        _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(0x1p-9f)));
    __mmask16 nan = _mm512_cmpeq_epi32_mask(magnitude, _mm512_set1_epi32(0x7f));
    value = _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(NAN));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
}
#endif

#if defined(__AVX2__)
#include <immintrin.h>

static inline __m256 load_e4m3_8(const uint8_t *bytes) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
    __m256 value = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(magnitude, 20),
                                                        _mm256_set1_epi32(120 << 23)));
    __m256 subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude));
    value = _mm256_blendv_ps(
        value, _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(0x1p-9f)),
        subnormal);
    __m256 nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7f)));
    value = _mm256_blendv_ps(value, _mm256_set1_ps(NAN), nan);
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign));
}
#endif

#endif
