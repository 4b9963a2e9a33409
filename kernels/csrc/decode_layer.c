/* The elementwise parts of a Llama-shaped decode layer on CPU, each one call over a step's few
   tokens (the matmuls stay torch's packed 4-bit kernel; see ember/workers/cpu_decode/llama_runner.py):

   ember_rope_write_kv: the fused qkv projection's output [T, (Hq + 2 Hkv) D] (bfloat16;
       ember_rope_write_kv_rows also takes float32, and serves prefill chunks) ->
       query rotated (neox style, the first R channels of each head) into q_out [T, Hq, D]
       float32; key rotated and value copied into the bfloat16 paged KV cache at `slots`
       (cache_format 0), or stored in an e4m3 one (1) as key / k_scale and value / v_scale
       (`float_to_e4m3`, torch's rounding).
   ember_silu_mul: [T, 2I] bfloat16 (gate | up) -> silu(gate) * up, [T, I] bfloat16.

   Math is float32; bfloat16 results are rounded to nearest even, as torch's casts do. Built by
   ember/kernels/cpu_library.py. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"
#include "float8.h"
#include "vector_math.h"

/* Tokens from which a call shares them among OpenMP's threads (torch's own): a decode step of
   one or a few requests stays on the caller's thread, as even an idle region costs a few
   microseconds; a step of 32 shares them (SmolLM2's SiLU 29 us a layer on one thread). */
#define PARALLEL_TOKENS 16

/* Element i of a row of bfloat16 bits or float32 values. */
static inline float element(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* Rotate one head (neox: channel i pairs with i + R/2) into float32. */
static void rotate_head(const void *src, int bf16, const float *cos, const float *sin,
                        int64_t head_dim, int64_t rotary_dim, float *dst) {
    int64_t half = rotary_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        float x1 = element(src, i, bf16), x2 = element(src, i + half, bf16);
        dst[i] = x1 * cos[i] - x2 * sin[i];
        dst[i + half] = x2 * cos[i] + x1 * sin[i];
    }
    for (int64_t i = rotary_dim; i < head_dim; ++i) dst[i] = element(src, i, bf16);
}

/* One token's query into q_out, its key and value into the cache at `slot`. */
static void rope_token(const void *row, int bf16, const float *cos, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,
                       void *kv_cache, int64_t value_plane, int64_t slot, float *q_out,
                       int64_t cache_format, float k_divisor, float v_divisor) {
    const float *sin = cos + rotary_dim / 2;
    const size_t element_bytes = bf16 ? sizeof(uint16_t) : sizeof(float);
    const char *bytes = row;
    float key[1024];
    uint16_t *cache_bf16 = kv_cache;
    uint8_t *cache_e4m3 = kv_cache;
    for (int64_t h = 0; h < num_heads; ++h)
        rotate_head(bytes + h * head_dim * element_bytes, bf16, cos, sin, head_dim, rotary_dim,
                    q_out + h * head_dim);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
        rotate_head(bytes + (num_heads + h) * head_dim * element_bytes, bf16, cos, sin, head_dim,
                    rotary_dim, key);
        const int64_t at = (slot * num_kv_heads + h) * head_dim;
        const void *v = bytes + (num_heads + num_kv_heads + h) * head_dim * element_bytes;
        if (cache_format == 1) {
            for (int64_t i = 0; i < head_dim; ++i)
                cache_e4m3[at + i] = float_to_e4m3(key[i] / k_divisor);
            for (int64_t i = 0; i < head_dim; ++i)
                cache_e4m3[value_plane + at + i] = float_to_e4m3(element(v, i, bf16) / v_divisor);
            continue;
        }
        for (int64_t i = 0; i < head_dim; ++i) cache_bf16[at + i] = float_to_bf16(key[i]);
        if (bf16) {
            memcpy(cache_bf16 + value_plane + at, v, sizeof(uint16_t) * head_dim);
        } else {
            for (int64_t i = 0; i < head_dim; ++i)
                cache_bf16[value_plane + at + i] = float_to_bf16(((const float *)v)[i]);
        }
    }
}

