/* The layers of a Llama-shaped decode step in one call from Python (see
 * ember/workers/cpu_decode/llama_runner.py and decode_step.py beside this file; built by
 * ember/kernels/cpu_library.py with the kernels' headers from kernels/csrc/ on its path).
 *
 * At batch size 1 a layer is ten C calls of a few to a few tens of microseconds each (add +
 * RMSNorm, four VNNI tile matmuls, rotary + KV write, decode attention, SiLU-and-mul); made
 * from Python through ctypes, each also costs a few microseconds of argument conversion and
 * tensor allocation, which came to about half of the step. Here the same kernels run in the
 * same order, called through the function pointers Python passes (each stays in its own
 * library, built with its own flags), on scratch buffers allocated once per step:
 *
 *   normed = norm_in(x + residual)      residual += x    (the embeddings for the first layer)
 *   qkv = normed @ Wqkv                 bfloat16
 *   query, KV cache = rope(qkv)         query float32; key and value into the cache (bfloat16,
 *                                       or e4m3 over the layer's k_scale / v_scale)
 *   attn = attention(query)             float32, rounded to bfloat16
 *   x = attn @ Wo
 *   normed = norm_post(x + residual)    residual += x
 *   x = silu_mul(normed @ Wgate_up) @ Wdown
 *   ... and after the last layer  hidden = norm(x + residual)
 *
 * With `token_slots` (LoRA: each token's adapter slot, -1 for none), each matmul of a layer
 * that LoRA wraps is followed by its adapters' deltas (kernels/csrc/lora_add.c), as the
 * layer-by-layer loop adds them.
 *
 * Returns 0, or the first kernel's non-zero status (what it computed so far is then to be
 * recomputed by the caller's other path: the KV writes are the ones it makes again).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bfloat16.h"

typedef int (*norm_fn)(const void *x, int x_bf16, const float *residual, const float *weight,
                       int64_t rows, int64_t hidden, float eps, void *out, int out_bf16,
                       float *residual_out);
typedef int (*matmul_fn)(const void *x, int x_bf16, int64_t m_rows, int64_t k,
                         const uint8_t *tiles, int bits, int64_t n_cols, void *out, int out_bf16);
typedef int (*rope_fn)(const uint16_t *qkv, const int64_t *positions, const float *cos_sin,
                       int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, int64_t rotary_dim, void *kv_cache,
                       int64_t cache_slots, const int64_t *slots, float *q_out,
                       int64_t cache_format, const float *k_scale, const float *v_scale);
typedef int (*attention_fn)(const float *query, const void *kv_cache,
                            const int64_t *block_table, int64_t table_stride,
                            const int32_t *seq_lens, int64_t num_reqs, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                            int64_t num_blocks, float scale, int64_t sliding_window, float *out,
                            int64_t cache_format, const float *k_scale, const float *v_scale);
typedef void (*silu_fn)(const uint16_t *gate_up, int64_t num_tokens, int64_t size,
                        uint16_t *out);
typedef int (*lora_fn)(const uint16_t *x, int64_t tokens, int64_t k, const int64_t *token_slots,
                       const float *lora_at, const float *lora_bt, int64_t n_rank, int64_t rank,
                       const int64_t *slice_ends, int64_t slices, int64_t n, uint16_t *out);

typedef struct {                                 /* one linear layer's adapters, or a == NULL */
    const float *at, *bt;                        /* [slots, K, n*R], [slots, R, N] float32 */
    const int64_t *slice_ends;
    int64_t n_rank, rank, slices;
} LoraWeights;

typedef struct {
    const float *norm_in, *norm_post;            /* RMSNorm weights [hidden], float32 */
    const uint8_t *qkv, *o, *gate_up, *down;     /* VNNI tiles (kernels/tile_matmul.py) */
    int64_t qkv_bits, o_bits, gate_up_bits, down_bits;
    const float *cos_sin;                        /* [max_position, rotary_dim] */
    void *kv_cache;                              /* [2, num_blocks, block_size, Hkv, D] */
    const float *k_scale, *v_scale;              /* an e4m3 cache's scalars */
    LoraWeights qkv_lora, o_lora, gate_up_lora, down_lora;
} Layer;

typedef struct {
    void *norm, *matmul, *rope, *attention, *silu, *lora; /* the kernels, from their libraries */
    const Layer *layers;
    const float *final_norm;
    int64_t num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim, rotary_dim;
    int64_t num_blocks, block_size, sliding_window;
    int64_t cache_format;                          /* 0: bfloat16, 1: e4m3 */
    float eps, scale;
} Model;

/* out [tokens, n] += the LoRA deltas of x [tokens, k] where the layer has adapters and the
   step has token slots; 0 otherwise */
static int add_lora(const Model *model, const LoraWeights *weights, const int64_t *token_slots,
                    const uint16_t *x, int64_t tokens, int64_t k, int64_t n, uint16_t *out) {
    if (!token_slots || !weights->at) return 0;
    if (!model->lora) return 4;
    return ((lora_fn)model->lora)(x, tokens, k, token_slots, weights->at, weights->bt,
                                  weights->n_rank, weights->rank, weights->slice_ends,
                                  weights->slices, n, out);
}

