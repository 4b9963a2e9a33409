/* out = x @ w.T for a weight w [N, K] stored as GGUF-style groups of 32 (`QuantizedWeight` in
 * ember/workers/layers/packed_int4.py), with the activations quantized to 16-bit groups:
 *
 *   4-bit  codes [N, K / 2] uint8, two per byte (even element in the low nibble),
 *          w = q * scale + offset, q in [0, 15]                           (Q4_0, Q4_1)
 *   8-bit  codes [N, K] int8, w = q * scale, q in [-127, 127]              (Q8_0)
 *   scale, offset [N, K / 32]: float16 or float32
 *
 * Each group of 32 values of a row of x becomes dx = max|x| / 32767 and qx = round(x / dx),
 * so a group's product is integer work, scaled once:
 *
 *   sum(w * x) = scale * dx * sum(q * qx)  +  offset * dx * sum(qx)
 *
 * sum(q * qx) is one vpmaddwd over 32 16-bit pairs with AVX-512 (two with AVX2, a plain loop
 * elsewhere). llama.cpp quantizes activations to 8 bits, which is cheaper still but moved
 * greedy choices of SmolLM2 away from float32's on 3 of 8 chat prompts; 16 bits are finer than
 * the bfloat16 activations of torch's 4-bit kernel. Per group that reads 16 or 32 bytes of
 * weights against torch's 64 (bfloat16): a decode step, which reads every weight once, is
 * bound by that traffic. The weight rows are shared by the OpenMP threads (torch's own runtime).
 *
 *   x    [M, K]  float32 or bfloat16 (uint16 bits)
 *   out  [M, N]  float32 or bfloat16 (rounded to nearest even)
 *
 * Returns 0, or 1 when K is not a multiple of 32 or above 16384 (nothing computed).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bfloat16.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define GROUP 32
#define ROW_TILE 4 /* activation rows that share one unpacked weight group */
#define MAX_GROUPS 512 /* K up to 16384 */

typedef struct {
    int16_t *q;    /* [M, K], per group in the weight codes' element order */
    float *scale;  /* [M, K / 32]: dx */
    float *sum;    /* [M, K / 32]: dx * sum(qx) */
} QuantizedActivations;

static inline float load_scale(const void *scales, int f16, int64_t index) {
    if (!f16) return ((const float *)scales)[index];
    uint16_t h = ((const uint16_t *)scales)[index];
    /* float16 -> float32, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        float f = (float)mantissa * (1.0f / 16777216.0f); /* mantissa * 2^-24 */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Groups of 32 values of each row of x as 16-bit integers with their scale; for 4-bit weights
   a group's even elements first, then its odd ones (the order its codes unpack in). */
static void quantize_activations(const void *x, int x_bf16, int64_t rows, int64_t k,
                                 int interleaved, QuantizedActivations *a) {
    const int64_t groups = k / GROUP;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            float values[GROUP];
            for (int i = 0; i < GROUP; i++) {
                int64_t index = r * k + g * GROUP + i;
                values[i] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[index])
                                   : ((const float *)x)[index];
            }
            float amax = 0.0f;
            for (int i = 0; i < GROUP; i++) amax = fmaxf(amax, fabsf(values[i]));
            float dx = amax / 32767.0f, inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
            int16_t *q = a->q + r * k + g * GROUP;
            int total = 0;
            for (int i = 0; i < GROUP; i++) {
                int value = (int)lrintf(values[i] * inverse);
                q[interleaved ? (i % 2) * (GROUP / 2) + i / 2 : i] = (int16_t)value;
                total += value;
            }
            a->scale[r * groups + g] = dx;
            a->sum[r * groups + g] = dx * (float)total;
        }
    }
}

#if defined(__AVX512BW__)
/* A group's 32 weight codes as 16-bit words: for 4-bit ones, the low nibbles then the high. */
static inline __m512i group_words(const uint8_t *codes, int bits, int64_t element) {
    if (bits == 8)
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(codes + element)));
    __m512i words = _mm512_cvtepu8_epi16(
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(codes + element / 2))));
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0004000400040004LL, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(words, shifts), _mm512_set1_epi16(0x0f));
}

