/* out = x @ w.T for a weight w [N, K] of 4- or 8-bit groups of 32 laid out in tiles of 16 rows
 * for AVX-512 VNNI (`kernels/tile_matmul.py` builds the layout), with the activations in
 * 15-bit groups. A decode step of a small model multiplies one or a few rows by every weight:
 * the work is unpacking codes and multiply-adding them, and vpdpbusd does 64 byte products
 * into 16 int32 lanes in one instruction, which needs the weights of 16 rows side by side.
 *
 * Tile (16 rows n0..n0+15, group g of 32 columns), in memory one after another, row tile by
 * row tile, each:
 *
 *   4-bit  4 vectors of 64 bytes: vector c, lane j (row n0 + j), byte b holds q[k = 4c + b]
 *          in its low nibble and q[k = 16 + 4c + b] in its high one (q in [0, 15])
 *   8-bit  8 vectors of 64 bytes: vector c, lane j, byte b holds q[k = 4c + b] + 128
 *   then   16 float16 scales and, for 4 bits, 16 float16 offsets (row j's w = q * scale +
 *          offset; 8-bit q in [-127, 127] has none)
 *
 * Each group of 32 values of a row of x becomes dx = max|x| / 16383, qx = round(x / dx), and
 * qx = 128 h + l with h in [-128, 127] and l in [0, 127], two signed bytes for vpdpbusd:
 *
 *   sum(w * x) = scale * dx * (128 sum(q * h) + sum(q * l))  +  offset * dx * sum(qx)
 *
 * (for 8 bits the integer sum takes off 128 sum(qx) for the bytes' + 128 before it becomes a
 * float, so that no large terms cancel).
 * Fifteen bits are finer than the bfloat16 activations of torch's 4-bit kernel (llama.cpp
 * uses eight, which moved greedy choices of SmolLM2 away from float32's). Row tiles are shared
 * over torch's OpenMP threads.
 *
 *   x    [M, K]  float32 or bfloat16 (uint16 bits)
 *   out  [M, N]  float32 or bfloat16 (rounded to nearest even)
 *
 * Returns 0; 1 when this build has neither AVX-512 VNNI nor AVX2 (nothing computed), 2 when K
 * is not a multiple of 32 or N not one of 16, 3 when out of memory.
 *
 * On CPUs with AMX (Sapphire Rapids and later Xeons), the AVX-512 build multiplies batches of
 * 16 rows and more with AMX tiles (`ember_tile_use_amx`, `ember_tile_path`): bfloat16
 * activations with tdpbf16ps, as they are (no 15-bit groups), by the weights dequantised to
 * bfloat16 (a dense bfloat16 copy's values); float32 ones with tdpbusd on the 15-bit groups
 * (the VNNI path's integer sums, so its outputs). On CPUs with AVX-512 BF16 and no AMX (Zen 4,
 * Cooper Lake; or AMX off) bfloat16 batches of 16 rows and more take the same products with
 * vdpbf16ps on vectors (`bf16_vector_matmul`).
 *
 * AVX2 builds (below the AVX-512 ones) read the same tiles as two halves of 8 rows, with the
 * codes widened to int16 for vpmaddwd (vpmaddubsw + vpmaddwd for one row of 4-bit codes), or
 * with AVX-VNNI's 256-bit vpdpbusd where the build has it; `ember_tile_kernel` names the
 * build's path.
 *
 * `ember_tile_dequantize` writes the weight back as a dense [N, K] matrix (q * scale + offset
 * in float32; bfloat16 rounded to nearest even: the values of a bfloat16 copy of the
 * dequantised GGUF weight; or float32 on CPUs without native bfloat16), for batches large
 * enough that torch's dense matmul is the faster one.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "float16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
#define TILE_ROWS 16
#define VNNI_BLOCK 11 /* AVX-512: activation rows that share one unpacked tile (dot_tile_block) */
/* 4-bit: 4 vectors of codes, 16 scales and 16 offsets; 8-bit: 8 vectors and 16 scales */
#define TILE_BYTES(bits) ((bits) == 4 ? 4 * 64 + 64 : 8 * 64 + 32)
/* Groups ahead whose lines are prefetched: a thread streams its row tiles one after another,
   and at one activation row the hardware's prefetch alone left it waiting on memory (SmolLM2's
   gate_up, 30 layers' weights in turn, AVX2, 2 threads: 55.6 -> 39-44 us a call; 2, 4, 6, 8
   and 12 groups ahead measured within noise of each other past 2). */
#define PREFETCH_GROUPS 8
/* Activation rows from which their quantization is shared by the threads too. */
#define QUANTIZE_PARALLEL_ROWS 64

static inline void prefetch_group(const uint8_t *codes, int64_t tile_bytes) {
    for (int64_t line = 0; line < tile_bytes; line += 64)
        __builtin_prefetch(codes + PREFETCH_GROUPS * tile_bytes + line, 0, 3);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include "vector_math.h"

typedef struct {
    int32_t *quads; /* [M, groups, 16]: the group's 8 quads of h bytes, then 8 of l bytes */
    float *scale;   /* [M, groups]: dx */
    float *sum;     /* [M, groups]: dx * sum(qx) */
    int32_t *bias;  /* [M, groups]: 128 sum(qx) (NULL for the AMX path, which needs none) */
} Activations;

static inline __m512 load_row_values(const void *x, int x_bf16, int64_t index) {
    if (x_bf16) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    return _mm512_loadu_ps((const float *)x + index);
}

/* Where row r, group g of the activations is: row-major (the AMX paths, which load a row tile
   of them with a stride), or with the rows of each block of VNNI_BLOCK side by side within a
   group (`blocked`: the VNNI path, which reads a block's rows at fixed offsets from one
   pointer; the rows of the last block are padded). */
static inline int64_t activation_index(int64_t r, int64_t g, int64_t groups, int blocked) {
    return blocked ? (r / VNNI_BLOCK * groups + g) * VNNI_BLOCK + r % VNNI_BLOCK : r * groups + g;
}

static void quantize_activations(const void *x, int x_bf16, int64_t rows, int64_t k,
                                 Activations *a, int unsigned_high, int blocked) {
    const int64_t groups = k / GROUP;
    const __m128i high_flip = _mm_set1_epi8(unsigned_high ? (char)0x80 : 0); /* h + 128 */
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
#pragma omp parallel for schedule(static) if (rows >= QUANTIZE_PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            int64_t first = r * k + g * GROUP;
            __m512 v0 = load_row_values(x, x_bf16, first);
            __m512 v1 = load_row_values(x, x_bf16, first + 16);
            float amax = _mm512_reduce_max_ps(
                _mm512_max_ps(_mm512_and_ps(v0, magnitude), _mm512_and_ps(v1, magnitude)));
            float inverse = amax > 0.0f ? 16383.0f / amax : 0.0f;
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inverse)));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inverse)));
            const int64_t index = activation_index(r, g, groups, blocked);
            int32_t *quads = a->quads + index * 16;
            const __m512i low7 = _mm512_set1_epi32(127);
            _mm_storeu_si128((__m128i *)quads,
                             _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_srai_epi32(q0, 7)), high_flip));
            _mm_storeu_si128((__m128i *)(quads + 4),
                             _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_srai_epi32(q1, 7)), high_flip));
            _mm_storeu_si128((__m128i *)(quads + 8), _mm512_cvtepi32_epi8(_mm512_and_si512(q0, low7)));
            _mm_storeu_si128((__m128i *)(quads + 12), _mm512_cvtepi32_epi8(_mm512_and_si512(q1, low7)));
            float dx = amax / 16383.0f;
            a->scale[index] = dx;
            int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            a->sum[index] = dx * (float)total;
            if (a->bias) a->bias[index] = 128 * total;
        }
    }
}

/* acc [rows, 16] = the products of rows of a block (up to VNNI_BLOCK, a constant once inlined)
   by row tile `tile`. Each code vector is unpacked once for the block, and each row's high and
   low sums (22 for 11 rows) stay in registers over a group, its float sums in `acc` (L1);
   vpdpbusd reads each quad of activation bytes broadcast from memory ({1to16}). The int32 sums
   of a group are exact, so the outputs do not depend on how the rows are blocked.
   SmolLM2's 30 layers (4-bit codes), AMX off, 2 threads of a Sapphire Rapids: 32 rows 22.5 ->
   17.5 ms against 4 rows an unpacked tile with two chains of sums each, 256 rows 162 -> 132 ms;
   blocks of 4 / 6 / 8 / 9 / 10 / 12 rows: 20.4 / 19.2 / 18.4 / 18.0 / 17.9 / 20.2 ms at 32
   rows (12 spill). */
static inline __attribute__((always_inline)) void dpbusd_rows(
    __m512i *high, __m512i *low, const int rows, __m512i codes, const int32_t *quads, int c) {
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
        /* in asm: GCC hoisted the broadcasts of a group into registers and spilled them */
        __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(high[r]) : "v"(codes), "m"(quads[16 * r + c]));
        __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(low[r]) : "v"(codes), "m"(quads[16 * r + 8 + c]));
    }
}

