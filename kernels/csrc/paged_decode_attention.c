/* Decode attention over a paged bfloat16 or e4m3 KV cache, reading each request's blocks in
 * place.
 *
 * The torch reference (ember/kernels/attention.py, _decode_attention) gathers every request's
 * blocks into a padded batch, converts them to float32 and runs SDPA: three passes over the
 * context per layer. This reads each cached key and value once. Each (request, KV head) task
 * computes its G = Hq / Hkv query heads with an online softmax (one rescale per block), in
 * float32; the tasks are spread over the OpenMP threads (torch's own runtime, whose thread
 * count `torch.set_num_threads` sets). With fewer tasks than twice the threads (a batch of one,
 * a long context) each task's tokens are cut into stretches, attended apart and merged by
 * their softmax maxima and sums. Returns 1, computing nothing, for shapes beyond its fixed
 * buffers.
 *
 * With AVX-512 (16 lanes) or AVX2 + FMA (8) the scores of a block are one vector per query head
 * and their exponentials a vectorised exp (`exp_ps`, within 2 ulp of expf); elsewhere the same
 * steps run as scalar loops.
 *
 * An e4m3 cache (cache_format 1: keys stored as key / k_scale, values as value / v_scale) is
 * read a byte a value and widened to float32 in registers (`float8.h`); k_scale joins the
 * query's scale and v_scale the softmax's normalisation, so the loops are the bfloat16 ones.
 *
 *   query       [B, Hq, D]                   float32, contiguous
 *   kv_cache    [2, num_blocks, bs, Hkv, D]  bfloat16 (uint16 bits) or e4m3 (bytes), contiguous
 *   block_table [B, table_stride]            int64 (row b lists request b's blocks)
 *   seq_lens    [B]                          int32 (tokens in the cache, this step's included)
 *   k_scale, v_scale                         float32 scalars (NULL: 1), e4m3 caches only
 *   out         [B, Hq, D]                   float32
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bfloat16.h"
#include "float8.h"

#if defined(_OPENMP)
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
#endif

#define MAX_GROUP 16
#define MAX_HEADS 64 /* query heads of one task */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64
/* Cached token-heads of a step worth the threads. The threads are still spinning from the
   matmul before (the fused decode step), so sharing even a short context pays: batch-1 decode
   of 100-300 tokens, SmolLM2, 2 threads: 8.9-9.3 -> 8.5-8.9 ms a step under the AVX2 override,
   7.0 -> 6.5 with AVX-512 (4096 before, when one request's context was never split). */
#define SPLIT_MIN_WORK 192
#define SPLIT_MIN_TOKENS 64 /* a decode task's tokens, at least, in each of its stretches */
#define PREFILL_ROWS 48 /* query rows of a prefill task, at most (TILE_QUERY_ROWS) */
/* Packed keys and values (AMX) of the requests a round of a prefill call attends over, at most
   (a request of more takes a round alone). */
#define PACK_ROUND_BYTES (16 << 20)

#include "vector_math.h"

/* Cache elements by format (0: bfloat16, 1: e4m3), `index` counted in elements. `attend` is
   inlined into one function per format, so these choices are made at compile time. */
static inline float load_one(const void *cache, int64_t index, int fp8) {
    return fp8 ? e4m3_to_float(((const uint8_t *)cache)[index])
               : bf16_to_float(((const uint16_t *)cache)[index]);
}
#if defined(__AVX512F__)
static inline __m512 load_16(const void *cache, int64_t index, int fp8) {
    return fp8 ? load_e4m3((const uint8_t *)cache + index)
               : load_bf16((const uint16_t *)cache + index);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 load_8(const void *cache, int64_t index, int fp8) {
    return fp8 ? load_e4m3_8((const uint8_t *)cache + index)
               : load_bf16_8((const uint16_t *)cache + index);
}
#endif

/* The cache lines of one token's keys (row_bytes at `row`) and values (v_bytes further). */
static inline void prefetch_token(const char *row, int64_t row_bytes, int64_t v_bytes) {
    for (int64_t offset = 0; offset < row_bytes; offset += 64) {
        __builtin_prefetch(row + offset, 0, 3);
        __builtin_prefetch(row + offset + v_bytes, 0, 3);
    }
}

/* The attention of one request's query heads of KV heads [0, kv_heads) (q: scaled,
   [kv_heads * group][head_dim], `keys` the cache and `first_key` the element offset of the
   first of those KV heads) over tokens [start, len) of its blocks; acc gets the outputs,
   normalised and times `v_scale`. A block's keys of all those heads are read together, then
   its values: both are contiguous in the cache. Offsets count elements of the cache's
   format (`fp8`: e4m3 bytes, else bfloat16). */
static inline __attribute__((always_inline)) void attend(
    float q[][MAX_HEAD_DIM], int64_t kv_heads, int64_t group, int64_t head_dim,
    const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,
    const int64_t *blocks, int64_t block_size, int64_t start, int64_t len, float v_scale,
    const int64_t *row_lens, float acc[][MAX_HEAD_DIM], float *max_out, float *sum_out,
    const int fp8) {
    const int64_t element_bytes = fp8 ? 1 : 2;
    const int64_t heads = kv_heads * group;
    float running_max[MAX_HEADS], running_sum[MAX_HEADS];
    float scores[MAX_HEADS][MAX_BLOCK];
    for (int64_t j = 0; j < heads; j++) {
        memset(acc[j], 0, sizeof(float) * head_dim);
        running_max[j] = -INFINITY;
        running_sum[j] = 0.0f;
    }
#if defined(__AVX512F__)
    const int vector_path = head_dim % 16 == 0;
#elif defined(__AVX2__) && defined(__FMA__)
    const int vector_path = head_dim % 8 == 0;
#else
    const int vector_path = 0;
#endif
    /* One block at a time: its scores first, then one rescale of the sums per block. */
    for (int64_t first = start; first < len; first = (first / block_size + 1) * block_size) {
        int64_t last = (first / block_size + 1) * block_size;
        if (last > len) last = len;
        int64_t count = last - first;
        const int64_t k_first =
            first_key + (blocks[first / block_size] * block_size + first % block_size) * token_stride;
        const int64_t v_first = k_first + value_offset;
        /* The next block's keys and values are fetched while this one computes, a token's
           rows per token: issued all at once, the prefetches outnumbered the core's fill
           buffers and held the loads behind them until most of the block had arrived (the
           compute and the memory then took turns: 32 requests of ~190 tokens, SmolLM2's 30
           layers, 2 threads: 11.0 ms, against 6.5 with the cache in L2/L3). */
        const char *k_next = 0;
        int64_t next_tokens = 0;
        if (last < len) {
            k_next = (const char *)keys +
                (first_key + blocks[last / block_size] * block_size * token_stride) * element_bytes;
            next_tokens = len - last < block_size ? len - last : block_size;
        }
        for (int64_t t = 0; t < count || t < next_tokens; t++) {
            if (t < next_tokens)
                prefetch_token(k_next + t * token_stride * element_bytes,
                               kv_heads * head_dim * element_bytes, value_offset * element_bytes);
            if (t >= count) continue;
            for (int64_t h = 0; h < kv_heads; h++) {
                const int64_t k_row = k_first + t * token_stride + h * head_dim;
                float (*qh)[MAX_HEAD_DIM] = q + h * group;
                if (vector_path) {
#if defined(__AVX512F__)
                    __m512 dots[MAX_GROUP];
                    for (int64_t g = 0; g < group; g++) dots[g] = _mm512_setzero_ps();
                    for (int64_t d = 0; d < head_dim; d += 16) {
                        __m512 k = load_16(keys, k_row + d, fp8);
                        for (int64_t g = 0; g < group; g++)
                            dots[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qh[g] + d), k, dots[g]);
                    }
                    for (int64_t g = 0; g < group; g++)
                        scores[h * group + g][t] = _mm512_reduce_add_ps(dots[g]);
#elif defined(__AVX2__) && defined(__FMA__)
                    __m256 dots[MAX_GROUP];
                    for (int64_t g = 0; g < group; g++) dots[g] = _mm256_setzero_ps();
                    for (int64_t d = 0; d < head_dim; d += 8) {
                        __m256 k = load_8(keys, k_row + d, fp8);
                        for (int64_t g = 0; g < group; g++)
                            dots[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qh[g] + d), k, dots[g]);
                    }
                    for (int64_t g = 0; g < group; g++)
                        scores[h * group + g][t] = reduce_add_ps8(dots[g]);
#endif
                } else {
                    float k[MAX_HEAD_DIM];
                    for (int64_t d = 0; d < head_dim; d++) k[d] = load_one(keys, k_row + d, fp8);
                    for (int64_t g = 0; g < group; g++) {
                        float score = 0.0f;
                        for (int64_t d = 0; d < head_dim; d++) score += qh[g][d] * k[d];
                        scores[h * group + g][t] = score;
                    }
                }
            }
        }
        if (row_lens != 0) { /* a prefill row sees the keys up to its own position */
            for (int64_t j = 0; j < heads; j++)
                for (int64_t t = row_lens[j] > first ? row_lens[j] - first : 0; t < count; t++)
                    scores[j][t] = -INFINITY;
        }
        for (int64_t j = 0; j < heads; j++) {
            float block_max = running_max[j];
            for (int64_t t = 0; t < count; t++)
                if (scores[j][t] > block_max) block_max = scores[j][t];
            float correction = expf(running_max[j] - block_max);
            running_sum[j] *= correction;
            for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= correction;
            int64_t t = 0;
#if defined(__AVX512F__)
            __m512 sums = _mm512_setzero_ps();
            for (; t + 16 <= count; t += 16) {
                __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores[j] + t),
                                                _mm512_set1_ps(block_max)));
                _mm512_storeu_ps(scores[j] + t, e);
                sums = _mm512_add_ps(sums, e);
            }
            if (t < count) {
                __mmask16 rest = (__mmask16)((1u << (count - t)) - 1u);
                __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, scores[j] + t),
                                                _mm512_set1_ps(block_max)));
                _mm512_mask_storeu_ps(scores[j] + t, rest, e);
                sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(rest, e));
                t = count;
            }
            running_sum[j] += _mm512_reduce_add_ps(sums);
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 sums = _mm256_setzero_ps();
            for (; t < count; t += 8) { /* the tail padded with -inf, whose exp is 0 */
                float padded[8];
                int64_t lanes = count - t < 8 ? count - t : 8;
                for (int64_t i = 0; i < 8; i++) padded[i] = i < lanes ? scores[j][t + i] : -INFINITY;
                __m256 e = exp_ps8(_mm256_sub_ps(_mm256_loadu_ps(padded), _mm256_set1_ps(block_max)));
                _mm256_storeu_ps(padded, e);
                memcpy(scores[j] + t, padded, sizeof(float) * lanes);
                sums = _mm256_add_ps(sums, e);
            }
            t = count;
            running_sum[j] += reduce_add_ps8(sums);
