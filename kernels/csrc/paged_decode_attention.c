/* Decode attention over a paged bfloat16 KV cache, reading each request's blocks in place.
 *
 * The torch reference (ember/kernels/attention.py, _decode_attention) gathers every request's
 * blocks into a padded batch, converts them to float32 and runs SDPA: three passes over the
 * context per layer. This reads each cached key and value once. Each (request, KV head)
 * computes its G = Hq / Hkv query heads with an online softmax (one rescale per block), in
 * float32. Returns 1, computing nothing, for shapes beyond its fixed buffers.
 *
 *   query       [B, Hq, D]                   float32, contiguous
 *   kv_cache    [2, num_blocks, bs, Hkv, D]  bfloat16 (uint16 bits), contiguous
 *   block_table [B, table_stride]            int64 (row b lists request b's blocks)
 *   seq_lens    [B]                          int32 (tokens in the cache, this step's included)
 *   out         [B, Hq, D]                   float32
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64

int ember_paged_decode_attention(
    const float *query, const uint16_t *kv_cache, const int64_t *block_table,
    int64_t table_stride, const int32_t *seq_lens, int64_t num_reqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
    float scale, int64_t sliding_window, float *out) {
    int64_t group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK) return 1;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t value_offset = num_blocks * block_size * token_stride;

    for (int64_t r = 0; r < num_reqs; r++) {
        for (int64_t h = 0; h < num_kv_heads; h++) {
            float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
            float k[MAX_HEAD_DIM], v[MAX_HEAD_DIM];
            float running_max[MAX_GROUP], running_sum[MAX_GROUP];
            for (int64_t g = 0; g < group; g++) {
                const float *src = query + (r * num_heads + h * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) q[g][d] = src[d] * scale;
                memset(acc[g], 0, sizeof(float) * head_dim);
                running_max[g] = -INFINITY;
                running_sum[g] = 0.0f;
            }
            int64_t len = seq_lens[r];
            int64_t start = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
            /* One block at a time: its scores first, then one rescale of the sums per block. */
            for (int64_t first = start; first < len; first = (first / block_size + 1) * block_size) {
                int64_t last = (first / block_size + 1) * block_size;
                if (last > len) last = len;
                int64_t count = last - first;
                int64_t block = block_table[r * table_stride + first / block_size];
                const uint16_t *k_bits =
                    kv_cache + (block * block_size + first % block_size) * token_stride + h * head_dim;
                const uint16_t *v_bits = k_bits + value_offset;
                float scores[MAX_GROUP][MAX_BLOCK];
                for (int64_t t = 0; t < count; t++) {
                    for (int64_t d = 0; d < head_dim; d++) k[d] = bf16_to_float(k_bits[t * token_stride + d]);
                    for (int64_t g = 0; g < group; g++) {
                        float score = 0.0f;
                        for (int64_t d = 0; d < head_dim; d++) score += q[g][d] * k[d];
                        scores[g][t] = score;
                    }
                }
                for (int64_t g = 0; g < group; g++) {
                    float block_max = running_max[g];
                    for (int64_t t = 0; t < count; t++)
                        if (scores[g][t] > block_max) block_max = scores[g][t];
                    float correction = expf(running_max[g] - block_max);
                    running_sum[g] *= correction;
                    for (int64_t d = 0; d < head_dim; d++) acc[g][d] *= correction;
                    for (int64_t t = 0; t < count; t++) {
                        scores[g][t] = expf(scores[g][t] - block_max);
                        running_sum[g] += scores[g][t];
                    }
                    running_max[g] = block_max;
                }
                for (int64_t t = 0; t < count; t++) {
                    for (int64_t d = 0; d < head_dim; d++) v[d] = bf16_to_float(v_bits[t * token_stride + d]);
                    for (int64_t g = 0; g < group; g++) {
                        float weight = scores[g][t];
                        for (int64_t d = 0; d < head_dim; d++) acc[g][d] += weight * v[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *dst = out + (r * num_heads + h * group + g) * head_dim;
                float inv = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
                for (int64_t d = 0; d < head_dim; d++) dst[d] = acc[g][d] * inv;
            }
        }
    }
    return 0;
}