static inline __attribute__((always_inline)) void dot_tile_block(
    const Activations *a, const int rows, int64_t groups, const uint8_t *tile, int bits,
    float *acc) {
    const int vectors = bits == 4 ? 4 : 8;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(acc + 16 * r, _mm512_setzero_ps());
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *codes = tile + g * tile_bytes;
        prefetch_group(codes, tile_bytes);
        const int32_t *quads = a->quads + g * VNNI_BLOCK * 16; /* row r: + 16 r */
        /* the float sums of a block stay in memory: GCC would keep them in registers over the
           groups, and spill the int32 sums instead; a few rows keep them in registers, off a
           chain of store, load and FMAs from one group to the next */
        if (rows > 4) __asm__("" : "+r"(acc));
        /* one row keeps two chains of each (odd quads in high[1], low[1]): one chain of 8
           dependent vpdpbusd a group left it waiting on their latency */
        __m512i high[VNNI_BLOCK + 1], low[VNNI_BLOCK + 1];
        const int second = rows == 1; /* the odd quads' chain */
        for (int r = 0; r < rows + second; r++) high[r] = low[r] = _mm512_setzero_si512();
        if (bits == 4) {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) { /* vector c: quad c in the low nibbles, c + 4 high */
                const __m512i packed = _mm512_loadu_si512(codes + 64 * c);
                const int chain = second && (c & 1);
                dpbusd_rows(high + chain, low + chain, rows, _mm512_and_si512(packed, nibble), quads, c);
                dpbusd_rows(high + chain, low + chain, rows,
                            _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble), quads, c + 4);
            }
        } else {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                const int chain = second && (c & 1);
                dpbusd_rows(high + chain, low + chain, rows, _mm512_loadu_si512(codes + 64 * c), quads, c);
            }
        }
        if (second) high[0] = _mm512_add_epi32(high[0], high[1]), low[0] = _mm512_add_epi32(low[0], low[1]);
        const uint8_t *scales = codes + 64 * vectors;
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
        for (int r = 0; r < rows; r++) {
            __m512i total = _mm512_add_epi32(_mm512_slli_epi32(high[r], 7), low[r]);
            if (bits == 8) total = _mm512_sub_epi32(total, _mm512_set1_epi32(a->bias[g * VNNI_BLOCK + r]));
            const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(total),
                                                 _mm512_set1_ps(a->scale[g * VNNI_BLOCK + r]));
            _mm512_storeu_ps(acc + 16 * r, _mm512_fmadd_ps(product, scale, _mm512_loadu_ps(acc + 16 * r)));
        }
        if (bits == 4) {
            const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32)));
            for (int r = 0; r < rows; r++)
                _mm512_storeu_ps(acc + 16 * r, _mm512_fmadd_ps(offset, _mm512_set1_ps(a->sum[g * VNNI_BLOCK + r]),
                                                               _mm512_loadu_ps(acc + 16 * r)));
        }
    }
}

static inline void store_row(void *out, int out_bf16, int64_t index, __m512 values) {
    if (out_bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), bf16_from_ps(values));
    else
        _mm512_storeu_ps((float *)out + index, values);
}

#if defined(__AVX512BF16__)
/* What the bfloat16 paths share (AVX-512 BF16: Zen 4, Cooper Lake, Sapphire Rapids): a row
   tile's groups dequantised to bfloat16, in the pairs that vdpbf16ps and tdpbf16ps take. */

/* Activation bytes a task of the bfloat16 paths multiplies by one row tile, at most: they stay
   in L2 while the thread's row tiles pass (their weights dequantised once a task). All the
   rows of a call in one task read them again from memory for each row tile (AMX: SmolLM2's 30
   layers at 2048 rows, 2 threads, 563 ms against 223 for dense bfloat16 copies; spans of 256
   rows 334 ms). */
#define SPAN_BYTES (1 << 20)

/* 1 + q / 16 in float32 for the 4-bit code at bits [bit, bit + 4) of each 32-bit lane (the
   code moved into the top of the mantissa of 1.0f), and 1 + u / 256 for a byte u. */
#define FRACTION_4(packed, bit)                                                            \
    _mm512_castsi512_ps(_mm512_ternarylogic_epi32(                                         \
        (bit) <= 19 ? _mm512_slli_epi32(packed, 19 - (bit)) : _mm512_srli_epi32(packed, (bit) - 19), \
        _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3f800000), 0xea))
#define FRACTION_8(packed, bit)                                                            \
    _mm512_castsi512_ps(_mm512_ternarylogic_epi32(                                         \
        (bit) <= 15 ? _mm512_slli_epi32(packed, 15 - (bit)) : _mm512_srli_epi32(packed, (bit) - 15), \
        _mm512_set1_epi32(0x007f8000), _mm512_set1_epi32(0x3f800000), 0xea))

/* Two k's weights of 16 columns (float32, lane = column) as a B tile row: bfloat16 pairs,
   rounded to nearest even. */
static inline void store_weight_pair(uint8_t *row, __m512 even, __m512 odd) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                                 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                                 18, 2, 17, 1, 16, 0);
    const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* even's 16, then odd's */
    _mm512_store_si512(row, _mm512_permutexvar_epi16(interleave, words));
}

/* A group's weights of 16 columns as a B tile (`buffer`, 16 rows of 64 bytes: row p holds k =
   2p and 2p + 1 of each column), each q * scale + offset (8 bits: (u - 128) * scale for the
   stored u = q + 128). With f = 1 + q / 16 that is f * 16 scale + (offset - 16 scale), one FMA
   whose product and sum are exact before its one rounding: the float32 of the dense copy
   (offset - 16 scale is itself exact while the two are within 2^12 of each other; 8 bits:
   f = 1 + u / 256, f * 256 scale - 384 scale).
   Vector c of the tile holds k = 4c + b in byte b of each column's lane (4 bits: k = 4c + b
   in the low nibble and 16 + 4c + b in the high one). */
static inline __attribute__((always_inline)) void bf16_weights(const uint8_t *codes, int bits,
                                                                uint8_t *buffer) {
    const uint8_t *halves = codes + 64 * (bits == 4 ? 4 : 8);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)halves));
    if (bits == 4) {
        const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(halves + 32)));
        const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(16.0f));
        const __m512 base = _mm512_sub_ps(offset, step);
        for (int c = 0; c < 4; c++) {
            const __m512i packed = _mm512_loadu_si512(codes + 64 * c);
#define NIBBLE_WEIGHT(bit) _mm512_fmadd_ps(FRACTION_4(packed, bit), step, base)
            /* low nibbles: k = 4c .. 4c + 3, rows 2c and 2c + 1; high: k + 16, rows + 8 */
            store_weight_pair(buffer + 64 * (2 * c), NIBBLE_WEIGHT(0), NIBBLE_WEIGHT(8));
            store_weight_pair(buffer + 64 * (2 * c + 1), NIBBLE_WEIGHT(16), NIBBLE_WEIGHT(24));
            store_weight_pair(buffer + 64 * (2 * c + 8), NIBBLE_WEIGHT(4), NIBBLE_WEIGHT(12));
            store_weight_pair(buffer + 64 * (2 * c + 9), NIBBLE_WEIGHT(20), NIBBLE_WEIGHT(28));
#undef NIBBLE_WEIGHT
        }
    } else {
        const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(256.0f));
        const __m512 base = _mm512_mul_ps(scale, _mm512_set1_ps(-384.0f));
        for (int c = 0; c < 8; c++) {
            const __m512i packed = _mm512_loadu_si512(codes + 64 * c);
#define BYTE_WEIGHT(bit) _mm512_fmadd_ps(FRACTION_8(packed, bit), step, base)
            store_weight_pair(buffer + 64 * (2 * c), BYTE_WEIGHT(0), BYTE_WEIGHT(8));
            store_weight_pair(buffer + 64 * (2 * c + 1), BYTE_WEIGHT(16), BYTE_WEIGHT(24));
#undef BYTE_WEIGHT
        }
    }
}

/* bfloat16 x by the weights dequantised to bfloat16 with AVX-512 BF16's vdpbf16ps, on CPUs
   without AMX (Zen 4, Cooper Lake; or AMX turned off): the products of the AMX-BF16 path, 16
   columns a vector, a block's sums in registers over all of K. Each group's 16 x 16 sums of
   the VNNI path were scaled and added to float sums row by row, and the activations
   quantized first; here the weights are dequantised once a task for all its rows, and each
   row's sum is one chain of vdpbf16ps over the pairs in order, whatever the block (a row's
   output does not depend on the batch it is in).
   SmolLM2's four layer shapes x 30 distinct layers, 2 threads of a Zen 4 (vdpbf16ps 1 a cycle
   there, 233 GMAC/s on 2 cores at 3.64 GHz): 16 rows 15.9 -> 14.3 ms against the VNNI path,
   32 rows 28.8 -> 22.7, 64 rows 46.6 -> 37.8 (about 4 ms of each the dequantisation); 2048
   rows 1043 ms, about 210 GMAC/s, where oneDNN on dense bfloat16 copies took 1058. */
#define BF16_BLOCK 16 /* rows whose sums stay in registers */
/* Activation rows from which bfloat16 x takes this path, as AMX_MIN_ROWS (fewer keep the VNNI
   path's exact weights; below 16 rows it was not measured, and a task's dequantisation is
   shared by fewer rows there). */
#define BF16_MIN_ROWS 16

static int bf16_vectors_on = 1;

/* `ember_tile_use_bf16_vectors(0)` turns this path off (the tests compare both). */
int ember_tile_use_bf16_vectors(int enabled) {
    __atomic_store_n(&bf16_vectors_on, enabled != 0, __ATOMIC_RELEASE);
    return enabled != 0;
}

/* acc[r] += the products of row r of a block of x by weight pairs [p0, p1) of `weights` (64
   bytes a pair: 16 columns' bfloat16 pairs), for `rows` rows (a constant once inlined); the
   block's x is laid out pair by pair (pair p of its rows side by side, `rows` x 4 bytes), so
   that vdpbf16ps reads each broadcast from one pointer at a constant offset. */
static inline __attribute__((always_inline)) void bf16_dot_pairs(
    const uint32_t *x, const int rows, const uint8_t *weights, int64_t p0, int64_t p1,
    __m512 *acc) {
    const uint32_t *pair = x + p0 * rows;
    for (int64_t p = p0; p < p1; p++, pair += rows) {
        const __m512 w = _mm512_castsi512_ps(_mm512_load_si512(weights + 64 * p));
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++)
            /* in asm: GCC would hoist the broadcasts and spill them */
            __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc[r]) : "v"(w), "m"(pair[r]));
    }
}

/* out rows of one block (row stride n_cols, from element `first`) for the 16 columns of row
   tile `tile`, the block's x pair by pair (bf16_dot_pairs). With `dequantise`, each group is
   first dequantised into `weights` (groups x 1 KB), one group ahead of its products; the
   blocks after the first reuse them. */
static inline __attribute__((always_inline)) void bf16_block(
    const uint32_t *x, const int rows, int64_t groups, const uint8_t *tile, int bits,
    uint8_t *weights, int dequantise, void *out, int out_bf16, int64_t n_cols, int64_t first) {
    const int64_t tile_bytes = TILE_BYTES(bits);
    __m512 acc[BF16_BLOCK];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    if (dequantise) {
        bf16_weights(tile, bits, weights);
        for (int64_t g = 0; g < groups; g++) {
            if (g + 1 < groups) {
                prefetch_group(tile + (g + 1) * tile_bytes, tile_bytes);
                bf16_weights(tile + (g + 1) * tile_bytes, bits, weights + (g + 1) * 1024);
            }
            bf16_dot_pairs(x, rows, weights, 16 * g, 16 * g + 16, acc);
        }
    } else {
        bf16_dot_pairs(x, rows, weights, 0, 16 * groups, acc);
    }
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) store_row(out, out_bf16, first + r * n_cols, acc[r]);
}

/* Rows of block b of the m_rows: blocks of up to BF16_BLOCK rows, as even as they go (8 to
   16 rows from 16 on), so that a block's chains of sums cover vdpbf16ps' latency. */
static inline int64_t bf16_block_start(int64_t b, int64_t blocks, int64_t m_rows) {
    return b * (m_rows / blocks) + (b < m_rows % blocks ? b : m_rows % blocks);
}

/* ember_tile_matmul of bfloat16 x by vdpbf16ps: x laid out block by block, pair by pair; then
   tasks of (a span of blocks, a row tile) shared by the threads, each with its own buffer of
   dequantised groups. */
static int bf16_vector_matmul(const uint16_t *x, int64_t m_rows, int64_t k, const uint8_t *tiles,
                              int bits, int64_t n_cols, void *out, int out_bf16) {
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS, pairs = k / 2;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const int64_t blocks = (m_rows + BF16_BLOCK - 1) / BF16_BLOCK;
    const int64_t spans = (2 * k * m_rows + SPAN_BYTES - 1) / SPAN_BYTES;
    const int64_t span_blocks = (blocks + spans - 1) / spans;
    const uint32_t *rows_x = (const uint32_t *)x; /* row r's pair p at r * pairs + p */
    uint32_t *blocked = aligned_alloc(64, (size_t)((m_rows * pairs * 4 + 63) / 64 * 64));
    if (!blocked) return 3;
    int failed = 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t r0 = bf16_block_start(b, blocks, m_rows);
            const int64_t rows = bf16_block_start(b + 1, blocks, m_rows) - r0;
            uint32_t *block = blocked + r0 * pairs;
            for (int64_t p = 0; p < pairs; p++)
                for (int64_t r = 0; r < rows; r++) block[p * rows + r] = rows_x[(r0 + r) * pairs + p];
        }
        uint8_t *weights = aligned_alloc(64, (size_t)(groups * 1024));
        if (!weights) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < spans; s++)
        for (int64_t t = 0; t < row_tiles; t++) {
            if (!weights || s * span_blocks >= blocks) continue;
            const int64_t last = (s + 1) * span_blocks < blocks ? (s + 1) * span_blocks : blocks;
            const uint8_t *tile = tiles + t * groups * tile_bytes;
            for (int64_t b = s * span_blocks; b < last; b++) {
                const int64_t r0 = bf16_block_start(b, blocks, m_rows);
                const int64_t rows = bf16_block_start(b + 1, blocks, m_rows) - r0;
                const uint32_t *block = blocked + r0 * pairs;
                const int64_t first = r0 * n_cols + t * TILE_ROWS;
                const int dequantise = b == s * span_blocks;
                switch (rows * 2 + (bits == 8)) {
#define BF16_CASE(n)                                                                       \
    case 2 * n:                                                                            \
        bf16_block(block, n, groups, tile, 4, weights, dequantise, out, out_bf16, n_cols, first); \
        break;                                                                             \
    case 2 * n + 1:                                                                        \
        bf16_block(block, n, groups, tile, 8, weights, dequantise, out, out_bf16, n_cols, first); \
        break;
                    BF16_CASE(1) BF16_CASE(2) BF16_CASE(3) BF16_CASE(4) BF16_CASE(5)
                    BF16_CASE(6) BF16_CASE(7) BF16_CASE(8) BF16_CASE(9) BF16_CASE(10)
                    BF16_CASE(11) BF16_CASE(12) BF16_CASE(13) BF16_CASE(14) BF16_CASE(15)
                    BF16_CASE(16)
#undef BF16_CASE
                }
            }
        }
        free(weights);
    }
    free(blocked);
    return failed ? 3 : 0;
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include "amx.h"

/* AMX (Sapphire Rapids and later Xeons): tdpbusd multiplies a tile of 16 activation rows of 32
   bytes (A, unsigned) by a tile of 8 rows of 64 bytes (B, signed: for each of 16 columns the 4
   bytes of a quad, which is a vector of the VNNI tiles once its nibbles are unpacked) into
   16 x 16 int32 sums: 8192 byte products an instruction. The activations go in as A, so their
   high bytes are made unsigned (h + 128, the sign bit flipped) and the weight codes signed
   (4-bit codes already are; 8-bit ones drop their + 128), and the sums of high bytes lose
   128 sum(q) again: the int32 totals of the VNNI path, so its outputs. Each group's sums are
   read back and scaled as dot_tile scales them. */
#define AMX_ROWS 16
#define AMX_MIN_ROWS 16 /* fewer activation rows take the VNNI path */
/* `ember_tile_use_amx(0)` turns the tiles off (the tests compare both paths). */
int ember_tile_use_amx(int enabled) { return amx_enable(enabled); }

static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 4; t++) { /* 0, 1: sums of high and low bytes; 2, 3: those bytes */
        config.rows[t] = AMX_ROWS;
        config.bytes_per_row[t] = t < 2 ? 64 : GROUP;
    }
    for (int t = 5; t < 7; t++) { /* 5, 6: as 0 and 1, for the other group of a pair */
        config.rows[t] = AMX_ROWS;
        config.bytes_per_row[t] = 64;
    }
    for (int t = 4; t < 8; t += 3) { /* 4, 7: a group's codes, 8 quads of 16 columns */
        config.rows[t] = GROUP / 4;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* The 8 quads of a group's codes as signed bytes for a B tile (`buffer`, 8 rows of 64 bytes),
   and 128 sum(q) of each column over the group. */
static inline __m512i amx_codes(const uint8_t *codes, int bits, uint8_t *buffer) {
    const __m512i nibble = _mm512_set1_epi8(0x0f), sign_bit = _mm512_set1_epi8((char)0x80);
    __m512i code_sum = _mm512_setzero_si512();
    for (int c = 0; c < 8; c++) {
        __m512i w;
        if (bits == 4) {
            const __m512i packed = _mm512_loadu_si512(codes + 64 * (c & 3));
            w = c < 4 ? _mm512_and_si512(packed, nibble)
                      : _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        } else {
            w = _mm512_xor_si512(_mm512_loadu_si512(codes + 64 * c), sign_bit);
        }
        _mm512_store_si512(buffer + 64 * c, w);
        code_sum = _mm512_dpbusd_epi32(code_sum, _mm512_set1_epi8(1), w);
    }
    return _mm512_slli_epi32(code_sum, 7);
}

/* acc[r] += group g's products for rows r0 .. r0 + rows, from the tiles' int32 sums of high
   and low bytes, as dot_tile scales its totals. */
static inline __attribute__((always_inline)) void amx_scale_group(
    const Activations *a, int64_t r0, int rows, int64_t groups, int64_t g, const uint8_t *codes,
    int bits, const int32_t *high, const int32_t *low, __m512i correction, __m512 *acc) {
    const uint8_t *scales = codes + 64 * (bits == 4 ? 4 : 8);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
    const __m512 offset = bits == 4
        ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32)))
        : _mm512_setzero_ps();
    for (int r = 0; r < AMX_ROWS; r++) {
        if (r >= rows) break;
        const int64_t row = r0 + r;
        const __m512i total = _mm512_add_epi32(
            _mm512_slli_epi32(_mm512_sub_epi32(_mm512_load_si512(high + 16 * r), correction), 7),
            _mm512_load_si512(low + 16 * r));
        const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(total),
                                             _mm512_set1_ps(a->scale[row * groups + g]));
        acc[r] = _mm512_fmadd_ps(product, scale, acc[r]);
        if (bits == 4)
            acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(a->sum[row * groups + g]), acc[r]);
    }
}

/* Group g's int32 sums into tiles HIGH and LOW (then memory), its codes in tile CODES: two
   sets of tile numbers, so that one group's products run while the other's are scaled. */
#define AMX_GROUP_PRODUCTS(HIGH, LOW, CODES, buffer, g, high, low)                             \
    do {                                                                                       \
        const uint8_t *row_quads = (const uint8_t *)(a->quads + (r0 * groups + (g)) * 16);    \
        _tile_zero(HIGH);                                                                      \
        _tile_zero(LOW);                                                                       \
        _tile_loadd(CODES, buffer, 64);                                                        \
        _tile_loadd(2, row_quads, stride);                                                     \
        _tile_dpbusd(HIGH, 2, CODES);                                                          \
        _tile_loadd(3, row_quads + GROUP, stride);                                             \
        _tile_dpbusd(LOW, 3, CODES);                                                           \
        _tile_stored(HIGH, high, 64);                                                          \
        _tile_stored(LOW, low, 64);                                                            \
    } while (0)

/* out rows r0 .. r0 + rows of the 16 columns of row tile `tile` (at `column`); a->quads holds
   whole blocks of 16 rows (zero past m_rows). Groups go in pairs. */
