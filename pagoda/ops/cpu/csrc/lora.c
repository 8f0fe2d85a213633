/* LoRA adapters' low-rank products added to a linear's output, grouped by adapter (the
 * segment form of Punica's and SGLang's kernels), float32.
 *
 * y [T, out] (row stride y_stride) += scaling[s] * (x A[s]^T) B[s]^T for the rows lo..hi-1 of
 * each segment (s, lo, hi) in segments [nseg, 3]; x [T, in] (row stride x_stride). A is
 * [slots, max_width, in] and B is given transposed, bt [slots, max_width, out]
 * (pagoda/ops/lora.py's LoRAStack); a slot uses the first width[s] rows of each, and row j
 * of B^T is nonzero only in outputs cols[s, j, 0] .. cols[s, j, 1] - 1 (a fused projection's
 * parts: the rest is skipped). Rows outside every segment are untouched.
 *
 * A segment's rows go in blocks of up to LORA_ROWS: each row of A and of B^T is read once per
 * block and used for all its rows, so the adapter's weights stream once per block rather than
 * once per token. Threads take whole blocks. A row's sums run in a fixed order over its own
 * inputs whatever block it is in, so its result does not depend on the rows beside it.
 */
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define LORA_MAX_WIDTH 1024
#define LORA_ROWS 4

/* Up to LORA_ROWS rows of one adapter; rows past `rows` repeat the last one (computed, not
 * stored), so every row takes the same instructions whatever block it is in. */
static void lora_block(float *y, int64_t y_stride, const float *x, int64_t x_stride, int64_t rows,
                       const float *as, const float *bs, const int32_t *cols, int64_t w, float scale, int64_t in,
                       int64_t out) {
    float tmp[LORA_ROWS][LORA_MAX_WIDTH];
    const float *x0 = x, *x1 = x + (rows > 1) * x_stride, *x2 = x + (rows > 2 ? 2 : rows - 1) * x_stride,
                *x3 = x + (rows > 3 ? 3 : rows - 1) * x_stride;
    for (int64_t j = 0; j < w; j++) { /* x A^T: one pass over A's row for all four */
        const float *ar = as + j * in;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")
        for (int64_t k = 0; k < in; k++) {
            const float a = ar[k];
            s0 += x0[k] * a;
            s1 += x1[k] * a;
            s2 += x2[k] * a;
            s3 += x3[k] * a;
        }
        tmp[0][j] = s0 * scale;
        tmp[1][j] = s1 * scale;
        tmp[2][j] = s2 * scale;
        tmp[3][j] = s3 * scale;
    }
    /* y += tmp B^T: two rank rows of B^T (with the same output range) per pass over their
     * outputs, for all four rows (rows past `rows` add into a scratch row) */
    float *junk = rows < LORA_ROWS ? calloc((size_t)out, sizeof(float)) : 0;
    float *y0 = y, *y1 = rows > 1 ? y + y_stride : junk, *y2 = rows > 2 ? y + 2 * y_stride : junk,
          *y3 = rows > 3 ? y + 3 * y_stride : junk;
    for (int64_t j = 0; j < w;) {
        const int64_t lo = cols[2 * j], hi = cols[2 * j + 1];
        const int pair = j + 1 < w && cols[2 * j + 2] == lo && cols[2 * j + 3] == hi;
        const float *b0 = bs + j * out, *b1 = pair ? b0 + out : b0;
        const float c00 = tmp[0][j], c10 = tmp[1][j], c20 = tmp[2][j], c30 = tmp[3][j];
        const float c01 = pair ? tmp[0][j + 1] : 0.0f, c11 = pair ? tmp[1][j + 1] : 0.0f,
                    c21 = pair ? tmp[2][j + 1] : 0.0f, c31 = pair ? tmp[3][j + 1] : 0.0f;
        j += pair ? 2 : 1;
        _Pragma("omp simd")
        for (int64_t n = lo; n < hi; n++) {
            const float p = b0[n], q = b1[n];
            y0[n] += c00 * p + c01 * q;
            y1[n] += c10 * p + c11 * q;
            y2[n] += c20 * p + c21 * q;
            y3[n] += c30 * p + c31 * q;
        }
    }
    free(junk);
}

void lora_apply(float *y, int64_t y_stride, const float *x, int64_t x_stride, const int64_t *segments, int nseg,
                const float *a, const float *bt, const int32_t *cols, const int32_t *width, const float *scaling,
                int64_t max_width, int64_t in, int64_t out, int num_threads) {
    if (max_width > LORA_MAX_WIDTH) return; /* the Python side declines such stacks */
    int64_t blocks = 0;
    for (int g = 0; g < nseg; g++) blocks += (segments[3 * g + 2] - segments[3 * g + 1] + LORA_ROWS - 1) / LORA_ROWS;
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if(blocks > 1)")
    for (int64_t i = 0; i < blocks; i++) {
        int g = 0;
        int64_t block = i, n;
        while (block >= (n = (segments[3 * g + 2] - segments[3 * g + 1] + LORA_ROWS - 1) / LORA_ROWS)) {
            block -= n;
            g++;
        }
        const int64_t s = segments[3 * g], lo = segments[3 * g + 1] + block * LORA_ROWS, w = width[s];
        const int64_t rows = segments[3 * g + 2] - lo < LORA_ROWS ? segments[3 * g + 2] - lo : LORA_ROWS;
        if (w == 0) continue;
        lora_block(y + lo * y_stride, y_stride, x + lo * x_stride, x_stride, rows, a + s * max_width * in,
                   bt + s * max_width * out, cols + 2 * s * max_width, w, scaling[s], in, out);
    }
}
