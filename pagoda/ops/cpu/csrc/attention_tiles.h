/* Tile pieces the two CPU attention kernels share (paged_attention.c, chunk_attention.c): the
 * queries as B tiles, and int8 cache rows as bf16. One definition each, so the decode and chunk
 * kernels round and lay out their operands the same way. */
#ifndef PAGODA_ATTENTION_TILES_H
#define PAGODA_ATTENTION_TILES_H

#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "simd.h"

#if HAVE_BF16_TILES
/* The query groups of `rows` rows (rows * g <= 16 heads, rounded to bf16) as B tiles, one per 32
 * dims: row r holds dims 2r, 2r+1 of each head (column i * g + j: row i's head j), the other
 * columns zero. */
static inline void query_tiles(const float *const *qs, int rows, int g, int d, uint32_t b[4][256]) {
    for (int c = 0; c < d; c += 32) {
        __m512i col[16]; /* column i * g + j: the head's 32 dims as bf16, dim pairs as dwords */
        for (int e = 0; e < 16; e++) col[e] = _mm512_setzero_si512();
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < g; j++) {
                const float *qj = qs[i] + j * d + c;
                col[i * g + j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(qj + 16), _mm512_loadu_ps(qj));
            }
        transpose16(col);
        for (int r = 0; r < 16; r++) _mm512_storeu_si512(b[c / 32] + 16 * r, col[r]);
    }
}

/* 32 values of an int8 row from column c, times their group's scale, as bf16 */
static inline __m512i i8x32_to_bf16(const int8_t *row, int d, int c, int scaled) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + c))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + c + 16))));
    if (scaled) {
        uint16_t h;
        memcpy(&h, row + d + 2 * (c / 32), sizeof h);
        const __m512 s = _mm512_set1_ps(f16_to_f32(h));
        lo = _mm512_mul_ps(lo, s), hi = _mm512_mul_ps(hi, s);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

#endif

#endif