static void amx_block(const Activations *a, int64_t r0, int rows, int64_t groups,
                      const uint8_t *tile, int bits, void *out, int out_bf16, int64_t n_cols,
                      int64_t column) {
    const int64_t tile_bytes = TILE_BYTES(bits);
    uint8_t codes_buffer[2][8 * 64] __attribute__((aligned(64)));
    int32_t high[2][AMX_ROWS * 16] __attribute__((aligned(64)));
    int32_t low[2][AMX_ROWS * 16] __attribute__((aligned(64)));
    __m512 acc[AMX_ROWS];
    for (int r = 0; r < AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
    const int64_t stride = groups * 64; /* bytes from one activation row's quads to the next */
    for (int64_t g = 0; g < groups; g += 2) {
        const uint8_t *codes = tile + g * tile_bytes;
        prefetch_group(codes, tile_bytes);
        const int pair = g + 1 < groups;
        const __m512i correction0 = amx_codes(codes, bits, codes_buffer[0]);
        AMX_GROUP_PRODUCTS(0, 1, 4, codes_buffer[0], g, high[0], low[0]);
        __m512i correction1 = _mm512_setzero_si512();
        if (pair) {
            prefetch_group(codes + tile_bytes, tile_bytes);
            correction1 = amx_codes(codes + tile_bytes, bits, codes_buffer[1]);
            AMX_GROUP_PRODUCTS(5, 6, 7, codes_buffer[1], g + 1, high[1], low[1]);
        }
        amx_scale_group(a, r0, rows, groups, g, codes, bits, high[0], low[0], correction0, acc);
        if (pair)
            amx_scale_group(a, r0, rows, groups, g + 1, codes + tile_bytes, bits, high[1], low[1],
                            correction1, acc);
    }
    for (int r = 0; r < rows; r++) store_row(out, out_bf16, (r0 + r) * n_cols + column, acc[r]);
}

/* 4- and 8-bit weights times bfloat16 activations (a decode step's) with AMX-BF16's tdpbf16ps,
   which multiplies a tile of 16 rows of 32 bfloat16 activations (A: a group, read in place from
   x) by 16 rows of 16 pairs (B: the group's weights for 16 columns) into 16 x 16 float32 sums.
   The weights go in dequantised, q * scale + offset rounded to bfloat16 (the values of a
   bfloat16 copy of the dequantised GGUF weight, which larger batches multiply by), so the
   tiles sum a row's products over all its groups and are read back once. (Exact codes, with
   each group's sums read back and scaled, spent most of a decode step's matmul time on those
   scalings: SmolLM2's 30 layers at 32 rows, 2 threads, 12.0 ms against 9.3-10.2 now.) */
static void configure_bf16_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; t++) { /* 0-3: float32 sums of 4 blocks; 4, 5: weights; 6, 7: x */
        config.rows[t] = AMX_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* Row blocks of 16 whose sums stay in tiles (0 to 3) while a row tile's groups pass. */
#define AMX_BLOCKS 4

/* Block b's products of the weights in tile W into sums tile C, its x (the group's first
   element of the block's first row at block_x[b] + x_offset) loaded into tile A. */
#define BF16_DOT(C, A, W, b)                                                           \
    do {                                                                               \
        _tile_loadd(A, block_x[b] + x_offset, row_bytes);                              \
        _tile_dpbf16ps(C, A, W);                                                       \
    } while (0)
/* A group's products (weights in tile W; odd_group a constant): each tdpbf16ps waits for the
   one before it on the same sums, so one or two blocks spread their groups over all four sum
   tiles (a chunk of one block: 4 chains, by the group's place in 4; two blocks: 2 each, by its
   pair's parity), and x goes to tiles 6 and 7 in turn. */
#define BF16_PRODUCTS(W, odd_group)                                                    \
    do {                                                                               \
        if (blocks == 1) {                                                             \
            if (odd_pair) {                                                            \
                if (odd_group) BF16_DOT(3, 7, W, 0);                                   \
                else BF16_DOT(2, 6, W, 0);                                             \
            } else {                                                                   \
                if (odd_group) BF16_DOT(1, 7, W, 0);                                   \
                else BF16_DOT(0, 6, W, 0);                                             \
            }                                                                          \
        } else if (blocks == 2) {                                                      \
            if (odd_pair) {                                                            \
                BF16_DOT(2, 6, W, 0);                                                  \
                BF16_DOT(3, 7, W, 1);                                                  \
            } else {                                                                   \
                BF16_DOT(0, 6, W, 0);                                                  \
                BF16_DOT(1, 7, W, 1);                                                  \
            }                                                                          \
        } else {                                                                       \
            BF16_DOT(0, 6, W, 0);                                                      \
            BF16_DOT(1, 7, W, 1);                                                      \
            BF16_DOT(2, 6, W, 2);                                                      \
            if (blocks > 3) BF16_DOT(3, 7, W, 3);                                      \
        }                                                                              \
    } while (0)

/* A chunk's start: where each of its blocks' x is (x, row_bytes apart, for the chunk at row r0;
   a last block of fewer than 16 rows of the m_rows at `tail`), and its sums tiles zeroed. */
static inline void start_chunk(const uint16_t *x, const uint16_t *tail, int64_t row_bytes,
                               int64_t m_rows, int64_t r0, int64_t blocks,
                               const uint8_t **block_x) {
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r = r0 + b * AMX_ROWS;
        block_x[b] = r + AMX_ROWS > m_rows ? (const uint8_t *)tail
                                           : (const uint8_t *)(x + r * (row_bytes / 2));
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* m_rows rows of out (row stride n_cols, the first at element `first`) for the 16 columns of
   row tile `tile`, x row_bytes apart; a last block of fewer than 16 rows is read from `tail`
   instead (those rows, then zeros; same stride). The row tile's
   groups are dequantised into `weights` (groups x 1 KB) during the first chunk of up to
   AMX_BLOCKS blocks, while that chunk's products run, and reused by the chunks after it. */
static inline __attribute__((always_inline)) void amx_bf16_rows(
    const uint16_t *x, const uint16_t *tail, int64_t row_bytes, int64_t m_rows, int64_t groups,
    const uint8_t *tile, int bits, uint8_t *weights, void *out, int out_bf16, int64_t n_cols,
    int64_t first) {
    const int64_t tile_bytes = TILE_BYTES(bits);
    float sums[AMX_BLOCKS * AMX_ROWS * 16] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < m_rows; r0 += AMX_BLOCKS * AMX_ROWS) {
        const int64_t rows = m_rows - r0 < AMX_BLOCKS * AMX_ROWS ? m_rows - r0 : AMX_BLOCKS * AMX_ROWS;
        const int64_t blocks = (rows + AMX_ROWS - 1) / AMX_ROWS;
        const int first_chunk = r0 == 0;
        const uint8_t *block_x[AMX_BLOCKS];
        start_chunk(x, tail, row_bytes, m_rows, r0, blocks, block_x);
        if (first_chunk) /* the first pair; each pair's products then run after the next */
            for (int64_t g = 0; g < 2 && g < groups; g++) {
                prefetch_group(tile + g * tile_bytes, tile_bytes);
                bf16_weights(tile + g * tile_bytes, bits, weights + g * 1024);
            }
        for (int64_t g = 0; g < groups; g += 2) {
            /* pair g / 2 + 1 dequantised first: a tile load waits for the stores it reads
               to reach the cache, and by the next pair they have */
            for (int64_t next = g + 2; first_chunk && next < g + 4 && next < groups; next++) {
                prefetch_group(tile + next * tile_bytes, tile_bytes);
                bf16_weights(tile + next * tile_bytes, bits, weights + next * 1024);
            }
            int64_t x_offset = 2 * GROUP * g; /* bytes */
            const int odd_pair = (g / 2) % 2;
            _tile_loadd(4, weights + g * 1024, 64);
            BF16_PRODUCTS(4, 0);
            if (g + 1 < groups) {
                x_offset += 2 * GROUP;
                _tile_loadd(5, weights + (g + 1) * 1024, 64);
                BF16_PRODUCTS(5, 1);
            }
        }
        _tile_stored(0, sums, 64);
        _tile_stored(1, sums + 256, 64);
        _tile_stored(2, sums + 512, 64);
        _tile_stored(3, sums + 768, 64);
        for (int64_t r = 0; r < rows; r++) {
            __m512 row = _mm512_load_ps(sums + 16 * r);
            if (blocks == 1) /* the other chains of the one block */
                row = _mm512_add_ps(_mm512_add_ps(row, _mm512_load_ps(sums + 256 + 16 * r)),
                                    _mm512_add_ps(_mm512_load_ps(sums + 512 + 16 * r),
                                                  _mm512_load_ps(sums + 768 + 16 * r)));
            else if (blocks == 2) /* block r / 16's other chain, two tiles on */
                row = _mm512_add_ps(row, _mm512_load_ps(sums + 512 + 16 * r));
            store_row(out, out_bf16, first + (r0 + r) * n_cols, row);
        }
    }
}

/* amx_bf16_rows for two row tiles at once (32 columns from `first`; `weights` holds both
   tiles' groups, the second's from groups x 1 KB on): chunks of two blocks, their four sums in
   tiles 0-3 (block, row tile), so that each A tile of x serves two products and so does each
   B tile (four tile loads for four products, where a row tile alone takes five for four).
   For batches of more than AMX_PAIR_ROWS rows: SmolLM2's 30 layers, 2 threads, 256 rows 43-46
   -> 39 ms, 512 rows 82-88 -> 68-69, 2048 373-383 -> 310-312; 32 rows 10-11 -> 12, 64 rows
   14 -> 17. */
#define AMX_PAIR_ROWS 64
static inline __attribute__((always_inline)) void amx_bf16_rows_pair(
    const uint16_t *x, const uint16_t *tail, int64_t row_bytes, int64_t m_rows, int64_t groups,
    const uint8_t *tile0, const uint8_t *tile1, int bits, uint8_t *weights, void *out,
    int out_bf16, int64_t n_cols, int64_t first) {
    const int64_t tile_bytes = TILE_BYTES(bits);
    uint8_t *weights1 = weights + groups * 1024;
    float sums[4 * AMX_ROWS * 16] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < m_rows; r0 += 2 * AMX_ROWS) {
        const int64_t rows = m_rows - r0 < 2 * AMX_ROWS ? m_rows - r0 : 2 * AMX_ROWS;
        const int64_t blocks = (rows + AMX_ROWS - 1) / AMX_ROWS;
        const int first_chunk = r0 == 0;
        const uint8_t *block_x[2];
        start_chunk(x, tail, row_bytes, m_rows, r0, blocks, block_x);
        if (first_chunk) {
            bf16_weights(tile0, bits, weights);
            bf16_weights(tile1, bits, weights1);
        }
        for (int64_t g = 0; g < groups; g++) {
            if (first_chunk && g + 1 < groups) { /* the next group's, a group ahead */
                prefetch_group(tile0 + (g + 1) * tile_bytes, tile_bytes);
                prefetch_group(tile1 + (g + 1) * tile_bytes, tile_bytes);
                bf16_weights(tile0 + (g + 1) * tile_bytes, bits, weights + (g + 1) * 1024);
                bf16_weights(tile1 + (g + 1) * tile_bytes, bits, weights1 + (g + 1) * 1024);
            }
            const int64_t x_offset = 2 * GROUP * g;
            _tile_loadd(4, weights + g * 1024, 64);
            _tile_loadd(5, weights1 + g * 1024, 64);
            _tile_loadd(6, block_x[0] + x_offset, row_bytes);
            _tile_dpbf16ps(0, 6, 4);
            _tile_dpbf16ps(1, 6, 5);
            if (blocks > 1) {
                _tile_loadd(7, block_x[1] + x_offset, row_bytes);
                _tile_dpbf16ps(2, 7, 4);
                _tile_dpbf16ps(3, 7, 5);
            }
        }
        _tile_stored(0, sums, 64);
        _tile_stored(1, sums + 256, 64);
        _tile_stored(2, sums + 512, 64);
        _tile_stored(3, sums + 768, 64);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t b = r / AMX_ROWS, i = r % AMX_ROWS;
            store_row(out, out_bf16, first + (r0 + r) * n_cols, _mm512_load_ps(sums + 512 * b + 16 * i));
            store_row(out, out_bf16, first + (r0 + r) * n_cols + TILE_ROWS,
                      _mm512_load_ps(sums + 512 * b + 256 + 16 * i));
        }
    }
}


