/* LoRA adapters' low-rank products added to a linear's output, grouped by adapter (the
 * segment form of Punica's and SGLang's kernels), float32.
 *
 * y [T, out] (row stride y_stride) += scaling[s] * (x A[s]^T) B[s]^T for the rows lo..hi-1 of
 * each segment (s, lo, hi) in segments [nseg, 3]; x [T, in] (row stride x_stride). A is
 * [slots, max_width, in] and B is given transposed, bt [slots, max_width, out]
 * (pagoda/ops/lora.py's LoRAStack); a slot uses the first width[s] rows of each. Rows outside
 * every segment are untouched. Each row's sums run in a fixed order over its own inputs, so
 * a row's result does not depend on the rows beside it.
 *
 * Threads split a segment's rows (both products of a row stay on one thread): the work is
 * small, so one parallel region per call, and none for a single row.
 */
#include <stdint.h>

#include "kernels.h"

#define LORA_MAX_WIDTH 1024

static void lora_row(float *yr, const float *xr, const float *as, const float *bs, int64_t w, float scale,
                     int64_t in, int64_t out) {
    float tmp[LORA_MAX_WIDTH];
    for (int64_t j = 0; j < w; j++) {
        const float *ar = as + j * in;
        float acc = 0.0f;
        for (int64_t k = 0; k < in; k++) acc += xr[k] * ar[k];
        tmp[j] = acc * scale;
    }
    for (int64_t j = 0; j < w; j++) {
        const float *br = bs + j * out;
        const float c = tmp[j];
        for (int64_t n = 0; n < out; n++) yr[n] += c * br[n];
    }
}

void lora_apply(float *y, int64_t y_stride, const float *x, int64_t x_stride, const int64_t *segments, int nseg,
                const float *a, const float *bt, const int32_t *width, const float *scaling, int64_t max_width,
                int64_t in, int64_t out, int num_threads) {
    int64_t total = 0;
    for (int g = 0; g < nseg; g++) total += segments[3 * g + 2] - segments[3 * g + 1];
    if (max_width > LORA_MAX_WIDTH) return; /* the Python side declines such stacks */
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if(total > 1)")
    for (int64_t i = 0; i < total; i++) {
        int g = 0;
        int64_t row = i;
        while (row >= segments[3 * g + 2] - segments[3 * g + 1]) {
            row -= segments[3 * g + 2] - segments[3 * g + 1];
            g++;
        }
        const int64_t s = segments[3 * g], r = segments[3 * g + 1] + row, w = width[s];
        if (w == 0) continue;
        lora_row(y + r * y_stride, x + r * x_stride, a + s * max_width * in, bt + s * max_width * out, w, scaling[s],
                 in, out);
    }
}
