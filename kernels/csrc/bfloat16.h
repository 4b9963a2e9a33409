/* bfloat16 <-> float32 for ember's C kernels: bfloat16 is the top half of a float32's bits;
   float32 -> bfloat16 rounds to nearest even, as torch's casts do (NaN stays NaN). */
#ifndef EMBER_BFLOAT16_H
#define EMBER_BFLOAT16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif
