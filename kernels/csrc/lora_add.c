/* LoRA deltas added in place to a linear layer's bfloat16 output on the CPU, each token by its
 * own adapter slot (vLLM's bgmv semantics; `kernels/lora_cpu.py`):
 *
 *   out[t] += ((x[t] @ A[s]^T) @ BT[s]) rounded once to bfloat16,   s = token_slots[t] >= 0
 *
 *   x            [T, K]        bfloat16 bits (the layer's input), rows contiguous
 *   token_slots  [T]           int64, -1: the base model (its row is not touched)
 *   lora_at      [S, K, nR]    float32, A transposed: column i*R + r holds row r of slice i's
 *                              A (zero padded to R)
 *   lora_bt      [S, R, N]     float32, B transposed and scaled: row r holds, over each
 *                              slice's outputs, that slice's column r (B is block-diagonal
 *                              across the slices, so they share the rows without zeros)
 *   slice_ends   [slices]      where each slice's outputs end (q | k | v, gate | up, or one)
 *   out          [T, N]        bfloat16 bits, updated in place
 *
 * Up to ROWS rows of one slot go together through two small register-blocked matrix products
 * (shrink: h = x A^T, then expand: out += h BT), each a block of output columns held in vector
 * registers over the whole sum, so every weight read from cache serves ROWS rows. Each output
 * of a row is summed in a fixed order whatever rows share its group (padding rows repeat a
 * real one), so a token's result does not depend on the other tokens of the step. GCC's
 * vector types give the AVX-512, AVX2 or SSE code of the instruction set the build targets;
 * the groups are shared over the OpenMP threads (torch's runtime). Returns 0; 1 when the sizes
 * are out of range (nothing changed: the caller's torch path serves); 2 when memory ran out
 * (rows may be partly updated: the caller must not add the deltas again).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bfloat16.h"

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
/* GCC vectorises with 256-bit registers under -march=native on AVX-512 CPUs unless told */
#pragma GCC target("prefer-vector-width=512")
#endif

#if defined(__AVX512F__)
#define VEC 16 /* floats a vector register holds */
#define ROWS 8 /* rows a group: 8 x 3 accumulators of 32 registers */
#elif defined(__AVX2__)
#define VEC 8
#define ROWS 4 /* 4 x 3 accumulators of 16 registers */
#else
#define VEC 4
#define ROWS 4
#endif
#define BLOCK 3 /* vectors of output columns a block at most */
#define MAX_SLICES 3
#define MAX_RANK 512

typedef float vfloat __attribute__((vector_size(VEC * sizeof(float)), aligned(sizeof(float))));
typedef uint32_t vbits __attribute__((vector_size(VEC * sizeof(uint32_t)), aligned(4)));
typedef uint16_t vhalf __attribute__((vector_size(VEC * sizeof(uint16_t)), aligned(2)));

static inline vfloat vload(const float *p) { return *(const vfloat *)p; }

/* o[0 .. VEC) (bfloat16 bits) += sum, rounded as `float_to_bf16` rounds */
static inline void add_bf16(uint16_t *o, vfloat sum) {
    vfloat f = (vfloat)(__builtin_convertvector(*(vhalf *)o, vbits) << 16) + sum;
    vbits u = (vbits)f;
    vbits nan = (vbits)((u & 0x7fffffffu) > 0x7f800000u); /* all ones where f is NaN */
    vbits rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vbits bits = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    *(vhalf *)o = __builtin_convertvector(bits, vhalf);
}

/* acc[j][v] = sum over i < depth of lhs[j][i] * rhs[i][col + v*VEC], for `vecs` vectors of
   columns; lhs rows `lhs_stride` apart, rhs rows `rhs_stride` apart */
static inline __attribute__((always_inline)) void block_product(
    const float *lhs, int64_t lhs_stride, const float *rhs, int64_t rhs_stride, int64_t depth,
    int vecs, vfloat acc[ROWS][BLOCK]) {
    for (int j = 0; j < ROWS; j++)
        for (int v = 0; v < vecs; v++) acc[j][v] = (vfloat){0};
    for (int64_t i = 0; i < depth; i++) {
        vfloat w[BLOCK];
        for (int v = 0; v < vecs; v++) w[v] = vload(rhs + i * rhs_stride + v * VEC);
        for (int j = 0; j < ROWS; j++) {
            float s = lhs[j * lhs_stride + i];
            for (int v = 0; v < vecs; v++) acc[j][v] += s * w[v];
        }
    }
}

/* h[j][q .. q + vecs*VEC) = x_j . A[q ..] */
static inline __attribute__((always_inline)) void shrink_block(const float *xf, int64_t k,
                                                               const float *at, int64_t n_rank,
                                                               int64_t q, int vecs, float *h) {
    vfloat acc[ROWS][BLOCK];
    block_product(xf, k, at + q, n_rank, k, vecs, acc);
    for (int j = 0; j < ROWS; j++)
        for (int v = 0; v < vecs; v++)
            memcpy(h + j * n_rank + q + v * VEC, &acc[j][v], sizeof(vfloat));
}