/* ember_tile_matmul of bfloat16 x with AMX-BF16 tiles: tasks of (a span of rows, a row tile or
   a pair of them) shared by the threads; a last block of fewer than 16 rows is copied, padded
   with zeros. */
static int amx_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k, const uint8_t *tiles,
                           int bits, int64_t n_cols, void *out, int out_bf16) {
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const int64_t blocks = (m_rows + AMX_ROWS - 1) / AMX_ROWS, padded = blocks * AMX_ROWS;
    /* spans of whole blocks, as even as they go: static shares of (span, row tile) tasks
       give each thread whole spans when there are as many as threads */
    const int64_t spans = (2 * k * m_rows + SPAN_BYTES - 1) / SPAN_BYTES;
    const int64_t span_rows = (blocks + spans - 1) / spans * AMX_ROWS;
    uint16_t *tail = padded == m_rows ? NULL : calloc((size_t)(AMX_ROWS * k), sizeof(uint16_t));
    if (padded != m_rows && !tail) return 3;
    if (tail)
        memcpy(tail, x + (padded - AMX_ROWS) * k,
               sizeof(uint16_t) * (size_t)((m_rows - (padded - AMX_ROWS)) * k));
    /* row tiles in pairs for larger batches (amx_bf16_rows_pair), where their number is even */
    const int pairs = m_rows > AMX_PAIR_ROWS && row_tiles % 2 == 0;
    int failed = 0;
#pragma omp parallel
    {
        /* two row tiles' groups (one pair of groups more: amx_bf16_rows dequantises a pair at a
           time, the last pair's second never read) */
        uint8_t *weights = aligned_alloc(64, (size_t)((groups + 1) / 2 * 4096));
        if (!weights) {
#pragma omp atomic write
            failed = 1;
        }
        configure_bf16_tiles();
#pragma omp for collapse(2) schedule(static)
        for (int64_t s = 0; s < spans; s++)
        for (int64_t t = 0; t < row_tiles; t += 1 + pairs) {
            if (!weights) continue;
            const int64_t r0 = s * span_rows;
            if (r0 >= m_rows) continue;
            const int64_t rows = m_rows - r0 < span_rows ? m_rows - r0 : span_rows;
            const uint8_t *tile = tiles + t * groups * tile_bytes;
            const int64_t first = r0 * n_cols + t * TILE_ROWS;
            const uint8_t *next = tile + groups * tile_bytes;
            if (pairs && bits == 4)
                amx_bf16_rows_pair(x + r0 * k, tail, 2 * k, rows, groups, tile, next, 4, weights,
                                   out, out_bf16, n_cols, first);
            else if (pairs)
                amx_bf16_rows_pair(x + r0 * k, tail, 2 * k, rows, groups, tile, next, 8, weights,
                                   out, out_bf16, n_cols, first);
            else if (bits == 4)
                amx_bf16_rows(x + r0 * k, tail, 2 * k, rows, groups, tile, 4, weights, out,
                              out_bf16, n_cols, first);
            else
                amx_bf16_rows(x + r0 * k, tail, 2 * k, rows, groups, tile, 8, weights, out,
                              out_bf16, n_cols, first);
        }
        _tile_release();
        free(weights);
    }
    free(tail);
    return failed ? 3 : 0;
}

/* ember_tile_matmul with AMX tiles: tasks of (16 activation rows, row tile) shared by the
   threads, each of which loads the tile configuration once a call. */
static int amx_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const uint8_t *tiles,
                      int bits, int64_t n_cols, void *out, int out_bf16) {
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const int64_t blocks = (m_rows + AMX_ROWS - 1) / AMX_ROWS, padded = blocks * AMX_ROWS;
    Activations a;
    a.quads = calloc(16 * (size_t)(padded * groups), sizeof(int32_t));
    a.scale = malloc(sizeof(float) * (size_t)(m_rows * groups));
    a.sum = malloc(sizeof(float) * (size_t)(m_rows * groups));
    a.bias = NULL; /* the signed codes need no correction for 8 bits */
    if (!a.quads || !a.scale || !a.sum) {
        free(a.quads), free(a.scale), free(a.sum);
        return 3;
    }
    quantize_activations(x, x_bf16, m_rows, k, &a, 1, 0);
#pragma omp parallel
    {
        configure_tiles();
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < blocks; b++)
        for (int64_t t = 0; t < row_tiles; t++) {
            const int64_t r0 = b * AMX_ROWS;
            const int rows = m_rows - r0 < AMX_ROWS ? (int)(m_rows - r0) : AMX_ROWS;
            amx_block(&a, r0, rows, groups, tiles + t * groups * tile_bytes, bits, out, out_bf16,
                      n_cols, t * TILE_ROWS);
        }
        _tile_release();
    }
    free(a.quads), free(a.scale), free(a.sum);
    return 0;
}
#endif

/* The path ember_tile_matmul takes for a call: 2 AMX-BF16 (bfloat16 x, 16 rows and more: the
   activations as they are by the weights rounded to bfloat16), 3 the same products with
   AVX-512 BF16 vectors (bfloat16 x, 16 rows and more, on CPUs without AMX or with it off),
   1 AMX-INT8 (float32 x, 16 rows and more: the VNNI path's outputs), 0 the VNNI path. */
int ember_tile_path(int64_t m_rows, int x_bf16, int bits) {
    (void)bits; /* both widths take every path */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (m_rows >= AMX_MIN_ROWS && amx_ready()) return x_bf16 ? 2 : 1;
#endif
#if defined(__AVX512BF16__)
    if (x_bf16 && m_rows >= BF16_MIN_ROWS && __atomic_load_n(&bf16_vectors_on, __ATOMIC_ACQUIRE))
        return 3;
#endif
    (void)m_rows, (void)x_bf16;
    return 0;
}

int ember_tile_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const uint8_t *tiles,
                      int bits, int64_t n_cols, void *out, int out_bf16) {
    if (k % GROUP || n_cols % TILE_ROWS || (bits != 4 && bits != 8)) return 2;
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const int path = ember_tile_path(m_rows, x_bf16, bits);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (path == 2)
        return amx_bf16_matmul((const uint16_t *)x, m_rows, k, tiles, bits, n_cols, out, out_bf16);
    if (path == 1)
        return amx_matmul(x, x_bf16, m_rows, k, tiles, bits, n_cols, out, out_bf16);
#endif
#if defined(__AVX512BF16__)
    if (path == 3)
        return bf16_vector_matmul((const uint16_t *)x, m_rows, k, tiles, bits, n_cols, out, out_bf16);
#endif
    Activations a;
    const int64_t padded = (m_rows + VNNI_BLOCK - 1) / VNNI_BLOCK * VNNI_BLOCK;
    a.quads = malloc(sizeof(int32_t) * 16 * (size_t)(padded * groups));
    a.scale = malloc(sizeof(float) * (size_t)(padded * groups));
    a.sum = malloc(sizeof(float) * (size_t)(padded * groups));
    a.bias = malloc(sizeof(int32_t) * (size_t)(padded * groups));
    if (!a.quads || !a.scale || !a.sum || !a.bias) {
        free(a.quads), free(a.scale), free(a.sum), free(a.bias);
        return 3;
    }
    quantize_activations(x, x_bf16, m_rows, k, &a, 0, 1);

    /* A task is a row tile, for every block of rows in turn: its codes stay in cache while the
       activations stream past (the threads sharing each block's row tiles instead, so that a
       block's activations stay in L2, measured slower: 1024 rows 605 -> 708 ms). */
#pragma omp parallel for schedule(static) if (row_tiles > 1)
    for (int64_t t = 0; t < row_tiles; t++) {
        const uint8_t *tile = tiles + t * groups * tile_bytes;
        for (int64_t r0 = 0; r0 < m_rows; r0 += VNNI_BLOCK) {
            const int64_t rows = m_rows - r0 < VNNI_BLOCK ? m_rows - r0 : VNNI_BLOCK;
            Activations part = {a.quads + r0 * groups * 16, a.scale + r0 * groups,
                                a.sum + r0 * groups, a.bias + r0 * groups};
            float acc[16 * VNNI_BLOCK];
            switch (rows) {
#define BLOCK_CASE(n) case n: dot_tile_block(&part, n, groups, tile, bits, acc); break;
                BLOCK_CASE(1) BLOCK_CASE(2) BLOCK_CASE(3) BLOCK_CASE(4) BLOCK_CASE(5) BLOCK_CASE(6)
                BLOCK_CASE(7) BLOCK_CASE(8) BLOCK_CASE(9) BLOCK_CASE(10) BLOCK_CASE(11)
                default: dot_tile_block(&part, VNNI_BLOCK, groups, tile, bits, acc); break;
#undef BLOCK_CASE
            }
            for (int64_t r = 0; r < rows; r++)
                store_row(out, out_bf16, (r0 + r) * n_cols + t * TILE_ROWS, _mm512_loadu_ps(acc + 16 * r));
        }
    }
    free(a.quads), free(a.scale), free(a.sum), free(a.bias);
    return 0;
}

