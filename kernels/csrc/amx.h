/* What ember's AMX kernels share (Sapphire Rapids and later Xeons): the tile configuration's
   layout and the request for the tile data state, which Linux grants a process on asking
   (arch_prctl). Each library that includes this keeps its own state: 1 when it uses AMX
   tiles, 0 when not (turned off, or refused), -1 before its first request. Empty without
   AMX. */
#ifndef EMBER_AMX_H
#define EMBER_AMX_H

#if defined(__AMX_TILE__)
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

static int amx_state = -1;

/* Whether this library may use AMX tiles (asking Linux for them the first time). */
static inline int amx_ready(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state < 0) {
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    }
    return state;
}

/* Turn this library's AMX tiles on (asking again) or off; returns whether they are on. */
static inline int amx_enable(int enabled) {
    __atomic_store_n(&amx_state, enabled ? -1 : 0, __ATOMIC_RELEASE);
    return enabled ? amx_ready() : 0;
}
#endif

#endif
