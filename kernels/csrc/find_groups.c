/* Recovering the 4- and 8-bit groups a dense weight is made of, in one pass (the torch
 * reference, `find_int4_groups` / `find_int8_groups` / `_narrowed` in
 * ember/workers/layers/packed_int4.py, makes a dozen passes over every weight: about 7 s of a
 * fresh start for SmolLM2's 134M weights on 2 cores). The same float32 operations in the same
 * order (built with -ffp-contract=off), so that both accept the same weights and give the same
 * codes and scales bit for bit.
 *
 * ember_find_groups: weight [N, K] float32, groups of 32 along K, in one form for every group:
 *   form 0 (Q4_1)  step = (max - min) / 15, base = min,        q in [0, 15]
 *   form 1 (Q4_0)  step = -extreme / 8 (extreme: the first value of largest magnitude), the
 *                  group read times sign(step), base = -8 |step|, q in [0, 15]
 *   form 2 (Q8_0)  step = max|w| / 127, base = 0,              q in [-127, 127]
 * A value fits when |base + q step - w| <= 1e-3 step' + 1e-7 |w| (step' = step, or 1 where
 * step is not positive, q then 0) with q = round-half-even((w - base) / step'). Writes q
 * [N, K] int8, step [N, K / 32] (signed for form 1) and base (the minimum for form 0, else 0);
 * returns 0 when every value fits, 1 at
 * the first that does not (outputs then partial), 2 when K is not whole groups.
 *
 * ember_rebuild_fits: whether q * scale + offset (float32 operands, e.g. float16 scales read
 * back) still lands within 1e-3 |wide_scale| + 1e-7 |w| of every weight, and is finite;
 * offset may be NULL (zero). Returns 0 when it does, 1 when not. */
#include <math.h>
#include <stdint.h>

#define GROUP 32

static int fit_group(const float *w, float sign, float step, float base, int q_min, int q_max,
                     int8_t *q_out) {
    const float safe = step > 0.0f ? step : 1.0f;
    for (int i = 0; i < GROUP; i++) {
        float value = sign == 1.0f ? w[i] : w[i] * sign;
        float q = step > 0.0f ? nearbyintf((value - base) / safe) : 0.0f;
        float product = q * step;
        float error = fabsf(base + product - value);
        float tolerance = 1e-3f * safe + 1e-7f * fabsf(value);
        if (!(error <= tolerance) || q < (float)q_min || q > (float)q_max) return 1;
        q_out[i] = (int8_t)q;
    }
    return 0;
}

int ember_find_groups(const float *weight, int64_t rows, int64_t cols, int form, int8_t *q,
                      float *step_out, float *base_out) {
    if (cols % GROUP) return 2;
    const int64_t groups = cols / GROUP;
    int failed = 0;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (__atomic_load_n(&failed, __ATOMIC_RELAXED)) continue;
        for (int64_t g = 0; g < groups; g++) {
            const float *w = weight + r * cols + g * GROUP;
            int8_t *q_group = q + r * cols + g * GROUP;
            float step, base, sign = 1.0f;
            int q_min = 0, q_max = 15;
            if (form == 0) {
                float low = w[0], high = w[0];
                for (int i = 1; i < GROUP; i++) {
                    low = fminf(low, w[i]);
                    high = fmaxf(high, w[i]);
                }
                step = (high - low) / 15.0f;
                base = low;
            } else if (form == 1) {
                float extreme = w[0];
                for (int i = 1; i < GROUP; i++)
                    if (fabsf(w[i]) > fabsf(extreme)) extreme = w[i];
                float signed_step = -extreme / 8.0f;
                sign = signed_step > 0.0f ? 1.0f : (signed_step < 0.0f ? -1.0f : 0.0f);
                step = fabsf(signed_step);
                base = -8.0f * step;
                step_out[r * groups + g] = signed_step;
            } else {
                float amax = 0.0f;
                for (int i = 0; i < GROUP; i++) amax = fmaxf(amax, fabsf(w[i]));
                step = amax / 127.0f;
                base = 0.0f;
                q_min = -127, q_max = 127;
            }
            if (form != 1) step_out[r * groups + g] = step;
            base_out[r * groups + g] = form == 0 ? base : 0.0f;
            if (fit_group(w, sign, step, base, q_min, q_max, q_group)) {
                __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                break;
            }
        }
    }
    return failed;
}

int ember_rebuild_fits(const float *weight, const int8_t *q, int64_t rows, int64_t cols,
                       const float *scale, const float *offset, const float *wide_scale) {
    const int64_t groups = cols / GROUP;
    int failed = 0;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (__atomic_load_n(&failed, __ATOMIC_RELAXED)) continue;
        for (int64_t k = 0; k < cols; k++) {
            int64_t g = r * groups + k / GROUP;
            float product = (float)q[r * cols + k] * scale[g];
            float rebuilt = offset ? product + offset[g] : product;
            float error = fabsf(rebuilt - weight[r * cols + k]);
            float tolerance = 1e-3f * fabsf(wide_scale[g]) + 1e-7f * fabsf(weight[r * cols + k]);
            if (!isfinite(rebuilt) || !(error <= tolerance)) {
                __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                break;
            }
        }
    }
    return failed;
}