/* Row tile t, group g of the tiles, as 16 rows of 32 values at element `first` of out (row
   stride k): bfloat16, or float32 with out_f32. */
static void dequantize_tile(const uint8_t *codes, int bits, int64_t k, void *out, int64_t first,
                            int out_f32) {
    const int vectors = bits == 4 ? 4 : 8;
    uint8_t quads[8][64]; /* quad c (columns 4c..4c+3) of the 16 rows, 4 bytes a row */
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (int c = 0; c < vectors; c++) {
        __m512i packed = _mm512_loadu_si512(codes + 64 * c);
        if (bits == 4) {
            _mm512_storeu_si512(quads[c], _mm512_and_si512(packed, nibble));
            _mm512_storeu_si512(quads[c + 4], _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble));
        } else {
            _mm512_storeu_si512(quads[c], packed);
        }
    }
    const uint16_t *halves = (const uint16_t *)(codes + 64 * vectors);
    for (int j = 0; j < TILE_ROWS; j++) {
        uint32_t row[8];
        for (int c = 0; c < 8; c++) memcpy(&row[c], quads[c] + 4 * j, 4);
        __m256i bytes = _mm256_loadu_si256((const __m256i *)row); /* columns 0..31 in order */
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes)));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1)));
        __m512 scale = _mm512_set1_ps(_cvtsh_ss(halves[j]));
        __m512 offset = bits == 4 ? _mm512_set1_ps(_cvtsh_ss(halves[TILE_ROWS + j]))
                                  : _mm512_set1_ps(0.0f);
        if (bits == 8) {
            low = _mm512_sub_ps(low, _mm512_set1_ps(128.0f));
            high = _mm512_sub_ps(high, _mm512_set1_ps(128.0f));
        }
        store_row(out, !out_f32, first + j * k, _mm512_fmadd_ps(low, scale, offset));
        store_row(out, !out_f32, first + j * k + 16, _mm512_fmadd_ps(high, scale, offset));
    }
}

int ember_tile_matmul_supported(void) { return 1; }

int ember_tile_activation_levels(void) { return 16383; }

const char *ember_tile_kernel(void) { return "avx512-vnni"; }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "vector_math.h"

/* AVX2 (+FMA, F16C): the same tiles, each 64-byte vector read as two halves of 8 rows. Without
   vpdpbusd, the codes are widened to int16 and multiplied by qx itself with vpmaddwd
   (dot_words_block); one activation row of 4-bit codes takes byte products, vpmaddubsw by qx's
   two bytes (dot_row_bytes), as llama.cpp does on these CPUs. vpmaddubsw saturates at 32767
   and takes a signed byte, so qx is rounded on 16256 = 127 * 128 steps instead of 16383: the
   high byte h = qx >> 7 stays in [-127, 127]. Both paths give the same int32 sums, and with
   AVX-VNNI's vpdpbusd (dot_half_tile_vnni) too. */
#define QX_MAX 16256.0f
#define VNNI_ROWS 4  /* activation rows that share one unpacked half tile with AVX-VNNI */
#define VNNI_BLOCK_CHUNKS 16 /* with AVX-VNNI: chunks of rows a block (see ember_tile_matmul) */
#define WORD_ROWS 12 /* without: see dot_words_block */

/* Where row r, group g of the activations is: without AVX-VNNI the rows of each block of
   WORD_ROWS are side by side within a group, so that a block's rows are at fixed offsets from
   one pointer (the rows of the last block are padded to WORD_ROWS). */
#if defined(__AVXVNNI__)
#define ACTIVATION_INDEX(r, g, groups) ((r) * (groups) + (g))
#define PADDED_ROWS(m) (m)
#else
#define ACTIVATION_INDEX(r, g, groups) \
    (((r) / WORD_ROWS * (groups) + (g)) * WORD_ROWS + (r) % WORD_ROWS)
#define PADDED_ROWS(m) (((m) + WORD_ROWS - 1) / WORD_ROWS * WORD_ROWS)
#endif

typedef struct {
    int32_t *quads; /* [M, groups, 16] row-major: the group's 8 quads of h bytes, then 8 of l
                       bytes (with AVX-VNNI, or one row of 4-bit codes; else NULL) */
    float *scale;   /* [M, groups] at ACTIVATION_INDEX: dx */
    float *sum;     /* [M, groups] at ACTIVATION_INDEX: dx * sum(qx) */
    int16_t *words; /* [M, groups, 32] at ACTIVATION_INDEX: qx itself (without AVX-VNNI) */
    int32_t *bias;  /* [M, groups]: 128 sum(qx) (8-bit codes with AVX-VNNI; else NULL) */
} Activations;

static inline __m256 load_row_values(const void *x, int x_bf16, int64_t index) {
    if (x_bf16) {
        __m128i bits = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
    return _mm256_loadu_ps((const float *)x + index);
}

/* 32 int32 lanes (four vectors, in order) -> 32 signed bytes in order (values in [-128, 127]) */
static inline __m256i bytes_of(const __m256i q[4]) {
    __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline int32_t sum_lanes(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}

static void quantize_activations(const void *x, int x_bf16, int64_t rows, int64_t k,
                                 Activations *a) {
    const int64_t groups = k / GROUP;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i low7 = _mm256_set1_epi32(127);
#pragma omp parallel for schedule(static) if (rows >= QUANTIZE_PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = r * k + g * GROUP;
            __m256 v[4];
            __m256 amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = load_row_values(x, x_bf16, first + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
            }
            const float top = reduce_max_ps8(amax);
            const __m256 inverse = _mm256_set1_ps(top > 0.0f ? QX_MAX / top : 0.0f);
            __m256i q[4];
            for (int i = 0; i < 4; i++)
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)); /* nearest even */
            const int64_t index = ACTIVATION_INDEX(r, g, groups);
            if (a->quads) { /* AVX-VNNI, or one row of 4-bit codes: qx's two bytes */
                __m256i high[4], low[4];
                for (int i = 0; i < 4; i++) {
                    high[i] = _mm256_srai_epi32(q[i], 7); /* h in [-127, 127] */
                    low[i] = _mm256_and_si256(q[i], low7); /* l in [0, 127] */
                }
                int8_t *bytes = (int8_t *)(a->quads + (r * groups + g) * 16); /* row-major */
                _mm256_storeu_si256((__m256i *)bytes, bytes_of(high));
                _mm256_storeu_si256((__m256i *)(bytes + GROUP), bytes_of(low));
            }
            const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            const float dx = top / QX_MAX;
            a->scale[index] = dx;
            a->sum[index] = dx * (float)sum_lanes(total);
            if (a->bias) a->bias[index] = 128 * sum_lanes(total);
            if (a->words) { /* qx in order: packs interleaves 128-bit lanes, permute4x64 undoes it */
                int16_t *words = a->words + index * GROUP;
                _mm256_storeu_si256((__m256i *)words,
                                    _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
                _mm256_storeu_si256((__m256i *)(words + 16),
                                    _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
            }
        }
    }
}

#if !defined(__AVXVNNI__)
/* One activation row by 4-bit codes, with byte products: vpmaddubsw of the codes by qx's high
   and low bytes (h = qx >> 7 in [-127, 127], l = qx & 127), whose int16 sums take the group's
   8 quads (at most 8 * 3810) before a vpmaddwd widens them, by 128 for the high bytes. At one
   row nothing shares the words' unpacking (vpshufb, and, shift for every 4 vectors of
   products), and this takes fewer instructions for the same int32 sums (SmolLM2's 30 layers
   at one row, AVX2: 2.1 -> 1.8 ms). */
static void dot_row_bytes(const Activations *a, int64_t groups, const uint8_t *tile, int half,
                          float *acc) {
    const int64_t tile_bytes = TILE_BYTES(4);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1), by128 = _mm256_set1_epi16(128);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *codes = tile + g * tile_bytes;
        if (!half) prefetch_group(codes, tile_bytes);
        const int32_t *q = a->quads + g * 16; /* the group's 8 quads of h bytes, then 8 of l */
        __m256i high = _mm256_setzero_si256(), low = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) { /* vector c: quad c in the low nibbles, c + 4 in the high */
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
            const __m256i w0 = _mm256_and_si256(packed, nibble);
            const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            high = _mm256_add_epi16(high, _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(q[c])),
                                                           _mm256_maddubs_epi16(w1, _mm256_set1_epi32(q[c + 4]))));
            low = _mm256_add_epi16(low, _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(q[8 + c])),
                                                         _mm256_maddubs_epi16(w1, _mm256_set1_epi32(q[12 + c]))));
        }
        const __m256i total = _mm256_add_epi32(_mm256_madd_epi16(high, by128), _mm256_madd_epi16(low, ones));
        const uint8_t *halves = codes + 64 * 4 + 16 * half;
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)halves));
        const __m256 offset = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halves + 32)));
        sum = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(a->scale[g * WORD_ROWS])),
                              scale, sum);
        sum = _mm256_fmadd_ps(offset, _mm256_set1_ps(a->sum[g * WORD_ROWS]), sum);
    }
    _mm256_storeu_ps(acc, sum);
}

