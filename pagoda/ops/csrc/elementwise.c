/* Row-wise kernels of a decoder layer (CPU, float32 activations): RMSNorm with and
 * without the residual add, rotate-half rotary embedding, KV-cache stores and SwiGLU.
 *
 * Each replaces a chain of small torch ops (5-20 per call) whose per-op overhead
 * dominates a decode step at small batch sizes. Rows run in parallel only when a call
 * has enough work to pay for waking the threads.
 *
 * Built by pagoda/ops/native.py with -O3 -march=native -fopenmp; called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN_ELEMENTS 65536

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { float f; uint32_t u; } x = {f};
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}

static inline void norm_row(const float *x, const float *w, float *out, int64_t cols, float eps, int jiutian) {
    float ss = 0.f;
    _Pragma("omp simd reduction(+:ss)")
    for (int64_t c = 0; c < cols; c++) ss += x[c] * x[c];
    const float ms = ss / (float)cols;
    const float inv = jiutian ? 1.f / (sqrtf(ms) + eps) : 1.f / sqrtf(ms + eps);
    _Pragma("omp simd")
    for (int64_t c = 0; c < cols; c++) out[c] = w[c] * (x[c] * inv);
}

/* out = norm(x) */
void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t cols, float eps,
                  int jiutian, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * cols, w, out + r * cols, cols, eps, jiutian);
}

/* summed = x + residual; out = norm(summed) */
void add_rms_norm_f32(const float *x, const float *residual, const float *w, float *out, float *summed,
                      int64_t rows, int64_t cols, float eps, int jiutian, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) {
        float *s = summed + r * cols;
        const float *a = x + r * cols, *b = residual + r * cols;
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; c++) s[c] = a[c] + b[c];
        norm_row(s, w, out + r * cols, cols, eps, jiutian);
    }
}

/* out[t, h] = x[t, h] * cos[t] + rotate_half(x[t, h]) * sin[t]; x rows may be strided
 * (views into the fused QKV output), out is contiguous [T, H, D]. */
void rotary_f32(const float *x, int64_t x_row_stride, const float *cos, const float *sin, float *out,
                int64_t tokens, int heads, int d, int num_threads) {
    const int half = d / 2;
    _Pragma("omp parallel for num_threads(num_threads) if(tokens * heads * d >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t t = 0; t < tokens; t++) {
        const float *ct = cos + t * d, *st = sin + t * d;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + t * x_row_stride + (int64_t)h * d;
            float *oh = out + (t * heads + h) * (int64_t)d;
            _Pragma("omp simd")
            for (int e = 0; e < half; e++) oh[e] = xh[e] * ct[e] - xh[e + half] * st[e];
            _Pragma("omp simd")
            for (int e = half; e < d; e++) oh[e] = xh[e] * ct[e] + xh[e - half] * st[e];
        }
    }
}

/* cache[slots[t]] = x[t] for rows of `width` floats (x rows strided), into a float32 or
 * bfloat16 cache. */
void store_rows_f32(const float *x, int64_t x_row_stride, const int64_t *slots, void *cache, int cache_bf16,
                    int64_t tokens, int64_t width, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(tokens * width >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t t = 0; t < tokens; t++) {
        const float *src = x + t * x_row_stride;
        if (cache_bf16) {
            uint16_t *dst = (uint16_t *)cache + slots[t] * width;
            for (int64_t c = 0; c < width; c++) dst[c] = f32_to_bf16(src[c]);
        } else {
            memcpy((float *)cache + slots[t] * width, src, sizeof(float) * (size_t)width);
        }
    }
}

/* out[t] = silu(x[t, :n]) * x[t, n:] */
void silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t n, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * n >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * n, *up = gate + n;
        float *o = out + r * n;
        _Pragma("omp simd")
        for (int64_t c = 0; c < n; c++) o[c] = gate[c] / (1.f + expf(-gate[c])) * up[c];
    }
}
