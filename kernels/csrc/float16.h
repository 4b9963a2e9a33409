/* IEEE binary16 (float16) -> float32 for ember's C kernels, one value, exactly (subnormals,
   infinities and NaN included), without F16C: the plain-C builds use it too. */
#ifndef EMBER_FLOAT16_H
#define EMBER_FLOAT16_H

#include <stdint.h>
#include <string.h>

static inline float fp16_to_float(uint16_t bits) {
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu;
    uint32_t mantissa = bits & 0x3ffu, u;
    if (exponent == 0x1f) {
        u = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 is exact in float32 */
        float value = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&u, &value, sizeof u);
        u |= sign;
    } else {
        u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
