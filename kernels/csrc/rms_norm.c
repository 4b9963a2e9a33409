/* RMSNorm over rows, optionally fused with the residual add before it:

       sum = x + residual             (when residual is given; written to residual_out)
       out = sum / sqrt(mean(sum^2) + eps) * weight

   x and out are float32 or bfloat16 (uint16 bits, rounded to nearest even as torch does);
   residual, residual_out and weight are float32, and all math is float32. residual_out may be
   residual itself. One pass to add and sum the squares, one to scale: the torch composite on
   CPU runs five operators (pow, mean, add, rsqrt, mul) for the same result. Rows are
   independent: a decode step's few rows stay on the caller's thread, a prefill chunk's are
   shared among OpenMP's threads (torch's own, where built with -fopenmp). Built by
   `ember/kernels/cpu_library.py`. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"

#define MAX_HIDDEN 16384
/* Rows from which the work is shared among threads: below, waking them costs more than the
   rows (a 576-wide row takes about 0.2-0.3 us). */
#define PARALLEL_ROWS 16

static void norm_row(const void *x, int x_bf16, const float *residual, const float *weight,
                     int64_t r, int64_t hidden, float eps, void *out, int out_bf16,
                     float *residual_out) {
    float row[MAX_HIDDEN];
    float squares = 0.0f;
    if (x_bf16) {
        const uint16_t *xr = (const uint16_t *)x + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) row[i] = bf16_to_float(xr[i]);
    } else {
        memcpy(row, (const float *)x + r * hidden, sizeof(float) * hidden);
    }
    if (residual != 0) {
        const float *res = residual + r * hidden;
        float *sum = residual_out + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
            row[i] += res[i];
            sum[i] = row[i];
        }
    }
    for (int64_t i = 0; i < hidden; ++i) squares += row[i] * row[i];
    float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
    if (out_bf16) {
        uint16_t *o = (uint16_t *)out + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) o[i] = float_to_bf16(row[i] * inv * weight[i]);
    } else {
        float *o = (float *)out + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) o[i] = row[i] * inv * weight[i];
    }
}

/* Returns 1, computing nothing, for rows wider than its buffer. */
int ember_rms_norm(const void *x, int x_bf16, const float *residual, const float *weight,
                   int64_t rows, int64_t hidden, float eps, void *out, int out_bf16,
                   float *residual_out) {
    if (hidden > MAX_HIDDEN) return 1;
    if (rows < PARALLEL_ROWS) { /* no parallel region at all: even an idle one costs */
        for (int64_t r = 0; r < rows; ++r)
            norm_row(x, x_bf16, residual, weight, r, hidden, eps, out, out_bf16, residual_out);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
        norm_row(x, x_bf16, residual, weight, r, hidden, eps, out, out_bf16, residual_out);
    return 0;
}
