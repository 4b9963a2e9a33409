/* RMSNorm over float32 rows, optionally fused with the residual add before it:

       sum = x + residual             (when residual is given; written to residual_out)
       out = sum / sqrt(mean(sum^2) + eps) * weight

   One pass to add and sum the squares, one to scale: the torch composite on CPU runs five
   operators (pow, mean, add, rsqrt, mul) for the same result. Rows are independent; the
   caller's thread does them all (a decode step has a few rows). Built by
   `ember/kernels/cpu_library.py`. */

#include <math.h>
#include <stdint.h>

void ember_rms_norm(const float *x, const float *residual, const float *weight, int64_t rows,
                    int64_t hidden, float eps, float *out, float *residual_out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * hidden;
        float *outr = out + r * hidden;
        const float *src = xr;
        float squares = 0.0f;
        if (residual != 0) {
            const float *res = residual + r * hidden;
            float *sum = residual_out + r * hidden;
            for (int64_t i = 0; i < hidden; ++i) {
                float v = xr[i] + res[i];
                sum[i] = v;
                squares += v * v;
            }
            src = sum;
        } else {
            for (int64_t i = 0; i < hidden; ++i) squares += xr[i] * xr[i];
        }
        float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; ++i) outr[i] = src[i] * inv * weight[i];
    }
}