#endif
            for (; t < count; t++) {
                scores[j][t] = expf(scores[j][t] - block_max);
                running_sum[j] += scores[j][t];
            }
            running_max[j] = block_max;
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t v_head = v_first + h * head_dim;
            if (vector_path) {
#if defined(__AVX512F__)
                for (int64_t d = 0; d < head_dim; d += 16) {
                    __m512 sums[MAX_GROUP];
                    for (int64_t g = 0; g < group; g++)
                        sums[g] = _mm512_loadu_ps(acc[h * group + g] + d);
                    for (int64_t t = 0; t < count; t++) {
                        __m512 v = load_16(keys, v_head + t * token_stride + d, fp8);
                        for (int64_t g = 0; g < group; g++)
                            sums[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * group + g][t]),
                                                      v, sums[g]);
                    }
                    for (int64_t g = 0; g < group; g++)
                        _mm512_storeu_ps(acc[h * group + g] + d, sums[g]);
                }
#elif defined(__AVX2__) && defined(__FMA__)
                for (int64_t d = 0; d < head_dim; d += 8) {
                    __m256 sums[MAX_GROUP];
                    for (int64_t g = 0; g < group; g++)
                        sums[g] = _mm256_loadu_ps(acc[h * group + g] + d);
                    for (int64_t t = 0; t < count; t++) {
                        __m256 v = load_8(keys, v_head + t * token_stride + d, fp8);
                        for (int64_t g = 0; g < group; g++)
                            sums[g] = _mm256_fmadd_ps(_mm256_set1_ps(scores[h * group + g][t]),
                                                      v, sums[g]);
                    }
                    for (int64_t g = 0; g < group; g++)
                        _mm256_storeu_ps(acc[h * group + g] + d, sums[g]);
                }
#endif
            } else {
                float v[MAX_HEAD_DIM];
                for (int64_t t = 0; t < count; t++) {
                    for (int64_t d = 0; d < head_dim; d++)
                        v[d] = load_one(keys, v_head + t * token_stride + d, fp8);
                    for (int64_t g = 0; g < group; g++) {
                        float weight = scores[h * group + g][t];
                        float *a = acc[h * group + g];
                        for (int64_t d = 0; d < head_dim; d++) a[d] += weight * v[d];
                    }
                }
            }
        }
    }
    if (max_out) { /* a stretch of a split task: its sums stay unnormalised, for the merge */
        for (int64_t j = 0; j < heads; j++) {
            max_out[j] = running_max[j];
            sum_out[j] = running_sum[j];
        }
        return;
    }
    for (int64_t j = 0; j < heads; j++) {
        float inv = running_sum[j] > 0.0f ? v_scale / running_sum[j] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= inv;
    }
}

/* `attend` with the group size a constant where it is 1 to 8: its per-head accumulators then
   live in registers. With a run-time group they went through the stack, each FMA waiting on a
   store: 32 requests of 180 tokens, SmolLM2's 9 query heads on 3, took 431 us a layer on
   AVX-512 (Zen 4, 2 threads) and 427 under the AVX2 override; now 181 and 267. */
#define ATTEND_ARGS                                                                            \
    float q[][MAX_HEAD_DIM], int64_t kv_heads, int64_t group, int64_t head_dim,              \
        const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,     \
        const int64_t *blocks, int64_t block_size, int64_t start, int64_t len, float v_scale, \
        const int64_t *row_lens, float acc[][MAX_HEAD_DIM], float *max_out, float *sum_out
#define ATTEND_CALL(GROUP, FP8)                                                                \
    attend(q, kv_heads, GROUP, head_dim, keys, first_key, value_offset, token_stride, blocks, \
           block_size, start, len, v_scale, row_lens, acc, max_out, sum_out, FP8)
#define ATTEND_BY_GROUP(FP8)              \
    switch (group) {                      \
    case 1: ATTEND_CALL(1, FP8); break;   \
    case 2: ATTEND_CALL(2, FP8); break;   \
    case 3: ATTEND_CALL(3, FP8); break;   \
    case 4: ATTEND_CALL(4, FP8); break;   \
    case 5: ATTEND_CALL(5, FP8); break;   \
    case 6: ATTEND_CALL(6, FP8); break;   \
    case 7: ATTEND_CALL(7, FP8); break;   \
    case 8: ATTEND_CALL(8, FP8); break;   \
    default: ATTEND_CALL(group, FP8);     \
    }

static void attend_bf16(ATTEND_ARGS) { ATTEND_BY_GROUP(0) }

static void attend_e4m3(ATTEND_ARGS) { ATTEND_BY_GROUP(1) }

/* What both entry points derive from their arguments: the e4m3 scales folded into the
   query's and the output's, and the cache's strides in elements. */
typedef struct {
    int fp8;
    float query_scale, output_scale;
    int64_t token_stride, value_offset;
} CacheView;

