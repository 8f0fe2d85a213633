/* bf16 tile products for the CPU C kernels. Intel AMX (Sapphire Rapids and later): whether
 * this build has it, the per-process permission Linux wants before the first tile instruction,
 * and the tile configuration; a kernel that uses tiles loads a configuration in each of its
 * threads and releases the tiles when done. Where AMX is missing but AVX512-BF16 is there (AMD
 * Zen 4 and later, Intel Cooper Lake), the same products run on the vector units (vec_tile_dp),
 * so the kernels built on tile products serve there too (HAVE_BF16_TILES). Defining
 * PAGODA_NO_AMX (native.py does, with PAGODA_NO_AMX=1 in the environment) builds the vector
 * form on an AMX machine, so it can be tested there. */
#ifndef PAGODA_AMX_H
#define PAGODA_AMX_H

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    !defined(PAGODA_NO_AMX)
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

#if !HAVE_AMX && defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_VEC_TILES 1
#include <immintrin.h>
#include <stdint.h>

/* What _tile_dpbf16ps does to a 16 x 16 float32 tile, `depth` times over, on the vector units:
 * C (rows 64 bytes apart) += A B per step, A 16 rows of 16 bf16 pairs (dwords; a_row dwords
 * from one row to the next, a_step from one step to the next), B 16 rows of 16 pairs (256
 * consecutive dwords a step); C starts at zero where `zero`. C stays in 16 registers throughout,
 * B is loaded a row at a time and A's pairs are broadcast from memory inside the vdpbf16ps:
 * one per row and pair of a step, the tile unit's multiply-adds. Callers pass a constant a_row
 * (it is inlined), so every broadcast is an offset from one address, no pointer per row. */
static inline __attribute__((always_inline)) void vec_tile_dp(float *c, int zero, const uint32_t *a, int64_t a_row,
                                                               int64_t a_step, const uint32_t *b, int depth) {
    __m512 acc[16];
    _Pragma("GCC unroll 16")
    for (int r = 0; r < 16; r++) acc[r] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + 16 * r);
    for (int s = 0; s < depth; s++, a += a_step, b += 256) {
        _Pragma("GCC unroll 16")
        for (int p = 0; p < 16; p++) {
            const __m512bh bp = (__m512bh)_mm512_loadu_si512(b + 16 * p);
            _Pragma("GCC unroll 16")
            for (int r = 0; r < 16; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], bp, (__m512bh)_mm512_set1_epi32((int)a[r * a_row + p]));
        }
    }
    _Pragma("GCC unroll 16")
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(c + 16 * r, acc[r]);
}
#else
#define HAVE_VEC_TILES 0
#endif

#define HAVE_BF16_TILES (HAVE_AMX || HAVE_VEC_TILES)

#if HAVE_BF16_TILES
/* whether the tile products may run in this process (AMX: once Linux has handed out the tiles) */
static inline int bf16_tiles_ready(void) {
#if HAVE_AMX
    return amx_ready();
#else
    return 1;
#endif
}
#endif

#endif