/* Without AVX-VNNI, from two rows up: the codes widened to int16 words and multiplied by qx
   itself with vpmaddwd, 16 products an instruction into int32 pairs, where byte products take
   two vpmaddubsw per 32 products and a vpmaddwd to widen their int16 sums. vpshufb spreads each
   32-bit lane (a row's quad of codes, bytes b0..b3) over two vectors of words, (b0, b1) and
   (b2, b3); a 4-bit byte's low nibble is column 4c + b and its high one 16 + 4c + b, so each
   spread vector gives two vectors of code words, and an 8-bit one gives one, less its + 128.
   The activations of a code word vector are then a pair of neighbouring columns (an int32 of
   `words`), broadcast to the 8 rows of the half tile.
   A block of up to WORD_ROWS activation rows shares each code word vector: their int32 sums
   stay in registers over a group (12 sums, the code vector, its spread source and the
   broadcast fill AVX2's 16 registers), their float sums [rows, 8] in `acc` (L1), and their
   words lie side by side (ACTIVATION_INDEX), at fixed offsets from one pointer. The int32 sums
   are those of the byte products (sum(q * qx) = 128 sum(q * h) + sum(q * l)) and the float
   steps the same, so the outputs are the same bits. SmolLM2's 30 layers (4-bit codes) under
   the AVX2 override, 2 threads: 32 rows 43.3 -> 34.0 ms against byte products on 6 rows an
   unpacked half tile, 256 rows 375 -> 271 ms (8-bit codes: 41.2 -> 32.3 ms at 32 rows); 8 and
   10 rows a block measured slower, 14 spill. */
static inline __attribute__((always_inline)) void multiply_words(
    __m256i *sums, const int rows, __m256i codes, const int32_t *pairs) {
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
        __m256i pair; /* vpbroadcastd from memory where it is used: GCC hoisted the broadcasts of
                         a group, spilling them */
        __asm__("vpbroadcastd %1, %0" : "=x"(pair) : "m"(pairs[r * GROUP / 2]));
        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(codes, pair));
        __asm__("" : "+x"(sums[r])); /* in order: GCC reassociated the adds and spilled */
    }
}

static inline __attribute__((always_inline)) void dot_words_block(
    const Activations *a, const int rows, int64_t groups, const uint8_t *tile, int bits,
    int half, float *acc) {
    const int64_t tile_bytes = TILE_BYTES(bits);
    const __m256i front_pair = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                                0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
    const __m256i back_pair = _mm256_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1,
                                               2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1);
    const __m256i nibble = _mm256_set1_epi16(0x0f), by128 = _mm256_set1_epi16(128);
    for (int r = 0; r < rows; r++) _mm256_storeu_ps(acc + 8 * r, _mm256_setzero_ps());
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *codes = tile + g * tile_bytes;
        if (!half) prefetch_group(codes, tile_bytes);
        const int32_t *pairs = (const int32_t *)(a->words + g * WORD_ROWS * GROUP); /* row r: + 16 r */
        /* the float sums of a block stay in memory: GCC would keep them in registers over the
           groups, and spill the int32 sums instead; a few rows keep them in registers, off a
           chain of store, load and FMAs from one group to the next */
        if (rows > 4) __asm__("" : "+r"(acc));
        __m256i sums[WORD_ROWS];
        for (int r = 0; r < rows; r++) sums[r] = _mm256_setzero_si256();
        if (bits == 4) {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
                __m256i spread = _mm256_shuffle_epi8(packed, front_pair); /* columns 4c, 4c + 1 */
                multiply_words(sums, rows, _mm256_and_si256(spread, nibble), pairs + 2 * c);
                multiply_words(sums, rows, _mm256_srli_epi16(spread, 4), pairs + 8 + 2 * c);
                spread = _mm256_shuffle_epi8(packed, back_pair); /* columns 4c + 2, 4c + 3 */
                multiply_words(sums, rows, _mm256_and_si256(spread, nibble), pairs + 2 * c + 1);
                multiply_words(sums, rows, _mm256_srli_epi16(spread, 4), pairs + 9 + 2 * c);
            }
        } else {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
                multiply_words(sums, rows, _mm256_sub_epi16(_mm256_shuffle_epi8(packed, front_pair), by128),
                               pairs + 2 * c);
                multiply_words(sums, rows, _mm256_sub_epi16(_mm256_shuffle_epi8(packed, back_pair), by128),
                               pairs + 2 * c + 1);
            }
        }
        const uint8_t *halves = codes + 64 * (bits == 4 ? 4 : 8) + 16 * half;
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)halves));
        for (int r = 0; r < rows; r++) {
            const __m256 product = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[r]),
                                                 _mm256_set1_ps(a->scale[g * WORD_ROWS + r]));
            _mm256_storeu_ps(acc + 8 * r, _mm256_fmadd_ps(product, scale, _mm256_loadu_ps(acc + 8 * r)));
        }
        if (bits == 4) {
            const __m256 offset = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halves + 32)));
            for (int r = 0; r < rows; r++)
                _mm256_storeu_ps(acc + 8 * r, _mm256_fmadd_ps(offset, _mm256_set1_ps(a->sum[g * WORD_ROWS + r]),
                                                              _mm256_loadu_ps(acc + 8 * r)));
        }
    }
}
#endif

#if defined(__AVXVNNI__)
/* AVX-VNNI (VEX vpdpbusd on 8 lanes: Intel client chips from Alder Lake on, Sierra Forest): a
   quad of byte products is one instruction that also accumulates in int32, as in the AVX-512
   build, in place of vpmaddubsw + add and the group's vpmaddwd. The activations are those of
   the AVX2 path, and the int32 sums are the same, hence the outputs: 4-bit codes take h and l
   as they are; 8-bit codes (q + 128 in the tiles) take off 128 sum(qx). Rows outer within a
   group: the group's code vectors stay unpacked in registers (8), each row keeps two chains. */