/* A step's scratch buffer on a cache line, so that its rows start on lines where their widths
   are whole lines: an AMX tile load of a row that straddles two lines reads both (SmolLM2's 30
   layers at 32 rows, x 16 bytes off a line: 9.5-9.8 ms against 7.2-7.7; malloc's blocks are
   only 16-byte aligned) */
static void *scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

int ember_decode_step(const Model *model, int64_t tokens, float *residual,
                      const int64_t *positions, const int64_t *slots, const int64_t *block_table,
                      int64_t table_stride, const int32_t *seq_lens, float *hidden_out,
                      const int64_t *token_slots) {
    norm_fn norm = (norm_fn)model->norm;
    matmul_fn matmul = (matmul_fn)model->matmul;
    rope_fn rope = (rope_fn)model->rope;
    attention_fn attention = (attention_fn)model->attention;
    silu_fn silu = (silu_fn)model->silu;
    const int64_t hidden = model->hidden, inter = model->intermediate;
    const int64_t heads = model->num_heads, kv_heads = model->num_kv_heads, dim = model->head_dim;
    const int64_t qkv_width = (heads + 2 * kv_heads) * dim, attn_width = heads * dim;
    const int64_t cache_slots = model->num_blocks * model->block_size;

    uint16_t *normed = scratch(sizeof(uint16_t) * tokens * hidden);
    uint16_t *x = scratch(sizeof(uint16_t) * tokens * hidden);
    uint16_t *qkv = scratch(sizeof(uint16_t) * tokens * qkv_width);
    float *query = scratch(sizeof(float) * tokens * attn_width);
    float *attn = scratch(sizeof(float) * tokens * attn_width);
    uint16_t *attn_bf16 = scratch(sizeof(uint16_t) * tokens * attn_width);
    uint16_t *gate_up = scratch(sizeof(uint16_t) * tokens * 2 * inter);
    uint16_t *act = scratch(sizeof(uint16_t) * tokens * inter);
    int status = 3;
    if (!normed || !x || !qkv || !query || !attn || !attn_bf16 || !gate_up || !act) goto done;

    for (int64_t l = 0; l < model->num_layers; l++) {
        const Layer *layer = &model->layers[l];
        if (l == 0)
            status = norm(residual, 0, 0, layer->norm_in, tokens, hidden, model->eps, normed, 1, 0);
        else
            status = norm(x, 1, residual, layer->norm_in, tokens, hidden, model->eps, normed, 1,
                          residual);
        if (status) goto done;
        status = matmul(normed, 1, tokens, hidden, layer->qkv, (int)layer->qkv_bits, qkv_width,
                        qkv, 1);
        if (!status)
            status = add_lora(model, &layer->qkv_lora, token_slots, normed, tokens, hidden,
                              qkv_width, qkv);
        if (status) goto done;
        status = rope(qkv, positions, layer->cos_sin, tokens, heads, kv_heads, dim,
                      model->rotary_dim, layer->kv_cache, cache_slots, slots, query,
                      model->cache_format, layer->k_scale, layer->v_scale);
        if (status) goto done;
        status = attention(query, layer->kv_cache, block_table, table_stride, seq_lens, tokens,
                           heads, kv_heads, dim, model->block_size, model->num_blocks,
                           model->scale, model->sliding_window, attn, model->cache_format,
                           layer->k_scale, layer->v_scale);
        if (status) goto done;
        for (int64_t i = 0; i < tokens * attn_width; i++) attn_bf16[i] = float_to_bf16(attn[i]);
        status = matmul(attn_bf16, 1, tokens, attn_width, layer->o, (int)layer->o_bits, hidden,
                        x, 1);
        if (!status)
            status = add_lora(model, &layer->o_lora, token_slots, attn_bf16, tokens, attn_width,
                              hidden, x);
        if (status) goto done;
        status = norm(x, 1, residual, layer->norm_post, tokens, hidden, model->eps, normed, 1,
                      residual);
        if (status) goto done;
        status = matmul(normed, 1, tokens, hidden, layer->gate_up, (int)layer->gate_up_bits,
                        2 * inter, gate_up, 1);
        if (!status)
            status = add_lora(model, &layer->gate_up_lora, token_slots, normed, tokens, hidden,
                              2 * inter, gate_up);
        if (status) goto done;
        silu(gate_up, tokens, inter, act);
        status = matmul(act, 1, tokens, inter, layer->down, (int)layer->down_bits, hidden, x, 1);
        if (!status)
            status = add_lora(model, &layer->down_lora, token_slots, act, tokens, inter, hidden, x);
        if (status) goto done;
    }
    status = norm(x, 1, residual, model->final_norm, tokens, hidden, model->eps, hidden_out, 0,
                  residual);
done:
    free(normed), free(x), free(qkv), free(query), free(attn), free(attn_bf16), free(gate_up);
    free(act);
    return status;
}