/* ember_rope_write_kv for a qkv of bfloat16 bits (qkv_bf16) or float32 values; PARALLEL_TOKENS
   tokens and more are shared among OpenMP's threads. */
int ember_rope_write_kv_rows(const void *qkv, int qkv_bf16, const int64_t *positions,
                             const float *cos_sin, int64_t num_tokens, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,
                             void *kv_cache, int64_t cache_slots, const int64_t *slots,
                             float *q_out, int64_t cache_format, const float *k_scale,
                             const float *v_scale) {
    if (head_dim > 1024 || rotary_dim > head_dim || rotary_dim % 2) return 1;
    if (cache_format != 0 && cache_format != 1) return 1;
    for (int64_t t = 0; t < num_tokens; ++t)
        if (slots[t] < 0 || slots[t] >= cache_slots) return 2;
    const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
    const size_t row_bytes = width * (qkv_bf16 ? sizeof(uint16_t) : sizeof(float));
    const int64_t value_plane = cache_slots * num_kv_heads * head_dim; /* in elements */
    const float k_divisor = k_scale ? *k_scale : 1.0f, v_divisor = v_scale ? *v_scale : 1.0f;
#define ROPE_TOKEN(t)                                                                        \
    rope_token((const char *)qkv + (t) * row_bytes, qkv_bf16, cos_sin + positions[t] * rotary_dim, \
               num_heads, num_kv_heads, head_dim, rotary_dim, kv_cache, value_plane, slots[t],   \
               q_out + (t) * num_heads * head_dim, cache_format, k_divisor, v_divisor)
    if (num_tokens < PARALLEL_TOKENS) { /* no parallel region (even an idle one costs) */
        for (int64_t t = 0; t < num_tokens; ++t) ROPE_TOKEN(t);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < num_tokens; ++t) ROPE_TOKEN(t);
    return 0;
#undef ROPE_TOKEN
}

int ember_rope_write_kv(const uint16_t *qkv, const int64_t *positions, const float *cos_sin,
                        int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t rotary_dim, void *kv_cache,
                        int64_t cache_slots, const int64_t *slots, float *q_out,
                        int64_t cache_format, const float *k_scale, const float *v_scale) {
    return ember_rope_write_kv_rows(qkv, 1, positions, cos_sin, num_tokens, num_heads,
                                    num_kv_heads, head_dim, rotary_dim, kv_cache, cache_slots,
                                    slots, q_out, cache_format, k_scale, v_scale);
}

void ember_silu_mul(const uint16_t *gate_up, int64_t num_tokens, int64_t size, uint16_t *out) {
    /* PARALLEL_TOKENS rows and more are shared over torch's threads (a build with OpenMP). */
#pragma omp parallel for schedule(static) if (num_tokens >= PARALLEL_TOKENS)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const uint16_t *gate = gate_up + t * 2 * size, *up = gate + size;
        uint16_t *o = out + t * size;
        int64_t i = 0;
#if defined(__AVX512F__)
        /* silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) (never above 1, no overflow):
           1 / (1 + e) for g >= 0, e / (1 + e) below. */
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= size; i += 16) {
            __m512 g = load_bf16(gate + i), u = load_bf16(up + i);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 numerator = _mm512_mask_mov_ps(one, negative, e);
            __m512 sigmoid = _mm512_div_ps(numerator, _mm512_add_ps(one, e));
            __m512 result = _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u);
            _mm256_storeu_si256((__m256i *)(o + i), bf16_from_ps(result));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (; i + 8 <= size; i += 8) {
            __m256 g = load_bf16_8(gate + i), u = load_bf16_8(up + i);
            __m256 e = exp_ps8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_and_ps(g, magnitude)));
            __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
            __m256 numerator = _mm256_blendv_ps(one, e, negative);
            __m256 sigmoid = _mm256_div_ps(numerator, _mm256_add_ps(one, e));
            __m256 result = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), u);
            _mm_storeu_si128((__m128i *)(o + i), bf16_from_ps8(result));
        }
#endif
        for (; i < size; ++i) {
            float g = bf16_to_float(gate[i]);
            o[i] = float_to_bf16(g / (1.0f + expf(-g)) * bf16_to_float(up[i]));
        }
    }
}