static inline __attribute__((always_inline)) void dot_half_tile_vnni(
    const Activations *a, const int rows, int64_t groups, const uint8_t *tile, int bits,
    int half, __m256 *results) {
    const int vectors = bits == 4 ? 4 : 8;
    const int64_t tile_bytes = TILE_BYTES(bits);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    __m256 acc[VNNI_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *codes = tile + g * tile_bytes;
        if (!half) prefetch_group(codes, tile_bytes);
        const uint8_t *halves = codes + 64 * vectors + 16 * half;
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)halves));
        const __m256 offset = bits == 4
            ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halves + 32)))
            : _mm256_setzero_ps();
        __m256i high[VNNI_ROWS], low[VNNI_ROWS];
        for (int r = 0; r < rows; r++) high[r] = low[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i w0, w1;
            if (bits == 4) {
                const __m256i packed =
                    _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
                w0 = _mm256_and_si256(packed, nibble);
                w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            } else {
                w0 = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
                w1 = _mm256_loadu_si256((const __m256i *)(codes + 64 * (c + 4) + 32 * half));
            }
            for (int r = 0; r < rows; r++) {
                const int32_t *quads = a->quads + (r * groups + g) * 16;
                high[r] = _mm256_dpbusd_avx_epi32(high[r], w0, _mm256_set1_epi32(quads[c]));
                low[r] = _mm256_dpbusd_avx_epi32(low[r], w0, _mm256_set1_epi32(quads[8 + c]));
                high[r] = _mm256_dpbusd_avx_epi32(high[r], w1, _mm256_set1_epi32(quads[c + 4]));
                low[r] = _mm256_dpbusd_avx_epi32(low[r], w1, _mm256_set1_epi32(quads[12 + c]));
            }
        }
        for (int r = 0; r < rows; r++) {
            __m256i total = _mm256_add_epi32(_mm256_slli_epi32(high[r], 7), low[r]);
            if (bits == 8) total = _mm256_sub_epi32(total, _mm256_set1_epi32(a->bias[r * groups + g]));
            const __m256 product = _mm256_mul_ps(_mm256_cvtepi32_ps(total),
                                                 _mm256_set1_ps(a->scale[r * groups + g]));
            acc[r] = _mm256_fmadd_ps(product, scale, acc[r]);
            if (bits == 4)
                acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(a->sum[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) results[r] = acc[r];
}
#endif

static inline void store_half_row(void *out, int out_bf16, int64_t index, __m256 values) {
    if (out_bf16)
        _mm_storeu_si128((__m128i *)((uint16_t *)out + index), bf16_from_ps8(values));
    else
        _mm256_storeu_ps((float *)out + index, values);
}

int ember_tile_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const uint8_t *tiles,
                      int bits, int64_t n_cols, void *out, int out_bf16) {
    if (k % GROUP || n_cols % TILE_ROWS || (bits != 4 && bits != 8)) return 2;
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS;
    const int64_t tile_bytes = TILE_BYTES(bits);
    Activations a;
    const int64_t padded = PADDED_ROWS(m_rows);
    a.scale = malloc(sizeof(float) * (size_t)(padded * groups));
    a.sum = malloc(sizeof(float) * (size_t)(padded * groups));
#if defined(__AVXVNNI__)
    a.quads = malloc(sizeof(int32_t) * 16 * (size_t)(m_rows * groups));
    a.words = NULL;
    a.bias = bits == 8 ? malloc(sizeof(int32_t) * (size_t)(m_rows * groups)) : NULL;
    const int64_t chunk = VNNI_ROWS;
#else
    /* one row of 4-bit codes: byte products (dot_row_bytes) */
    a.quads = m_rows == 1 && bits == 4 ? malloc(sizeof(int32_t) * 16 * (size_t)groups) : NULL;
    a.words = malloc(sizeof(int16_t) * GROUP * (size_t)(padded * groups));
    a.bias = NULL;
    const int64_t chunk = WORD_ROWS;
#endif
    if ((!a.quads && !a.words) || (m_rows == 1 && bits == 4 && !a.quads) || !a.scale || !a.sum ||
        (bits == 8 && !a.words && !a.bias)) {
        free(a.quads), free(a.scale), free(a.sum), free(a.words), free(a.bias);
        return 3;
    }
    quantize_activations(x, x_bf16, m_rows, k, &a);

    /* A task is half a row tile (8 output columns). Without AVX-VNNI it takes every block of
       rows in turn, as the AVX-512 build's tasks; with it, whose 4-row chunks read row-major
       quads, the threads share each block's half tiles, block after block, so that a block's
       activations stay in cache (task after task: 2048 rows 1759 -> 2809 ms). */
#if defined(__AVXVNNI__)
    const int64_t block = VNNI_BLOCK_CHUNKS * chunk, blocks = (m_rows + block - 1) / block;
#pragma omp parallel for collapse(2) schedule(static) if (row_tiles > 1)
    for (int64_t b = 0; b < blocks; b++)
    for (int64_t task = 0; task < 2 * row_tiles; task++) {
        const int64_t first = b * block, end = first + block < m_rows ? first + block : m_rows;
#else
#pragma omp parallel for schedule(static) if (row_tiles > 1)
    for (int64_t task = 0; task < 2 * row_tiles; task++) {
        const int64_t first = 0, end = m_rows;
#endif
        const int64_t t = task / 2;
        const int half = (int)(task % 2);
        const uint8_t *tile = tiles + t * groups * tile_bytes;
        for (int64_t r0 = first; r0 < end; r0 += chunk) {
            const int64_t rows = m_rows - r0 < chunk ? m_rows - r0 : chunk;
            Activations part = {a.quads ? a.quads + r0 * groups * 16 : NULL, a.scale + r0 * groups,
                                a.sum + r0 * groups,
                                a.words ? a.words + r0 * groups * GROUP : NULL,
                                a.bias ? a.bias + r0 * groups : NULL};
#if defined(__AVXVNNI__)
            __m256 results[VNNI_ROWS];
            switch (rows) {
                case 1: dot_half_tile_vnni(&part, 1, groups, tile, bits, half, results); break;
                case 2: dot_half_tile_vnni(&part, 2, groups, tile, bits, half, results); break;
                case 3: dot_half_tile_vnni(&part, 3, groups, tile, bits, half, results); break;
                default: dot_half_tile_vnni(&part, 4, groups, tile, bits, half, results); break;
            }
            for (int64_t r = 0; r < rows; r++)
                store_half_row(out, out_bf16, (r0 + r) * n_cols + t * TILE_ROWS + 8 * half,
                               results[r]);
#else
            float acc[8 * WORD_ROWS];
            if (rows == 1 && part.quads) dot_row_bytes(&part, groups, tile, half, acc);
            else switch (rows) {
#define WORDS_CASE(n) case n: dot_words_block(&part, n, groups, tile, bits, half, acc); break;
                WORDS_CASE(1) WORDS_CASE(2) WORDS_CASE(3) WORDS_CASE(4) WORDS_CASE(5) WORDS_CASE(6)
                WORDS_CASE(7) WORDS_CASE(8) WORDS_CASE(9) WORDS_CASE(10) WORDS_CASE(11)
                default: dot_words_block(&part, WORD_ROWS, groups, tile, bits, half, acc); break;
#undef WORDS_CASE
            }
            for (int64_t r = 0; r < rows; r++)
                store_half_row(out, out_bf16, (r0 + r) * n_cols + t * TILE_ROWS + 8 * half,
                               _mm256_loadu_ps(acc + 8 * r));
#endif
        }
    }
    free(a.quads), free(a.scale), free(a.sum), free(a.words), free(a.bias);
    return 0;
}

/* Row tile t, group g of the tiles, as 16 rows of 32 values at element `first` of out (row
   stride k): bfloat16, or float32 with out_f32. */
static void dequantize_tile(const uint8_t *codes, int bits, int64_t k, void *out, int64_t first,
                            int out_f32) {
    const int vectors = bits == 4 ? 4 : 8;
    uint8_t quads[8][64]; /* quad c (columns 4c..4c+3) of the 16 rows, 4 bytes a row */
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    for (int c = 0; c < vectors; c++) {
        for (int half = 0; half < 2; half++) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * half));
            if (bits == 4) {
                _mm256_storeu_si256((__m256i *)(quads[c] + 32 * half), _mm256_and_si256(packed, nibble));
                _mm256_storeu_si256((__m256i *)(quads[c + 4] + 32 * half),
                                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble));
            } else {
                _mm256_storeu_si256((__m256i *)(quads[c] + 32 * half), packed);
            }
        }
    }
    const uint16_t *halves = (const uint16_t *)(codes + 64 * vectors);
    for (int j = 0; j < TILE_ROWS; j++) {
        uint32_t row[8];
        for (int c = 0; c < 8; c++) memcpy(&row[c], quads[c] + 4 * j, 4);
        __m256 scale = _mm256_set1_ps(_cvtsh_ss(halves[j]));
        __m256 offset = bits == 4 ? _mm256_set1_ps(_cvtsh_ss(halves[TILE_ROWS + j]))
                                  : _mm256_set1_ps(-128.0f * _cvtsh_ss(halves[j]));
        for (int part = 0; part < 4; part++) { /* columns 8 part .. 8 part + 7 */
            __m128i bytes = _mm_loadl_epi64((const __m128i *)((const uint8_t *)row + 8 * part));
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            store_half_row(out, !out_f32, first + j * k + 8 * part, _mm256_fmadd_ps(q, scale, offset));
        }
    }
}

int ember_tile_matmul_supported(void) { return 1; }

int ember_tile_activation_levels(void) { return (int)QX_MAX; }

#if defined(__AVXVNNI__)
const char *ember_tile_kernel(void) { return "avx2-vnni"; }
#else
const char *ember_tile_kernel(void) { return "avx2"; }
#endif

#endif

#if (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)) || \
    (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
/* The weight of the tiles as a dense [N, K] matrix: each (row tile, group) by the ISA's
   dequantize_tile above. */
int ember_tile_dequantize(const uint8_t *tiles, int bits, int64_t n_cols, int64_t k, void *out,
                          int out_f32) {
    if (k % GROUP || n_cols % TILE_ROWS || (bits != 4 && bits != 8)) return 2;
    const int64_t groups = k / GROUP, row_tiles = n_cols / TILE_ROWS;
    const int64_t tile_bytes = TILE_BYTES(bits);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < row_tiles; t++)
        for (int64_t g = 0; g < groups; g++)
            dequantize_tile(tiles + (t * groups + g) * tile_bytes, bits, k, out,
                            t * TILE_ROWS * k + g * GROUP, out_f32);
    return 0;
}

#else

int ember_tile_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const uint8_t *tiles,
                      int bits, int64_t n_cols, void *out, int out_bf16) {
    (void)x, (void)x_bf16, (void)m_rows, (void)k, (void)tiles, (void)bits, (void)n_cols;
    (void)out, (void)out_bf16;
    return 1;
}

int ember_tile_dequantize(const uint8_t *tiles, int bits, int64_t n_cols, int64_t k, void *out,
                          int out_f32) {
    (void)tiles, (void)bits, (void)n_cols, (void)k, (void)out, (void)out_f32;
    return 1;
}

int ember_tile_matmul_supported(void) { return 0; }

int ember_tile_activation_levels(void) { return 0; }

const char *ember_tile_kernel(void) { return "none"; }

#endif

/* Rows `ids[0..n)` of the weight as float32 [n, k] (q * scale + offset, one rounding, as
 * `ember_tile_dequantize` computes them): each read from its own lane of the tiles, so that a
 * handful of rows of a large table (an embedding lookup, the LM head's refined logits) reads
 * 1/16 of the bytes that copying their whole tiles would. Plain C: every build has it. Returns
 * 2 for a bad shape, 4 for an id outside [0, n_cols). */
int ember_tile_rows(const uint8_t *tiles, int bits, int64_t n_cols, int64_t k, const int64_t *ids,
                    int64_t n, float *out) {
    if (k % GROUP || n_cols % TILE_ROWS || (bits != 4 && bits != 8)) return 2;
    for (int64_t r = 0; r < n; r++)
        if (ids[r] < 0 || ids[r] >= n_cols) return 4;
    const int64_t groups = k / GROUP, tile_bytes = TILE_BYTES(bits);
    const int vectors = bits == 4 ? 4 : 8;
#pragma omp parallel for schedule(static) if (n >= 256)
    for (int64_t r = 0; r < n; r++) {
        const int64_t lane = ids[r] % TILE_ROWS;
        const uint8_t *tile = tiles + ids[r] / TILE_ROWS * groups * tile_bytes;
        for (int64_t g = 0; g < groups; g++, tile += tile_bytes) {
            const uint16_t *halves = (const uint16_t *)(tile + 64 * vectors);
            const float scale = fp16_to_float(halves[lane]);
            const float offset = bits == 4 ? fp16_to_float(halves[TILE_ROWS + lane]) : 0.0f;
            float *row = out + r * k + g * GROUP;
            for (int c = 0; c < vectors; c++) {
                const uint8_t *quad = tile + 64 * c + 4 * lane; /* columns 4c..4c+3 */
                for (int b = 0; b < 4; b++) {
                    if (bits == 4) {
                        row[4 * c + b] = fmaf((float)(quad[b] & 15), scale, offset);
                        row[16 + 4 * c + b] = fmaf((float)(quad[b] >> 4), scale, offset);
                    } else {
                        row[4 * c + b] = (float)((int)quad[b] - 128) * scale;
                    }
                }
            }
        }
    }
    return 0;
}

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
      defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__))
/* Builds without AMX tiles: the tile matmul never uses them. */
int ember_tile_use_amx(int enabled) {
    (void)enabled;
    return 0;
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__))
/* Builds without AVX-512 BF16: no bfloat16 vector path. */
int ember_tile_use_bf16_vectors(int enabled) {
    (void)enabled;
    return 0;
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
/* Builds without AVX-512 VNNI: every call takes the build's one path. */
int ember_tile_path(int64_t m_rows, int x_bf16, int bits) {
    (void)m_rows, (void)x_bf16, (void)bits;
    return 0;
}
#endif