/* results[r] += rows (a constant once inlined, so that the accumulators stay in registers)
   of 16-bit activations . weight row n, group g scaled by combined[r][g]; two accumulators
   per row (even and odd groups) keep two chains of fused adds in flight. */
static inline __attribute__((always_inline)) void dot_rows(
    const QuantizedActivations *a, const int rows, int64_t k, const uint8_t *codes, int bits,
    int64_t n, float combined[][MAX_GROUPS], float *results) {
    const int64_t groups = k / GROUP;
    __m512 acc[2][ROW_TILE];
    for (int r = 0; r < rows; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
        __m512i w0 = group_words(codes, bits, n * k + g * GROUP);
        __m512i w1 = group_words(codes, bits, n * k + (g + 1) * GROUP);
        for (int r = 0; r < rows; r++) {
            const int16_t *x = a->q + r * k + g * GROUP;
            __m512 p0 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w0, _mm512_loadu_si512(x)));
            __m512 p1 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w1, _mm512_loadu_si512(x + GROUP)));
            acc[0][r] = _mm512_fmadd_ps(p0, _mm512_set1_ps(combined[r][g]), acc[0][r]);
            acc[1][r] = _mm512_fmadd_ps(p1, _mm512_set1_ps(combined[r][g + 1]), acc[1][r]);
        }
    }
    if (g < groups) {
        __m512i w0 = group_words(codes, bits, n * k + g * GROUP);
        for (int r = 0; r < rows; r++) {
            __m512i x = _mm512_loadu_si512(a->q + r * k + g * GROUP);
            __m512 p0 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w0, x));
            acc[0][r] = _mm512_fmadd_ps(p0, _mm512_set1_ps(combined[r][g]), acc[0][r]);
        }
    }
    for (int r = 0; r < rows; r++)
        results[r] += _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
}
#elif defined(__AVX2__)
static inline float sum_lanes(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}

/* A group's 32 weight codes as bytes: for 4-bit ones, the low nibbles then the high ones. */
static inline __m256i group_bytes(const uint8_t *codes, int bits, int64_t element) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)(codes + element));
    __m128i packed = _mm_loadu_si128((const __m128i *)(codes + element / 2));
    const __m128i mask = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask),
                            _mm_and_si128(packed, mask));
}

/* As above, in two 256-bit halves of 16 words per group. */
static inline __attribute__((always_inline)) void dot_rows(
    const QuantizedActivations *a, const int rows, int64_t k, const uint8_t *codes, int bits,
    int64_t n, float combined[][MAX_GROUPS], float *results) {
    const int64_t groups = k / GROUP;
    __m256 acc[ROW_TILE];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i bytes = group_bytes(codes, bits, n * k + g * GROUP);
        __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
        __m256i w0 = bits == 4 ? _mm256_cvtepu8_epi16(low) : _mm256_cvtepi8_epi16(low);
        __m256i w1 = bits == 4 ? _mm256_cvtepu8_epi16(high) : _mm256_cvtepi8_epi16(high);
        for (int r = 0; r < rows; r++) {
            const int16_t *xq = a->q + r * k + g * GROUP;
            __m256i sums = _mm256_add_epi32(
                _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xq)),
                _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 16))));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(combined[r][g]),
                                     acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) results[r] += sum_lanes(acc[r]);
}
#endif

/* A weight row's group scales and offsets as float32. */
static void load_scales(const void *scales, int f16, int64_t first, int64_t count, float *out) {
    if (!f16) {
        memcpy(out, (const float *)scales + first, sizeof(float) * (size_t)count);
        return;
    }
    const uint16_t *halves = (const uint16_t *)scales + first;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= count; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(halves + i))));
#endif
#if defined(__F16C__)
    for (; i < count; i++) out[i] = _cvtsh_ss(halves[i]);
#endif
    for (; i < count; i++) out[i] = load_scale(scales, 1, first + i);
}

/* out[r] = row r of the tile `a` (pointing at its first row) . weight row n, r < rows. */
static void weight_row(const QuantizedActivations *a, int64_t rows, int64_t k,
                       const uint8_t *codes, int bits, const void *scale, const void *offset,
                       int f16, int64_t n, float *results) {
    const int64_t groups = k / GROUP;
    float d[MAX_GROUPS], m[MAX_GROUPS], combined[ROW_TILE][MAX_GROUPS];
    load_scales(scale, f16, n * groups, groups, d);
    if (bits == 4) load_scales(offset, f16, n * groups, groups, m);
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict dx = a->scale + r * groups, *restrict sums = a->sum + r * groups;
        float *restrict row_scale = combined[r];
        for (int64_t g = 0; g < groups; g++) row_scale[g] = d[g] * dx[g];
        float offsets = 0.0f;
        if (bits == 4)
            for (int64_t g = 0; g < groups; g++) offsets += m[g] * sums[g];
        results[r] = offsets;
    }
#if defined(__AVX2__)
    switch (rows) {
        case 1: dot_rows(a, 1, k, codes, bits, n, combined, results); break;
        case 2: dot_rows(a, 2, k, codes, bits, n, combined, results); break;
        case 3: dot_rows(a, 3, k, codes, bits, n, combined, results); break;
        default: dot_rows(a, 4, k, codes, bits, n, combined, results); break;
    }
#else
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t r = 0; r < rows; r++) {
            const int16_t *xq = a->q + r * k + g * GROUP;
            int64_t total = 0;
            if (bits == 4) {
                const uint8_t *packed = codes + (n * k + g * GROUP) / 2;
                for (int i = 0; i < GROUP / 2; i++)
                    total += (packed[i] & 0x0f) * xq[i] + (packed[i] >> 4) * xq[i + GROUP / 2];
            } else {
                const int8_t *w8 = (const int8_t *)codes + n * k + g * GROUP;
                for (int i = 0; i < GROUP; i++) total += w8[i] * xq[i];
            }
            results[r] += combined[r][g] * (float)total;
        }
    }
#endif
}

int ember_block_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const uint8_t *codes,
                       int bits, const void *scale, const void *offset, int scale_f16,
                       int64_t n_cols, void *out, int out_bf16) {
    if (k % GROUP || k / GROUP > MAX_GROUPS || (bits != 4 && bits != 8)) return 1;
    const int64_t groups = k / GROUP;
    QuantizedActivations a;
    a.q = malloc(sizeof(int16_t) * (size_t)(m_rows * k));
    a.scale = malloc(sizeof(float) * (size_t)(m_rows * groups));
    a.sum = malloc(sizeof(float) * (size_t)(m_rows * groups));
    if (!a.q || !a.scale || !a.sum) {
        free(a.q), free(a.scale), free(a.sum);
        return 2;
    }
    quantize_activations(x, x_bf16, m_rows, k, bits == 4, &a);

#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_cols; n++) {
        for (int64_t r0 = 0; r0 < m_rows; r0 += ROW_TILE) {
            int64_t rows = m_rows - r0 < ROW_TILE ? m_rows - r0 : ROW_TILE;
            QuantizedActivations tile = {a.q + r0 * k, a.scale + r0 * groups, a.sum + r0 * groups};
            float results[ROW_TILE];
            weight_row(&tile, rows, k, codes, bits, scale, offset, scale_f16, n, results);
            for (int64_t r = 0; r < rows; r++) {
                int64_t index = (r0 + r) * n_cols + n;
                if (out_bf16)
                    ((uint16_t *)out)[index] = float_to_bf16(results[r]);
                else
                    ((float *)out)[index] = results[r];
            }
        }
    }
    free(a.q), free(a.scale), free(a.sum);
    return 0;
}
