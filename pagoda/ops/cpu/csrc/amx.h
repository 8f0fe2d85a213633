/* Intel AMX (Sapphire Rapids and later) for the CPU C kernels: whether this build has it, the
 * per-process permission Linux wants before the first tile instruction, and the tile
 * configuration. A kernel that uses tiles loads a configuration in each of its threads and
 * releases the tiles when done. */
#ifndef PAGODA_AMX_H
#define PAGODA_AMX_H

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands out the tile registers on request, once per process (this state is per source
 * file; asking twice is harmless). */
static inline int amx_ready(void) {
    static int state = 0; /* 0 unknown, 1 yes, -1 no */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* Tiles 0..tiles-1 of 16 rows x 64 bytes (a caller may shorten some before loading it). */
static inline tile_config tile_config_of(int tiles) {
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int i = 0; i < tiles; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    return cfg;
}

static inline void load_tile_config(int tiles) {
    const tile_config cfg = tile_config_of(tiles);
    _tile_loadconfig(&cfg);
}
#else
#define HAVE_AMX 0
#endif

#endif