/* h[j][q] = x_j . A[q] for every q < n_rank */
static void shrink(const float *xf, int64_t k, const float *at, int64_t n_rank, float *h) {
    int64_t q = 0;
    for (; q + BLOCK * VEC <= n_rank; q += BLOCK * VEC)
        shrink_block(xf, k, at, n_rank, q, BLOCK, h);
    if (q + 2 * VEC <= n_rank) shrink_block(xf, k, at, n_rank, q, 2, h), q += 2 * VEC;
    if (q + VEC <= n_rank) shrink_block(xf, k, at, n_rank, q, 1, h), q += VEC;
    for (; q < n_rank; q++)
        for (int j = 0; j < ROWS; j++) {
            float s = 0.0f;
            for (int64_t i = 0; i < k; i++) s += xf[j * k + i] * at[i * n_rank + q];
            h[j * n_rank + q] = s;
        }
}

/* out rows += their sums over columns [c, c + width) */
static void add_to_rows(const float *sums, int64_t sums_stride, int64_t width, int64_t c,
                        const int64_t *rows, int count, int64_t n, uint16_t *out) {
    for (int j = 0; j < count; j++) {
        uint16_t *o = out + rows[j] * n + c;
        const float *s = sums + j * sums_stride;
        for (int64_t i = 0; i < width; i++) o[i] = float_to_bf16(bf16_to_float(o[i]) + s[i]);
    }
}

/* out rows += h's slice ranks times BT over each slice's columns */
static void expand(const float *h, int64_t n_rank, const float *bt, int64_t rank,
                   const int64_t *slice_ends, int64_t slices, int64_t n, const int64_t *rows,
                   int count, uint16_t *out) {
    vfloat acc[ROWS][BLOCK];
    float sums[ROWS];
    for (int64_t s = 0, start = 0; s < slices; start = slice_ends[s], s++) {
        const float *hs = h + s * rank;
        int64_t c = start, end = slice_ends[s];
        for (; c + BLOCK * VEC <= end; c += BLOCK * VEC) {
            block_product(hs, n_rank, bt + c, n, rank, BLOCK, acc);
            for (int j = 0; j < count; j++)
                for (int v = 0; v < BLOCK; v++)
                    add_bf16(out + rows[j] * n + c + v * VEC, acc[j][v]);
        }
        for (; c + VEC <= end; c += VEC) {
            block_product(hs, n_rank, bt + c, n, rank, 1, acc);
            for (int j = 0; j < count; j++) add_bf16(out + rows[j] * n + c, acc[j][0]);
        }
        for (; c < end; c++) {
            for (int j = 0; j < count; j++) {
                float sum = 0.0f;
                for (int64_t r = 0; r < rank; r++) sum += hs[j * n_rank + r] * bt[r * n + c];
                sums[j] = sum;
            }
            add_to_rows(sums, 1, 1, c, rows, count, n, out);
        }
    }
}

/* `count` rows of one slot; `scratch`: ROWS * (k + n_rank) floats */
static void add_group(const uint16_t *x, const int64_t *rows, int count, int64_t k,
                      const float *at, const float *bt, int64_t n_rank, int64_t rank,
                      const int64_t *slice_ends, int64_t slices, int64_t n, uint16_t *out,
                      float *scratch) {
    float *xf = scratch, *h = scratch + ROWS * k;
    for (int j = 0; j < ROWS; j++) {
        const uint16_t *row = x + rows[j < count ? j : 0] * k; /* padding rows: row 0 again */
        for (int64_t i = 0; i < k; i++) xf[j * k + i] = bf16_to_float(row[i]);
    }
    shrink(xf, k, at, n_rank, h);
    expand(h, n_rank, bt, rank, slice_ends, slices, n, rows, count, out);
}

int ember_lora_add(const uint16_t *x, int64_t tokens, int64_t k, const int64_t *token_slots,
                   const float *lora_at, const float *lora_bt, int64_t n_rank, int64_t rank,
                   const int64_t *slice_ends, int64_t slices, int64_t n, uint16_t *out) {
    if (slices < 1 || slices > MAX_SLICES || rank < 1 || rank > MAX_RANK ||
        n_rank != slices * rank || slice_ends[slices - 1] != n)
        return 1;
    /* groups of up to ROWS rows of one slot, in token order */
    int64_t *group_rows = malloc(sizeof(int64_t) * (tokens + 1) * ROWS);
    int64_t *group_count = malloc(sizeof(int64_t) * (tokens + 1));
    if (!group_rows || !group_count) {
        free(group_rows), free(group_count);
        return 2;
    }
    int64_t groups = 0;
    for (int64_t t = 0; t < tokens; t++) {
        if (token_slots[t] < 0) continue;
        int joined = 0;
        for (int64_t g = groups - 1; g >= 0 && g >= groups - 4; g--) {
            int64_t first = group_rows[g * ROWS];
            if (token_slots[first] == token_slots[t] && group_count[g] < ROWS) {
                group_rows[g * ROWS + group_count[g]++] = t;
                joined = 1;
                break;
            }
        }
        if (!joined) {
            group_rows[groups * ROWS] = t;
            group_count[groups++] = 1;
        }
    }
    int failed = 0;
#pragma omp parallel if (groups > 1) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * ROWS * (k + n_rank));
        if (!scratch) failed = 2;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            if (!scratch) continue;
            int64_t slot = token_slots[group_rows[g * ROWS]];
            add_group(x, group_rows + g * ROWS, (int)group_count[g], k, lora_at + slot * k * n_rank,
                      lora_bt + slot * rank * n, n_rank, rank, slice_ends, slices, n, out,
                      scratch);
        }
        free(scratch);
    }
    free(group_rows), free(group_count);
    return failed;
}