/* Returns 1, setting nothing, for shapes beyond the fixed buffers or an unknown format. */
static int cache_view(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t block_size, int64_t num_blocks, float scale, int64_t cache_format,
                      const float *k_scale, const float *v_scale, CacheView *view) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK)
        return 1;
    if (cache_format != 0 && cache_format != 1) return 1;
    view->fp8 = cache_format == 1;
    /* an e4m3 cache's scales: keys' into the query's scale, values' into the output's */
    view->query_scale = scale * (view->fp8 && k_scale ? *k_scale : 1.0f);
    view->output_scale = view->fp8 && v_scale ? *v_scale : 1.0f;
    view->token_stride = num_kv_heads * head_dim;
    view->value_offset = num_blocks * block_size * view->token_stride;
    return 0;
}

int ember_paged_decode_attention(
    const float *query, const void *kv_cache, const int64_t *block_table,
    int64_t table_stride, const int32_t *seq_lens, int64_t num_reqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
    float scale, int64_t sliding_window, float *out, int64_t cache_format,
    const float *k_scale, const float *v_scale) {
    CacheView view;
    if (cache_view(num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale,
                   cache_format, k_scale, v_scale, &view))
        return 1;
    const int64_t group = num_heads / num_kv_heads;
    const int threads = omp_get_max_threads();
    /* A task is a request's KV heads, all of them (each block read as one stretch) when there
       are requests enough to keep the threads busy, else one. */
    int64_t task_heads = num_kv_heads;
    if (num_heads > MAX_HEADS || num_reqs < 2 * threads) task_heads = 1;
    const int64_t tasks_per_req = num_kv_heads / task_heads, tasks = num_reqs * tasks_per_req;
    const int64_t heads = task_heads * group;
    /* Below SPLIT_MIN_WORK cached token-heads a step is a microsecond or two of work, less than
       handing it to the other threads costs. */
    int64_t work = 0, longest = 0;
    for (int64_t r = 0; r < num_reqs; r++) {
        int64_t len = seq_lens[r];
        if (sliding_window > 0 && len > sliding_window) len = sliding_window;
        work += len * num_kv_heads;
        if (len > longest) longest = len;
    }
    const int parallel = work >= SPLIT_MIN_WORK;
    /* Too few tasks to share among the threads (a batch of one or two, a long context): each
       task's tokens are cut into `splits` stretches of whole blocks, attended apart and merged
       by their softmax maxima and sums (flash decoding's split). */
    int64_t splits = 1;
    if (parallel && threads > 1 && tasks < 2 * threads) {
        splits = (2 * threads + tasks - 1) / tasks;
        if (splits > longest / SPLIT_MIN_TOKENS) splits = longest / SPLIT_MIN_TOKENS;
        if (splits < 1) splits = 1;
    }
    /* a stretch's unnormalised outputs [heads][head_dim], then its maxima and sums [heads] */
    const int64_t stretch_floats = heads * (head_dim + 2);
    float *stretches = splits > 1 ? malloc(sizeof(float) * tasks * splits * stretch_floats) : 0;
    if (splits > 1 && !stretches) splits = 1;

#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t item = 0; item < tasks * splits; item++) {
        const int64_t task = item / splits, part = item % splits;
        int64_t r = task / tasks_per_req, h0 = (task % tasks_per_req) * task_heads;
        float q[MAX_HEADS][MAX_HEAD_DIM], acc[MAX_HEADS][MAX_HEAD_DIM];
        const int64_t first_head = h0 * group;
        for (int64_t j = 0; j < heads; j++) {
            const float *src = query + (r * num_heads + first_head + j) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) q[j][d] = src[d] * view.query_scale;
        }
        int64_t len = seq_lens[r];
        int64_t start = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
        float *max_out = 0, *sum_out = 0;
        if (splits > 1) {
            /* whole blocks a stretch, from the block of `start` (the last may be short or
               empty) */
            const int64_t base = start / block_size * block_size;
            int64_t stretch = (len - base + splits - 1) / splits;
            stretch = (stretch + block_size - 1) / block_size * block_size;
            const int64_t begin = base + part * stretch;
            if (begin > start) start = begin;
            if (begin + stretch < len) len = begin + stretch;
            max_out = stretches + item * stretch_floats + heads * head_dim;
            sum_out = max_out + heads;
        }
        if (start < len)
            (view.fp8 ? attend_e4m3 : attend_bf16)(
                q, task_heads, group, head_dim, kv_cache, h0 * head_dim, view.value_offset,
                view.token_stride, block_table + r * table_stride, block_size, start, len,
                view.output_scale, 0, acc, max_out, sum_out);
        else /* nothing of this request's context falls in this stretch */
            for (int64_t j = 0; j < heads; j++) {
                memset(acc[j], 0, sizeof(float) * head_dim);
                if (max_out) max_out[j] = -INFINITY, sum_out[j] = 0.0f;
            }
        for (int64_t j = 0; j < heads; j++)
            memcpy(splits > 1 ? stretches + item * stretch_floats + j * head_dim
                              : out + (r * num_heads + first_head + j) * head_dim,
                   acc[j], sizeof(float) * head_dim);
    }
    /* the stretches of each task, merged: out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s */
    for (int64_t task = 0; splits > 1 && task < tasks; task++) {
        const int64_t r = task / tasks_per_req, h0 = (task % tasks_per_req) * task_heads;
        const float *first = stretches + task * splits * stretch_floats;
        for (int64_t j = 0; j < heads; j++) {
            float top = -INFINITY, total = 0.0f;
            for (int64_t part = 0; part < splits; part++) {
                const float m = first[part * stretch_floats + heads * head_dim + j];
                if (m > top) top = m;
            }
            float *o = out + (r * num_heads + h0 * group + j) * head_dim;
            memset(o, 0, sizeof(float) * head_dim);
            for (int64_t part = 0; part < splits; part++) {
                const float *stretch = first + part * stretch_floats;
                const float m = stretch[heads * head_dim + j];
                if (m == -INFINITY) continue;
                const float weight = expf(m - top);
                total += weight * stretch[heads * head_dim + heads + j];
                for (int64_t d = 0; d < head_dim; d++)
                    o[d] += weight * stretch[j * head_dim + d];
            }
            const float inv = total > 0.0f ? view.output_scale / total : 0.0f;
            for (int64_t d = 0; d < head_dim; d++) o[d] *= inv;
        }
    }
    free(stretches);
    return 0;
}

/* A prefill task's attention (`attend_rows_avx512`, `attend_rows_avx2`, `attend_rows_amx`) with the cache's
   format fixed at compile time, as attend_bf16 / attend_e4m3 fix it for `attend`. */
#define ROWS_ARGS                                                                              \
    float q[][MAX_HEAD_DIM], int64_t rows, const int64_t *row_lens, int64_t head_dim,         \
        const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,     \
        const int64_t *blocks, int64_t block_size, int64_t len, float v_scale,               \
        float acc[][MAX_HEAD_DIM]
#define ROWS_CALL(KERNEL, FP8)                                                                 \
    KERNEL(q, rows, row_lens, head_dim, keys, first_key, value_offset, token_stride, blocks,  \
           block_size, len, v_scale, acc, FP8)

#if defined(__AVX512F__)
/* Query rows of a prefill task on AVX-512 (tokens * group of them): each chunk of 16 keys is
   transposed once and serves them all. */
#define TILE_QUERY_ROWS PREFILL_ROWS
#define SCORE_ROWS 8 /* rows whose scores are summed together, one chain each */
#define VALUE_ROWS 6 /* rows whose outputs stay in registers while a chunk's values pass */

