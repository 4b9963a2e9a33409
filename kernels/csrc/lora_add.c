/* LoRA deltas added in place to a linear layer's bfloat16 output on the CPU, each token by its
 * own adapter slot (vLLM's bgmv semantics; `kernels/lora_cpu.py`):
 *
 *   out[t] += ((x[t] @ A[s]^T) @ BT[s]) rounded once to bfloat16,   s = token_slots[t] >= 0
 *
 *   x            [T, K]        bfloat16 bits (the layer's input), rows contiguous
 *   token_slots  [T]           int64, -1: the base model (its row is not touched)
 *   lora_a       [S, nR, K]    float32: slice i's A in rows i*R .. i*R + R - 1 (zero padded)
 *   lora_bt      [S, R, N]     float32, B transposed and scaled: row r holds, over each
 *                              slice's outputs, that slice's column r (B is block-diagonal
 *                              across the slices, so they share the rows without zeros)
 *   slice_ends   [slices]      where each slice's outputs end (q | k | v, gate | up, or one)
 *   out          [T, N]        bfloat16 bits, updated in place
 *
 * Up to TOKENS rows of one slot go together, so each row of A and BT read from cache serves
 * them all; every row keeps its own sums in a fixed order, so a token's result does not depend
 * on the other tokens of the step. Plain C loops that the compiler vectorises for the
 * instruction set it builds for (AVX-512, AVX2, or none); the groups of rows are shared over
 * the OpenMP threads (torch's runtime). Returns 0; 1 when the sizes are out of range (nothing
 * changed: the caller's torch path serves); 2 when memory ran out (rows may be partly updated:
 * the caller must not add the deltas again).
 */
#include <stdint.h>
#include <stdlib.h>

#include "bfloat16.h"

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
/* GCC vectorises with 256-bit registers under -march=native on AVX-512 CPUs unless told; the
   full width took 62 -> 36 us for SmolLM2's q|k|v at 32 tokens (Sapphire Rapids) */
#pragma GCC target("prefer-vector-width=512")
#endif

#define TOKENS 4
#define MAX_SLICES 3
#define MAX_RANK 512

/* `count` rows of one slot; `scratch`: TOKENS * (k + n) floats */
static void add_group(const uint16_t *x, const int64_t *rows, int count, int64_t k,
                      const float *a, const float *bt, int64_t n_rank, int64_t rank,
                      const int64_t *slice_ends, int64_t slices, int64_t n, uint16_t *out,
                      float *scratch) {
    float *xf[TOKENS], *acc[TOKENS];
    float shrunk[TOKENS][MAX_SLICES * MAX_RANK];
    for (int j = 0; j < TOKENS; j++) {
        xf[j] = scratch + j * k;
        acc[j] = scratch + TOKENS * k + j * n;
        const uint16_t *row = x + rows[j < count ? j : 0] * k; /* padding rows: row 0 again */
        for (int64_t i = 0; i < k; i++) xf[j][i] = bf16_to_float(row[i]);
    }
    /* shrink: shrunk[j][r] = x_j . A[r] */
    for (int64_t r = 0; r < n_rank; r++) {
        const float *ar = a + r * k;
        const float *x0 = xf[0], *x1 = xf[1], *x2 = xf[2], *x3 = xf[3];
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            float w = ar[i];
            s0 += x0[i] * w;
            s1 += x1[i] * w;
            s2 += x2[i] * w;
            s3 += x3[i] * w;
        }
        shrunk[0][r] = s0, shrunk[1][r] = s1, shrunk[2][r] = s2, shrunk[3][r] = s3;
    }
    /* expand: acc[j][c] = sum over the slice's R ranks of shrunk[j][r] * BT[r][c] */
    for (int64_t s = 0, start = 0; s < slices; start = slice_ends[s], s++) {
        int64_t end = slice_ends[s];
        float *a0 = acc[0], *a1 = acc[1], *a2 = acc[2], *a3 = acc[3];
        for (int64_t c = start; c < end; c++) a0[c] = a1[c] = a2[c] = a3[c] = 0.0f;
        for (int64_t r = 0; r < rank; r++) {
            const float *br = bt + r * n;
            int64_t q = s * rank + r;
            float c0 = shrunk[0][q], c1 = shrunk[1][q], c2 = shrunk[2][q], c3 = shrunk[3][q];
            for (int64_t c = start; c < end; c++) {
                float w = br[c];
                a0[c] += c0 * w;
                a1[c] += c1 * w;
                a2[c] += c2 * w;
                a3[c] += c3 * w;
            }
        }
    }
    for (int j = 0; j < count; j++) {
        uint16_t *o = out + rows[j] * n;
        for (int64_t c = 0; c < n; c++) o[c] = float_to_bf16(bf16_to_float(o[c]) + acc[j][c]);
    }
}

int ember_lora_add(const uint16_t *x, int64_t tokens, int64_t k, const int64_t *token_slots,
                   const float *lora_a, const float *lora_bt, int64_t n_rank, int64_t rank,
                   const int64_t *slice_ends, int64_t slices, int64_t n, uint16_t *out) {
    if (slices < 1 || slices > MAX_SLICES || rank < 1 || rank > MAX_RANK ||
        n_rank != slices * rank || slice_ends[slices - 1] != n)
        return 1;
    /* groups of up to TOKENS rows of one slot, in token order */
    int64_t *group_rows = malloc(sizeof(int64_t) * (tokens + 1) * TOKENS);
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
            int64_t first = group_rows[g * TOKENS];
            if (token_slots[first] == token_slots[t] && group_count[g] < TOKENS) {
                group_rows[g * TOKENS + group_count[g]++] = t;
                joined = 1;
                break;
            }
        }
        if (!joined) {
            group_rows[groups * TOKENS] = t;
            group_count[groups++] = 1;
        }
    }
    int failed = 0;
#pragma omp parallel if (groups > 1) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * TOKENS * (k + n));
        if (!scratch) failed = 2;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            if (!scratch) continue;
            int64_t slot = token_slots[group_rows[g * TOKENS]];
            add_group(x, group_rows + g * TOKENS, (int)group_count[g], k,
                      lora_a + slot * n_rank * k, lora_bt + slot * rank * n, n_rank, rank,
                      slice_ends, slices, n, out, scratch);
        }
        free(scratch);
    }
    free(group_rows), free(group_count);
    return failed;
}
