/* out = x @ w.T with float32 activations and a weight stored in half precision (bfloat16 or
 * float16 bits), widened to float32 in registers: the product of float32 and the weight's own
 * values, so a weight whose float32 values a half format holds exactly loses nothing by being
 * stored in it, and a decode step reads half the bytes (`kernels/half_matmul.py`).
 *
 *   x    [M, K]  float32, contiguous
 *   w    [N, K]  bfloat16 (w_fp16 = 0) or float16 (w_fp16 = 1) bits, contiguous
 *   out  [M, N]  float32
 *
 * Each weight row is read once for up to ROWS rows of x (a decode step has one or a few); its
 * rows are shared over the OpenMP threads (torch's runtime). With AVX-512 (16 lanes) or AVX2 +
 * FMA + F16C (8) the products are vector FMAs; elsewhere scalar loops. Returns 0, or 1 when K
 * is not a multiple of the vector width (nothing computed; the caller's other path serves).
 */
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"
#include "float16.h"
#include "vector_math.h"

#define ROWS 4

static inline float half_to_float(uint16_t bits, int fp16) {
    return fp16 ? fp16_to_float(bits) : bf16_to_float(bits);
}

#if defined(__AVX512F__)
#define LANES 16
static inline __m512 load_half16(const uint16_t *w, int fp16) {
    return fp16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w)) : load_bf16(w);
}

/* rows [rows] of x (stride k) times weight row w: rows dot products */
static inline __attribute__((always_inline)) void dot_row(const float *x, int64_t k, int rows,
                                                          const uint16_t *w, int fp16,
                                                          float *dots) {
    /* two sums a row (even and odd vectors), so that the FMAs' latency overlaps */
    __m512 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * LANES <= k; i += 2 * LANES) {
        __m512 w0 = load_half16(w + i, fp16), w1 = load_half16(w + i + LANES, fp16);
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i), w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i + LANES), w1, acc[r][1]);
        }
    }
    if (i < k) {
        __m512 w0 = load_half16(w + i, fp16);
        for (int r = 0; r < rows; r++)
            acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i), w0, acc[r][0]);
    }
    for (int r = 0; r < rows; r++) dots[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LANES 8
static inline __m256 load_half8(const uint16_t *w, int fp16) {
    return fp16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)) : load_bf16_8(w);
}

static inline __attribute__((always_inline)) void dot_row(const float *x, int64_t k, int rows,
                                                          const uint16_t *w, int fp16,
                                                          float *dots) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * LANES <= k; i += 2 * LANES) {
        __m256 w0 = load_half8(w + i, fp16), w1 = load_half8(w + i + LANES, fp16);
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + LANES), w1, acc[r][1]);
        }
    }
    if (i < k) {
        __m256 w0 = load_half8(w + i, fp16);
        for (int r = 0; r < rows; r++)
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), w0, acc[r][0]);
    }
    for (int r = 0; r < rows; r++) dots[r] = reduce_add_ps8(_mm256_add_ps(acc[r][0], acc[r][1]));
}
#else
#define LANES 1
static inline void dot_row(const float *x, int64_t k, int rows, const uint16_t *w, int fp16,
                           float *dots) {
    for (int r = 0; r < rows; r++) {
        float sum = 0.0f;
        for (int64_t i = 0; i < k; i++) sum += x[r * k + i] * half_to_float(w[i], fp16);
        dots[r] = sum;
    }
}
#endif

int ember_half_matmul(const float *x, int64_t m_rows, int64_t k, const uint16_t *w, int w_fp16,
                      int64_t n_cols, float *out) {
    if (k % LANES) return 1;
#pragma omp parallel for schedule(static) if (n_cols * k >= 65536)
    for (int64_t n = 0; n < n_cols; n++) {
        const uint16_t *row = w + n * k;
        for (int64_t offset = 0; offset < k; offset += 32) __builtin_prefetch(row + k + offset);
        for (int64_t r0 = 0; r0 < m_rows; r0 += ROWS) {
            const int rows = m_rows - r0 < ROWS ? (int)(m_rows - r0) : ROWS;
            float dots[ROWS];
            switch (rows) {
                case 1: dot_row(x + r0 * k, k, 1, row, w_fp16, dots); break;
                case 2: dot_row(x + r0 * k, k, 2, row, w_fp16, dots); break;
                case 3: dot_row(x + r0 * k, k, 3, row, w_fp16, dots); break;
                default: dot_row(x + r0 * k, k, ROWS, row, w_fp16, dots); break;
            }
            for (int r = 0; r < rows; r++) out[(r0 + r) * n_cols + n] = dots[r];
        }
    }
    return 0;
}