/* rows[i] = column i of the 16 x 16 matrix whose rows were rows[0..15]. */
static inline void transpose_16x16(__m512 rows[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        for (int j = 0; j < 2; j++) {
            __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + 2 + j]);
            rows[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            rows[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for (int i = 0; i < 16; i += 8) {
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(rows[i + j], rows[i + 4 + j], 0x88);
            t[i + 4 + j] = _mm512_shuffle_f32x4(rows[i + j], rows[i + 4 + j], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        rows[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        rows[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}

/* The causal attention of `rows` query rows (q: scaled; row j sees the keys below
   row_lens[j], and the first key sees every row) over one KV head's keys [0, len), as `attend`
   computes it for a prefill task, by chunks of 16 keys rather than key by key: a chunk's keys
   become 16-lane columns (keys_t[d]: key t's element d in lane t), so that a row's 16 scores
   are head_dim FMAs with no horizontal sums; its softmax is one vector; its values, widened
   once, are multiplied into VALUE_ROWS rows' outputs held in registers. head_dim is a
   multiple of 16; q and acc have room for rows up to a multiple of 24. */
static inline __attribute__((always_inline)) void attend_rows_avx512(
    float q[][MAX_HEAD_DIM], int64_t rows, const int64_t *row_lens, int64_t head_dim,
    const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,
    const int64_t *blocks, int64_t block_size, int64_t len, float v_scale,
    float acc[][MAX_HEAD_DIM], const int fp8) {
    float keys_t[MAX_HEAD_DIM][16] __attribute__((aligned(64)));
    float values[16][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float weights[TILE_QUERY_ROWS][16] __attribute__((aligned(64)));
    float running_max[TILE_QUERY_ROWS], running_sum[TILE_QUERY_ROWS], correction[TILE_QUERY_ROWS];
    /* rows past `rows`, up to a multiple of both row counts, are zero queries whose weights
       stay zero: the loops below then run whole sets of rows */
    const int64_t padded = (rows + 23) / 24 * 24;
    for (int64_t j = 0; j < padded; j++) {
        memset(acc[j], 0, sizeof(float) * head_dim);
        running_max[j] = -INFINITY;
        running_sum[j] = 0.0f;
        correction[j] = 1.0f;
        if (j >= rows) {
            memset(q[j], 0, sizeof(float) * head_dim);
            memset(weights[j], 0, sizeof(weights[j]));
        }
    }
    for (int64_t first = 0; first < len;) {
        int64_t last = (first / block_size + 1) * block_size;
        if (last > first + 16) last = first + 16;
        if (last > len) last = len;
        const int64_t count = last - first;
        const int64_t k_first =
            first_key + (blocks[first / block_size] * block_size + first % block_size) * token_stride;
        /* the chunk's keys as columns, its values as float32 rows */
        for (int64_t d = 0; d < head_dim; d += 16) {
            __m512 chunk[16];
            for (int64_t t = 0; t < 16; t++)
                chunk[t] = t < count ? load_16(keys, k_first + t * token_stride + d, fp8)
                                     : _mm512_setzero_ps();
            transpose_16x16(chunk);
            for (int64_t i = 0; i < 16; i++) _mm512_store_ps(keys_t[d + i], chunk[i]);
        }
        for (int64_t t = 0; t < count; t++)
            for (int64_t d = 0; d < head_dim; d += 16)
                _mm512_store_ps(values[t] + d,
                                load_16(keys, k_first + value_offset + t * token_stride + d, fp8));
        const __mmask16 in_chunk = (__mmask16)((1u << count) - 1u);
        /* scores, then each row's online softmax step */
        for (int64_t j0 = 0; j0 < padded; j0 += SCORE_ROWS) {
            const int64_t n = rows - j0 < SCORE_ROWS ? rows - j0 : SCORE_ROWS;
            __m512 score[SCORE_ROWS];
            for (int64_t i = 0; i < SCORE_ROWS; i++) score[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d++) {
                const __m512 k = _mm512_load_ps(keys_t[d]);
                for (int64_t i = 0; i < SCORE_ROWS; i++)
                    score[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[j0 + i][d]), k, score[i]);
            }
            for (int64_t i = 0; i < n; i++) {
                const int64_t j = j0 + i;
                const int64_t visible = row_lens[j] - first; /* keys of the chunk row j sees */
                const __mmask16 seen = visible >= 16 ? in_chunk
                    : visible <= 0 ? 0 : in_chunk & (__mmask16)((1u << visible) - 1u);
                const float chunk_max = _mm512_mask_reduce_max_ps(seen, score[i]);
                const float top = chunk_max > running_max[j] ? chunk_max : running_max[j];
                const __m512 e = _mm512_maskz_mov_ps(
                    seen, exp_ps(_mm512_sub_ps(score[i], _mm512_set1_ps(top))));
                correction[j] = top == running_max[j] ? 1.0f : expf(running_max[j] - top);
                running_sum[j] = running_sum[j] * correction[j] + _mm512_reduce_add_ps(e);
                running_max[j] = top;
                _mm512_store_ps(weights[j], e);
            }
        }
        /* outputs: acc = acc * correction + weights @ values */
        for (int64_t d = 0; d < head_dim; d += 64) {
            const int64_t vectors = head_dim - d < 64 ? (head_dim - d) / 16 : 4;
            for (int64_t j0 = 0; j0 < padded; j0 += VALUE_ROWS) {
                __m512 out[VALUE_ROWS][4];
                for (int64_t i = 0; i < VALUE_ROWS; i++)
                    for (int64_t v = 0; v < vectors; v++)
                        out[i][v] = _mm512_mul_ps(_mm512_loadu_ps(acc[j0 + i] + d + 16 * v),
                                                  _mm512_set1_ps(correction[j0 + i]));
                for (int64_t t = 0; t < count; t++) {
                    for (int64_t v = 0; v < vectors; v++) {
                        const __m512 value = _mm512_load_ps(values[t] + d + 16 * v);
                        for (int64_t i = 0; i < VALUE_ROWS; i++)
                            out[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j0 + i][t]),
                                                        value, out[i][v]);
                    }
                }
                for (int64_t i = 0; i < VALUE_ROWS; i++)
                    for (int64_t v = 0; v < vectors; v++)
                        _mm512_storeu_ps(acc[j0 + i] + d + 16 * v, out[i][v]);
            }
        }
        first = last;
    }
    for (int64_t j = 0; j < rows; j++) {
        const float inv = running_sum[j] > 0.0f ? v_scale / running_sum[j] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= inv;
    }
}

static void attend_rows_bf16(ROWS_ARGS) { ROWS_CALL(attend_rows_avx512, 0); }

static void attend_rows_e4m3(ROWS_ARGS) { ROWS_CALL(attend_rows_avx512, 1); }
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* attend_rows_avx512 on AVX2's 8 lanes: chunks of 8 keys, transposed 8 x 8. One prompt of 254 /
   1024 tokens, SmolLM2's heads, 2 threads under the AVX2 override: 1.44 / 21.95 ms a layer key
   by key (`attend`, 2 tokens a task) -> 1.34 / 18.1 ms. */
#define TILE_QUERY_ROWS PREFILL_ROWS
#define SCORE_ROWS 8 /* rows whose scores are summed together, one chain each */
#define VALUE_ROWS 3 /* rows whose outputs (32 columns at a time) stay in registers */

/* rows[i] = column i of the 8 x 8 matrix whose rows were rows[0..7]. */
static inline void transpose_8x8(__m256 rows[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        rows[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        rows[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* As attend_rows_avx512 (its comment says what each step does), by chunks of 8 keys. */
static inline __attribute__((always_inline)) void attend_rows_avx2(
    float q[][MAX_HEAD_DIM], int64_t rows, const int64_t *row_lens, int64_t head_dim,
    const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,
    const int64_t *blocks, int64_t block_size, int64_t len, float v_scale,
    float acc[][MAX_HEAD_DIM], const int fp8) {
    float keys_t[MAX_HEAD_DIM][8] __attribute__((aligned(32)));
    float values[8][MAX_HEAD_DIM] __attribute__((aligned(32)));
    float weights[TILE_QUERY_ROWS][8] __attribute__((aligned(32)));
    float running_max[TILE_QUERY_ROWS], running_sum[TILE_QUERY_ROWS], correction[TILE_QUERY_ROWS];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 minus_infinity = _mm256_set1_ps(-INFINITY);
    const int64_t padded = (rows + 23) / 24 * 24; /* whole sets of SCORE_ROWS and VALUE_ROWS */
    for (int64_t j = 0; j < padded; j++) {
        memset(acc[j], 0, sizeof(float) * head_dim);
        running_max[j] = -INFINITY;
        running_sum[j] = 0.0f;
        correction[j] = 1.0f;
        if (j >= rows) {
            memset(q[j], 0, sizeof(float) * head_dim);
            memset(weights[j], 0, sizeof(weights[j]));
        }
    }
    for (int64_t first = 0; first < len;) {
        int64_t last = (first / block_size + 1) * block_size;
        if (last > first + 8) last = first + 8;
        if (last > len) last = len;
        const int64_t count = last - first;
        const int64_t k_first =
            first_key + (blocks[first / block_size] * block_size + first % block_size) * token_stride;
        for (int64_t d = 0; d < head_dim; d += 8) {
            __m256 chunk[8];
            for (int64_t t = 0; t < 8; t++)
                chunk[t] = t < count ? load_8(keys, k_first + t * token_stride + d, fp8)
                                     : _mm256_setzero_ps();
            transpose_8x8(chunk);
            for (int64_t i = 0; i < 8; i++) _mm256_store_ps(keys_t[d + i], chunk[i]);
        }
        for (int64_t t = 0; t < count; t++)
            for (int64_t d = 0; d < head_dim; d += 8)
                _mm256_store_ps(values[t] + d,
                                load_8(keys, k_first + value_offset + t * token_stride + d, fp8));
        for (int64_t j0 = 0; j0 < padded; j0 += SCORE_ROWS) {
            const int64_t n = rows - j0 < SCORE_ROWS ? rows - j0 : SCORE_ROWS;
            __m256 score[SCORE_ROWS];
            for (int64_t i = 0; i < SCORE_ROWS; i++) score[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < head_dim; d++) {
                const __m256 k = _mm256_load_ps(keys_t[d]);
                for (int64_t i = 0; i < SCORE_ROWS; i++)
                    score[i] = _mm256_fmadd_ps(_mm256_set1_ps(q[j0 + i][d]), k, score[i]);
            }
            for (int64_t i = 0; i < n; i++) {
                const int64_t j = j0 + i;
                int64_t visible = row_lens[j] - first; /* keys of the chunk row j sees */
                visible = visible > count ? count : visible < 0 ? 0 : visible;
                const __m256 seen = _mm256_castsi256_ps(
                    _mm256_cmpgt_epi32(_mm256_set1_epi32((int)visible), lane));
                const float chunk_max = reduce_max_ps8(_mm256_blendv_ps(minus_infinity, score[i], seen));
                const float top = chunk_max > running_max[j] ? chunk_max : running_max[j];
                const __m256 e = _mm256_and_ps(
                    seen, exp_ps8(_mm256_sub_ps(_mm256_blendv_ps(_mm256_set1_ps(top), score[i], seen),
                                                _mm256_set1_ps(top))));
                correction[j] = top == running_max[j] ? 1.0f : expf(running_max[j] - top);
                running_sum[j] = running_sum[j] * correction[j] + reduce_add_ps8(e);
                running_max[j] = top;
                _mm256_store_ps(weights[j], e);
            }
        }
        for (int64_t d = 0; d < head_dim; d += 32) {
            const int64_t vectors = head_dim - d < 32 ? (head_dim - d) / 8 : 4;
            for (int64_t j0 = 0; j0 < padded; j0 += VALUE_ROWS) {
                __m256 out[VALUE_ROWS][4];
                for (int64_t i = 0; i < VALUE_ROWS; i++)
                    for (int64_t v = 0; v < vectors; v++)
                        out[i][v] = _mm256_mul_ps(_mm256_loadu_ps(acc[j0 + i] + d + 8 * v),
                                                  _mm256_set1_ps(correction[j0 + i]));
                for (int64_t t = 0; t < count; t++) {
                    for (int64_t v = 0; v < vectors; v++) {
                        const __m256 value = _mm256_load_ps(values[t] + d + 8 * v);
                        for (int64_t i = 0; i < VALUE_ROWS; i++)
                            out[i][v] = _mm256_fmadd_ps(_mm256_set1_ps(weights[j0 + i][t]),
                                                        value, out[i][v]);
                    }
                }
                for (int64_t i = 0; i < VALUE_ROWS; i++)
                    for (int64_t v = 0; v < vectors; v++)
                        _mm256_storeu_ps(acc[j0 + i] + d + 8 * v, out[i][v]);
            }
        }
        first = last;
    }
    for (int64_t j = 0; j < rows; j++) {
        const float inv = running_sum[j] > 0.0f ? v_scale / running_sum[j] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= inv;
    }
}

static void attend_rows_bf16(ROWS_ARGS) { ROWS_CALL(attend_rows_avx2, 0); }

static void attend_rows_e4m3(ROWS_ARGS) { ROWS_CALL(attend_rows_avx2, 1); }
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx.h"

/* Prefill attention with AMX-BF16 tiles (Sapphire Rapids and later Xeons): tdpbf16ps multiplies
   16 rows of 32 bfloat16 by 32 x 16 bfloat16 into 16 x 16 float32 sums, 512 products an
   instruction where an AVX-512 FMA does 16. Products of bfloat16 are exact in float32, so
   each float32 operand the cache does not already hold in bfloat16 (the queries, the softmax
   weights) goes in as three bfloat16 parts whose sum is that float exactly (8 significand
   bits each): the scores and outputs are float32 sums of the exact products, as the AVX-512
   kernel's are. Keys in steps of 64, two chunks of 32: tiles 0-3 take a row tile's scores of
   the step's four sets of 16 keys, then its outputs of 64 channels; 4 an A operand (a query
   part, a weight part), 5 a B operand (keys as columns of bfloat16 pairs, values as rows of
   pairs). The B operands are packed once a call for every task that reads them
   (pack_chunk_amx, all the chunks of a request's KV heads before its tasks start), where each
   task of 16 tokens packed its keys and values itself. SmolLM2's 30 layers, 2 threads of a
   Sapphire Rapids, W1's prompts (32 of 32-256 tokens) 192 -> 166 ms, one prompt of 1000
   tokens 141 -> 112, of 2000 tokens 509 -> 429; then steps of 64 keys instead of 32 (one
   softmax step a row for twice the keys) 1000 tokens 120-126 -> 109-110 ms, 2000 tokens
   438-449 -> 385. */
#define AMX_KEYS 32
#define AMX_MAX_HEAD_DIM 128
#define AMX_ROW_TILES (TILE_QUERY_ROWS / 16)

/* `ember_prefill_use_amx(0)` turns the tiles off (the AVX-512 kernel then serves). */
int ember_prefill_use_amx(int enabled) { return amx_enable(enabled); }

/* Whether ember_paged_prefill_attention multiplies with AMX tiles for this head size. */
int ember_prefill_tiles_serve(int64_t head_dim) {
    return head_dim % 32 == 0 && head_dim <= AMX_MAX_HEAD_DIM && amx_ready();
}

static void configure_attention_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; t++) { /* every tile 16 rows of 64 bytes */
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* x = hi + mid + lo exactly, each bfloat16 (rounded to nearest even in turn). */
static inline void split_bf16(__m512 x, __m256i parts[3]) {
    for (int p = 0; p < 3; p++) {
        parts[p] = (__m256i)_mm512_cvtneps_pbh(x);
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(parts[p]), 16));
        x = _mm512_sub_ps(x, back);
    }
}

/* 16 float32 values of a cache row (either format) as 16 bfloat16, exactly (bfloat16 and
   e4m3 values are bfloat16 values). */
static inline __m256i cache_bf16(const void *cache, int64_t index, int fp8) {
    return (__m256i)_mm512_cvtneps_pbh(load_16(cache, index, fp8));
}

/* A chunk's B operands as attend_rows_amx reads them: the keys as columns, [half][slice][16
   pairs][16 keys] of bfloat16 pairs (AMX_KEY_BYTES), then the values as rows of pairs, [channel
   block][16 key pairs][16 channels' pairs] (pair n of channel block c: channel 16c + n of both
   keys); keys past `len` are zeros. */
#define AMX_KEY_BYTES(head_dim) (2 * ((head_dim) / 32) * 1024)
#define AMX_CHUNK_BYTES(head_dim) (AMX_KEY_BYTES(head_dim) + ((head_dim) / 16) * 1024)
/* The keys' B tile of a chunk's half (16 keys) and slice (32 channels) */
#define KEY_TILE(chunk, slices, half, s) ((chunk) + ((half) * (slices) + (s)) * 1024)
/* The packed chunks of one KV head of a request of seq_len cached tokens */
#define KEY_CHUNKS(seq_len) (((seq_len) + AMX_KEYS - 1) / AMX_KEYS)

/* 32 cache values at `index` (either format) as 32 bfloat16, exactly: a bfloat16 cache's bits
   as they are (bfloat16 and e4m3 values are bfloat16 values). */
static inline __m512i cache_bf16_32(const void *cache, int64_t index, int fp8) {
    if (!fp8) return _mm512_loadu_si512((const uint16_t *)cache + index);
    return _mm512_inserti64x4(_mm512_castsi256_si512(cache_bf16(cache, index, fp8)),
                              cache_bf16(cache, index + 16, fp8), 1);
}

static inline __attribute__((always_inline)) void pack_chunk_amx(
    const void *keys, int64_t first_key, int64_t value_offset, int64_t token_stride,
    const int64_t *blocks, int64_t block_size, int64_t head_dim, int64_t first, int64_t len,
    uint8_t *chunk, const int fp8) {
    const int64_t slices = head_dim / 32;
    const int64_t count = len - first < AMX_KEYS ? len - first : AMX_KEYS;
    uint16_t (*values_b)[16][32] = (uint16_t (*)[16][32])(chunk + AMX_KEY_BYTES(head_dim));
    const __m512i interleave_low = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i interleave_high = _mm512_add_epi16(interleave_low, _mm512_set1_epi16(16));
    /* keys as columns: key n's 32-bit pairs, transposed per 16 keys and 16 pairs */
    for (int64_t half = 0; half < 2; half++)
        for (int64_t s = 0; s < slices; s++) {
            __m512 columns[16];
            for (int64_t n = 0; n < 16; n++) {
                const int64_t t = first + 16 * half + n;
                if (16 * half + n >= count) {
                    columns[n] = _mm512_setzero_ps();
                    continue;
                }
                const int64_t row = first_key +
                    (blocks[t / block_size] * block_size + t % block_size) * token_stride + 32 * s;
                columns[n] = _mm512_castsi512_ps(cache_bf16_32(keys, row, fp8));
            }
            transpose_16x16(columns);
            for (int64_t i = 0; i < 16; i++)
                _mm512_store_ps((float *)(KEY_TILE(chunk, slices, half, s) + 64 * i), columns[i]);
        }
    /* values as rows of pairs: keys 2i and 2i + 1 interleaved channel by channel */
    for (int64_t i = 0; i < 16; i++) {
        __m512i rows_of[2][AMX_MAX_HEAD_DIM / 32];
        for (int64_t e = 0; e < 2; e++) {
            const int64_t k = 2 * i + e, t = first + k;
            const int64_t row = k < count ? first_key + value_offset +
                (blocks[t / block_size] * block_size + t % block_size) * token_stride : -1;
            for (int64_t s = 0; s < slices; s++)
                rows_of[e][s] = row < 0 ? _mm512_setzero_si512() : cache_bf16_32(keys, row + 32 * s, fp8);
        }
        for (int64_t s = 0; s < slices; s++) {
            _mm512_store_si512(values_b[2 * s][i],
                               _mm512_permutex2var_epi16(rows_of[0][s], interleave_low, rows_of[1][s]));
            _mm512_store_si512(values_b[2 * s + 1][i],
                               _mm512_permutex2var_epi16(rows_of[0][s], interleave_high, rows_of[1][s]));
        }
    }
}

static void pack_chunk_amx_bf16(const void *keys, int64_t first_key, int64_t value_offset,
                                int64_t token_stride, const int64_t *blocks, int64_t block_size,
                                int64_t head_dim, int64_t first, int64_t len, uint8_t *chunk) {
    pack_chunk_amx(keys, first_key, value_offset, token_stride, blocks, block_size, head_dim,
                   first, len, chunk, 0);
}

static void pack_chunk_amx_e4m3(const void *keys, int64_t first_key, int64_t value_offset,
                                int64_t token_stride, const int64_t *blocks, int64_t block_size,
                                int64_t head_dim, int64_t first, int64_t len, uint8_t *chunk) {
    pack_chunk_amx(keys, first_key, value_offset, token_stride, blocks, block_size, head_dim,
                   first, len, chunk, 1);
}

/* A prefill task's attention with AMX tiles (the rows of `q`, each seeing the keys below its
   `row_lens` entry, over the `len` first keys of the request's KV head packed at `packed`). */
static void attend_rows_amx(float q[][MAX_HEAD_DIM], int64_t rows, const int64_t *row_lens,
                            int64_t head_dim, const uint8_t *packed, int64_t len, float v_scale,
                            float acc[][MAX_HEAD_DIM]) {
    const int64_t slices = head_dim / 32, row_tiles = (rows + 15) / 16;
    /* A operands: query parts [part][row tile][slice][16 rows][32], weight parts
       [part][row tile][chunk of the step][16 rows][32 keys]; B operands from `packed`
       (pack_chunk_amx) */
    uint16_t q_parts[3][AMX_ROW_TILES][AMX_MAX_HEAD_DIM / 32][16][32] __attribute__((aligned(64)));
    uint16_t w_parts[3][AMX_ROW_TILES][2][16][AMX_KEYS] __attribute__((aligned(64)));
    float scores[TILE_QUERY_ROWS][2 * AMX_KEYS] __attribute__((aligned(64)));
    float outputs[16][AMX_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float running_max[TILE_QUERY_ROWS], running_sum[TILE_QUERY_ROWS], correction[TILE_QUERY_ROWS];
    for (int64_t j = 0; j < row_tiles * 16; j++) {
        memset(acc[j], 0, sizeof(float) * head_dim);
        running_max[j] = -INFINITY;
        running_sum[j] = 0.0f;
        for (int64_t s = 0; s < slices; s++)
            for (int64_t h = 0; h < 2; h++) {
                __m256i parts[3];
                split_bf16(j < rows ? _mm512_loadu_ps(q[j] + 32 * s + 16 * h) : _mm512_setzero_ps(),
                           parts);
                for (int p = 0; p < 3; p++)
                    _mm256_store_si256((__m256i *)&q_parts[p][j / 16][s][j % 16][16 * h], parts[p]);
            }
    }
    const int64_t chunk_bytes = AMX_CHUNK_BYTES(head_dim);
    /* Two chunks of 32 keys a step (one softmax step a row for 64 keys), the second absent
       past `len` */
    for (int64_t first = 0; first < len; first += 2 * AMX_KEYS) {
        const int64_t count = len - first < 2 * AMX_KEYS ? len - first : 2 * AMX_KEYS;
        const int pair = count > AMX_KEYS;
        const uint8_t *chunk[2];
        chunk[0] = packed + first / AMX_KEYS * chunk_bytes;
        chunk[1] = chunk[0] + chunk_bytes; /* read only where `pair` */
        /* scores of each row tile: tiles 0-3 (the step's four sets of 16 keys) */
        for (int64_t rt = 0; rt < row_tiles; rt++) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t s = 0; s < slices; s++) {
                for (int p = 0; p < 3; p++) {
                    _tile_loadd(4, q_parts[p][rt][s], 64);
                    _tile_loadd(5, KEY_TILE(chunk[0], slices, 0, s), 64);
                    _tile_dpbf16ps(0, 4, 5);
                    _tile_loadd(5, KEY_TILE(chunk[0], slices, 1, s), 64);
                    _tile_dpbf16ps(1, 4, 5);
                    if (pair) {
                        _tile_loadd(5, KEY_TILE(chunk[1], slices, 0, s), 64);
                        _tile_dpbf16ps(2, 4, 5);
                        _tile_loadd(5, KEY_TILE(chunk[1], slices, 1, s), 64);
                        _tile_dpbf16ps(3, 4, 5);
                    }
                }
            }
            const int64_t stride = 2 * AMX_KEYS * sizeof(float);
            _tile_stored(0, scores[16 * rt], stride);
            _tile_stored(1, scores[16 * rt] + 16, stride);
            _tile_stored(2, scores[16 * rt] + 32, stride);
            _tile_stored(3, scores[16 * rt] + 48, stride);
        }
        /* each row's online softmax step; its weights in three parts */
        const __mmask64 in_step = count >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << count) - 1);
        for (int64_t j = 0; j < row_tiles * 16; j++) {
            __m256i parts[4][3];
            if (j < rows) {
                const int64_t visible = row_lens[j] - first;
                const __mmask64 seen = visible >= 64 ? in_step
                    : visible <= 0 ? 0 : in_step & (((__mmask64)1 << visible) - 1);
                __mmask16 lanes[4];
                __m512 x[4];
                __m512 peak = _mm512_set1_ps(-INFINITY);
                for (int v = 0; v < 4; v++) {
                    lanes[v] = (__mmask16)(seen >> (16 * v));
                    x[v] = _mm512_load_ps(scores[j] + 16 * v);
                    peak = _mm512_mask_max_ps(peak, lanes[v], peak, x[v]);
                }
                const float step_max = _mm512_reduce_max_ps(peak);
                const float top = step_max > running_max[j] ? step_max : running_max[j];
                __m512 total = _mm512_setzero_ps();
                for (int v = 0; v < 4; v++) {
                    const __m512 e = _mm512_maskz_mov_ps(
                        lanes[v], exp_ps(_mm512_sub_ps(x[v], _mm512_set1_ps(top))));
                    total = _mm512_add_ps(total, e);
                    if (v < 2 || pair) split_bf16(e, parts[v]);
                }
                correction[j] = top == running_max[j] ? 1.0f : expf(running_max[j] - top);
                running_sum[j] = running_sum[j] * correction[j] + _mm512_reduce_add_ps(total);
                running_max[j] = top;
            } else {
                correction[j] = 1.0f;
                for (int v = 0; v < 4; v++)
                    for (int p = 0; p < 3; p++) parts[v][p] = _mm256_setzero_si256();
            }
            for (int c = 0; c < 1 + pair; c++)
                for (int p = 0; p < 3; p++) {
                    _mm256_store_si256((__m256i *)w_parts[p][j / 16][c][j % 16], parts[2 * c][p]);
                    _mm256_store_si256((__m256i *)(w_parts[p][j / 16][c][j % 16] + 16),
                                       parts[2 * c + 1][p]);
                }
        }
        /* outputs: each row tile's products into tiles 0-3, 64 channels at a time, then acc =
           acc * correction + products */
        for (int64_t rt = 0; rt < row_tiles; rt++) {
            for (int64_t c0 = 0; c0 < head_dim / 16; c0 += 4) {
                const int64_t blocks_here = head_dim / 16 - c0 < 4 ? head_dim / 16 - c0 : 4;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int c = 0; c < 1 + pair; c++) {
                    const uint16_t (*values_b)[16][32] =
                        (const uint16_t (*)[16][32])(chunk[c] + AMX_KEY_BYTES(head_dim));
                    for (int p = 0; p < 3; p++) {
                        _tile_loadd(4, w_parts[p][rt][c], 64);
                        _tile_loadd(5, values_b[c0], 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (blocks_here > 1) {
                            _tile_loadd(5, values_b[c0 + 1], 64);
                            _tile_dpbf16ps(1, 4, 5);
                        }
                        if (blocks_here > 2) {
                            _tile_loadd(5, values_b[c0 + 2], 64);
                            _tile_dpbf16ps(2, 4, 5);
                        }
                        if (blocks_here > 3) {
                            _tile_loadd(5, values_b[c0 + 3], 64);
                            _tile_dpbf16ps(3, 4, 5);
                        }
                    }
                }
                const int64_t stride = AMX_MAX_HEAD_DIM * sizeof(float);
                _tile_stored(0, outputs[0] + 16 * c0, stride);
                if (blocks_here > 1) _tile_stored(1, outputs[0] + 16 * (c0 + 1), stride);
                if (blocks_here > 2) _tile_stored(2, outputs[0] + 16 * (c0 + 2), stride);
                if (blocks_here > 3) _tile_stored(3, outputs[0] + 16 * (c0 + 3), stride);
            }
            for (int64_t r = 0; r < 16; r++) {
                const int64_t j = 16 * rt + r;
                const __m512 scale = _mm512_set1_ps(correction[j]);
                for (int64_t d = 0; d < head_dim; d += 16)
                    _mm512_storeu_ps(acc[j] + d, _mm512_fmadd_ps(_mm512_loadu_ps(acc[j] + d), scale,
                                                                 _mm512_load_ps(outputs[r] + d)));
            }
        }
    }
    for (int64_t j = 0; j < rows; j++) {
        const float inv = running_sum[j] > 0.0f ? v_scale / running_sum[j] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= inv;
    }
}

#else
int ember_prefill_use_amx(int enabled) {
    (void)enabled;
    return 0;
}

int ember_prefill_tiles_serve(int64_t head_dim) {
    (void)head_dim;
    return 0;
}
#endif

/* One output row of head_dim floats, at element `index` of `out`: float32, or rounded to
   bfloat16 where `out_bf16`. */
static inline void store_output_row(void *out, int out_bf16, int64_t index, const float *row,
                                    int64_t head_dim) {
    if (!out_bf16) {
        memcpy((float *)out + index, row, sizeof(float) * head_dim);
        return;
    }
    uint16_t *dst = (uint16_t *)out + index;
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= head_dim; d += 16)
        _mm256_storeu_si256((__m256i *)(dst + d), bf16_from_ps(_mm512_loadu_ps(row + d)));
#elif defined(__AVX2__) && defined(__FMA__)
    for (; d + 8 <= head_dim; d += 8)
        _mm_storeu_si128((__m128i *)(dst + d), bf16_from_ps8(_mm256_loadu_ps(row + d)));
#endif
    for (; d < head_dim; d++) dst[d] = float_to_bf16(row[d]);
}

/* Causal attention of a batch of prefill chunks (and decodes: chunks of one token) over the
   cache, which holds this step's keys and values. Request r's q_len = query_start_loc[r + 1] -
   query_start_loc[r] tokens are the last of its seq_lens[r] cached tokens; token i of the
   chunk sees the keys up to its own position, seq_lens[r] - q_len + i.

   A task is one KV head of a few consecutive tokens of a request (8 / group of them, so that
   their query heads, at most 8 rows, keep their sums in registers as a decode's do): each
   cached key and value it reads serves all those rows, and the rows past a token's position
   are masked. Without a sliding window (the caller's torch path serves those). `out` is
   float32, or bfloat16 where `out_bf16` (rounded to nearest even, as torch's cast; the next
   projection's input dtype, so its conversion pass and half the stores are saved). */
int ember_paged_prefill_attention(
    const float *query, const void *kv_cache, const int64_t *block_table,
    int64_t table_stride, const int32_t *query_start_loc, const int32_t *seq_lens,
    int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t num_blocks, float scale, void *out, int out_bf16,
    int64_t cache_format, const float *k_scale, const float *v_scale) {
    CacheView view;
    if (cache_view(num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale,
                   cache_format, k_scale, v_scale, &view))
        return 1;
    const int64_t group = num_heads / num_kv_heads;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    const int by_tiles = ember_prefill_tiles_serve(head_dim);
#else
    const int by_tiles = 0;
#endif
#if defined(__AVX512F__)
    const int by_chunks = head_dim % 16 == 0; /* attend_rows_avx512 serves, or by_tiles */
#elif defined(__AVX2__) && defined(__FMA__)
    const int by_chunks = head_dim % 8 == 0; /* attend_rows_avx2 serves */
#else
    const int by_chunks = 0;
#endif
    const int64_t tokens_per_task = by_chunks ? PREFILL_ROWS / group : group >= 8 ? 1 : 8 / group;
    /* first_task[r]: request r's first task; each request has num_kv_heads tasks per block
       of tokens_per_task tokens */
    int64_t *first_task = malloc(sizeof(int64_t) * (num_reqs + 1));
    if (first_task == 0) return 1;
    first_task[0] = 0;
    int64_t work = 0;
    for (int64_t r = 0; r < num_reqs; r++) {
        int64_t q_len = query_start_loc[r + 1] - query_start_loc[r];
        if (q_len < 0 || q_len > seq_lens[r]) {
            free(first_task);
            return 2;
        }
        first_task[r + 1] =
            first_task[r] + (q_len + tokens_per_task - 1) / tokens_per_task * num_kv_heads;
        work += (int64_t)q_len * seq_lens[r];
    }

    /* With AMX tiles, each request's keys and values are first packed as the tiles read them,
       32 keys a chunk (pack_chunk_amx), once for all its tasks: first_chunk[r] is request r's
       first chunk of the packed buffer, its KV heads' chunks one after another. Requests go
       in rounds of at most PACK_ROUND_BYTES of chunks (at least one request a round). */
    int64_t *first_chunk = 0;
    uint8_t *packed = 0;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    const int64_t chunk_bytes = AMX_CHUNK_BYTES(head_dim);
    if (by_tiles) {
        first_chunk = malloc(sizeof(int64_t) * (num_reqs + 1));
        if (first_chunk == 0) {
            free(first_task);
            return 1;
        }
        first_chunk[0] = 0;
        int64_t largest = 0;
        for (int64_t r = 0; r < num_reqs; r++) {
            const int64_t chunks = KEY_CHUNKS(seq_lens[r]) * num_kv_heads;
            first_chunk[r + 1] = first_chunk[r] + chunks;
            if (chunks > largest) largest = chunks;
        }
        const int64_t round_chunks = PACK_ROUND_BYTES / chunk_bytes > largest
            ? PACK_ROUND_BYTES / chunk_bytes : largest;
        const int64_t buffer_chunks = first_chunk[num_reqs] < round_chunks
            ? first_chunk[num_reqs] : round_chunks;
        packed = aligned_alloc(64, (size_t)((buffer_chunks > 0 ? buffer_chunks : 1) * chunk_bytes));
        if (packed == 0) {
            free(first_task), free(first_chunk);
            return 1;
        }
    }
#endif

#pragma omp parallel if (work * num_kv_heads >= 4096)
    {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (by_tiles) configure_attention_tiles();
#endif
    /* rounds of requests [round_first, round_end): all of them in one round without tiles */
    int64_t round_end = 0;
    while (round_end < num_reqs) {
    const int64_t round_first = round_end;
    round_end = num_reqs;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (by_tiles) {
        const int64_t budget = PACK_ROUND_BYTES / chunk_bytes;
        round_end = round_first + 1;
        while (round_end < num_reqs && first_chunk[round_end + 1] - first_chunk[round_first] <= budget)
            round_end++;
        const int64_t base = first_chunk[round_first];
#pragma omp for schedule(static)
        for (int64_t item = base; item < first_chunk[round_end]; item++) {
            int64_t r = round_first, high = round_end; /* the request whose chunks hold `item` */
            while (high - r > 1) {
                int64_t middle = (r + high) / 2;
                if (first_chunk[middle] <= item) r = middle;
                else high = middle;
            }
            const int64_t chunks = KEY_CHUNKS(seq_lens[r]);
            const int64_t h = (item - first_chunk[r]) / chunks, c = (item - first_chunk[r]) % chunks;
            (view.fp8 ? pack_chunk_amx_e4m3 : pack_chunk_amx_bf16)(
                kv_cache, h * head_dim, view.value_offset, view.token_stride,
                block_table + r * table_stride, block_size, head_dim, c * AMX_KEYS, seq_lens[r],
                packed + (item - base) * chunk_bytes);
        } /* the barrier here: every chunk packed before a task reads it */
    }
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = first_task[round_first]; task < first_task[round_end]; task++) {
        int64_t r = round_first, high = round_end; /* the request whose tasks hold `task` */
        while (high - r > 1) {
            int64_t middle = (r + high) / 2;
            if (first_task[middle] <= task) r = middle;
            else high = middle;
        }
        const int64_t within = task - first_task[r];
        const int64_t h = within % num_kv_heads;
        const int64_t q_len = query_start_loc[r + 1] - query_start_loc[r];
        const int64_t first_token = within / num_kv_heads * tokens_per_task;
        int64_t tokens = q_len - first_token;
        if (tokens > tokens_per_task) tokens = tokens_per_task;
        const int64_t first_position = seq_lens[r] - q_len + first_token;
        float q[PREFILL_ROWS][MAX_HEAD_DIM], acc[PREFILL_ROWS][MAX_HEAD_DIM];
        int64_t row_lens[PREFILL_ROWS];
        const int64_t rows = tokens * group;
        for (int64_t i = 0; i < tokens; i++) {
            const int64_t token = query_start_loc[r] + first_token + i;
            for (int64_t g = 0; g < group; g++) {
                const float *src = query + (token * num_heads + h * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++)
                    q[i * group + g][d] = src[d] * view.query_scale;
                row_lens[i * group + g] = first_position + i + 1;
            }
        }
        const int64_t len = first_position + tokens;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
        if (by_tiles) {
            const int64_t chunks = KEY_CHUNKS(seq_lens[r]);
            attend_rows_amx(q, rows, row_lens, head_dim,
                            packed + (first_chunk[r] - first_chunk[round_first] + h * chunks) * chunk_bytes,
                            len, view.output_scale, acc);
        } else
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
        if (by_chunks)
            (view.fp8 ? attend_rows_e4m3 : attend_rows_bf16)(
                q, rows, row_lens, head_dim, kv_cache, h * head_dim, view.value_offset,
                view.token_stride, block_table + r * table_stride, block_size, len,
                view.output_scale, acc);
        else
#endif
        /* one KV head whose "group" is the tokens' query heads */
        (view.fp8 ? attend_e4m3 : attend_bf16)(
            q, 1, rows, head_dim, kv_cache, h * head_dim, view.value_offset, view.token_stride,
            block_table + r * table_stride, block_size, 0, len, view.output_scale,
            tokens > 1 ? row_lens : 0, acc, 0, 0);
        for (int64_t i = 0; i < tokens; i++) {
            const int64_t token = query_start_loc[r] + first_token + i;
            for (int64_t g = 0; g < group; g++)
                store_output_row(out, out_bf16, (token * num_heads + h * group + g) * head_dim,
                                 acc[i * group + g], head_dim);
        }
    } /* the barrier here: the round's tasks done before the next round packs over them */
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (by_tiles) _tile_release();
#endif
    }
    free(first_task), free(first_chunk), free(packed);
    return 0;
}
