/* AMX pieces the two CPU attention kernels share (paged_attention.c, chunk_attention.c): the
 * queries as B tiles, and int8 cache rows as bf16. One definition each, so the decode and chunk
 * kernels round and lay out their operands the same way. */
#ifndef PAGODA_ATTENTION_TILES_H
#define PAGODA_ATTENTION_TILES_H

#include <stdint.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"

#if HAVE_AMX
/* The query groups of `rows` rows (rows * g <= 16 heads, rounded to bf16) as B tiles, one per 32
 * dims: row r holds dims 2r, 2r+1 of each head (column i * g + j: row i's head j), the other
 * columns zero. */
static inline void query_tiles(const float *const *qs, int rows, int g, int d, uint32_t b[4][256]) {
    memset(b, 0, sizeof(b[0]) * (size_t)(d / 32));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < g; j++)
            for (int e = 0; e < d; e += 2) {
                const float *qj = qs[i] + j * d;
                b[e / 32][(e % 32) / 2 * 16 + i * g + j] = f32_to_bf16(qj[e]) | (uint32_t)f32_to_bf16(qj[e + 1]) << 16;
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
