/* Greedy sampling's argmax over rows of logits (CPU).
 *
 * torch's CPU max(dim) reads a 49,152-wide row at ~3 GB/s (~15 us a row per thread, ~1 ms
 * a step at 64 sequences); sixteen running maxima per row, one per vector lane, then one
 * reduction across lanes, do it at memory speed. Strictly greater keeps each lane's
 * first maximum and the reduction takes the smallest index among equal maxima, so ties
 * go to the first index, as torch's argmax. Rows are assumed free of NaNs (logits are).
 *
 * Built by pagoda/ops/cpu/native.py (FLAGS there: -O3 -march=native -ffast-math -fopenmp, ...); called
 * through ctypes.
 */
#include <float.h>
#include <stdint.h>

#include "bf16.h"
#include "kernels.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PARALLEL_MIN_ELEMENTS 65536

static int64_t argmax_row(const void *x, int x_bf16, int64_t off, int64_t cols) {
    int64_t c = 0, best_i = 0;
    float best = -FLT_MAX;
#ifdef __AVX512F__
    if (cols >= 16) {
        const int64_t whole = cols / 16 * 16;
        __m512 vmax = _mm512_set1_ps(-FLT_MAX);
        __m512i vidx = _mm512_setzero_si512(), lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (; c < whole; c += 16) {
            const __m512 v = x_bf16 ? bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + off + c)))
                                    : _mm512_loadu_ps((const float *)x + off + c);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
            vmax = _mm512_mask_mov_ps(vmax, gt, v);
            vidx = _mm512_mask_mov_epi32(vidx, gt, _mm512_add_epi32(lane, _mm512_set1_epi32((int)c)));
        }
        best = _mm512_reduce_max_ps(vmax);
        const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best), _CMP_EQ_OQ);
        best_i = (int64_t)_mm512_mask_reduce_min_epi32(at_max, vidx);
    }
#endif
    for (; c < cols; c++) {
        const float v = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[off + c]) : ((const float *)x)[off + c];
        if (v > best) best = v, best_i = c;
    }
    return best_i;
}

/* out[r] = the index of row r's maximum (the first one on ties); x [rows, cols] float32 or
 * bfloat16 */
void argmax_rows(const void *x, int x_bf16, int64_t rows, int64_t cols, int64_t *out, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x, x_bf16, r * cols, cols);
}
