/* Row-wise kernels of a decoder layer (CPU): RMSNorm with and without the residual
 * add, rotary embedding fused with the KV-cache store, and SwiGLU.
 *
 * Each replaces a chain of small torch ops (5-20 per call) whose per-op overhead
 * dominates a decode step at small batch sizes. Inputs and outputs are float32 or
 * bfloat16 (a flag per tensor), so quantized models pass bfloat16 activations between
 * their linears without conversion ops; the math is float32 and each output is
 * rounded once. On AVX-512 CPUs each row is processed 16 floats at a time with masked
 * ends (and SwiGLU uses its own vector exp); elsewhere plain loops the compiler
 * vectorizes. Rows run in parallel only when a call has enough work to pay for waking
 * the threads.
 *
 * Built by pagoda/ops/cpu/native.py (FLAGS there: -O3 -march=native -ffast-math -fopenmp, ...); called
 * through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"
#include "kernels.h"

#define PARALLEL_MIN_ELEMENTS 16384
#define CHUNK 512 /* elements converted to float32 at a time */

/* dst[0:n] = float32 of src[off:off+n] (src float32 or bfloat16) */
static inline void load(const void *src, int bf16, int64_t off, int64_t n, float *dst) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + off;
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + off, sizeof(float) * (size_t)n);
    }
}

/* dst[off:off+n] = src[0:n], rounded to bfloat16 when dst is */
static inline void store(const float *src, void *dst, int bf16, int64_t off, int64_t n) {
    if (bf16) {
        uint16_t *d = (uint16_t *)dst + off;
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + off, src, sizeof(float) * (size_t)n);
    }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

#ifdef __AVX512F__
/* ---- AVX-512: 16 floats per step, masked at row ends; same math as the loops below -- */
#include <immintrin.h>

static inline __mmask16 tail(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 ld16(const void *p, int bf16, int64_t off, __mmask16 m) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + off);
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + off));
}

static inline void st16(__m512 x, void *p, int bf16, int64_t off, __mmask16 m) {
    if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)p + off, m, f32_to_bf16x16(x));
    else
        _mm512_mask_storeu_ps((float *)p + off, m, x);
}

static inline float sum16(__m512 x) { return _mm512_reduce_add_ps(x); }
#endif

/* out = w * norm(x) for one row of float32 x */
static void norm_row(const float *x, const float *w, void *out, int out_bf16, int64_t out_off, int64_t cols,
                     float eps, int jiutian) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail(cols - c), x + c);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float ms = sum16(acc) / (float)cols;
    const float inv = jiutian ? 1.f / (sqrtf(ms) + eps) : 1.f / sqrtf(ms + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 m = tail(cols - c);
        const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + c), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), vinv));
        st16(y, out, out_bf16, out_off + c, m);
    }
#else
    float ss = 0.f, buf[CHUNK];
    _Pragma("omp simd reduction(+:ss)")
    for (int64_t c = 0; c < cols; c++) ss += x[c] * x[c];
    const float ms = ss / (float)cols;
    const float inv = jiutian ? 1.f / (sqrtf(ms) + eps) : 1.f / sqrtf(ms + eps);
    for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
        const int64_t n = min64(CHUNK, cols - c0);
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; i++) buf[i] = w[c0 + i] * (x[c0 + i] * inv);
        store(buf, out, out_bf16, out_off + c0, n);
    }
#endif
}

/* out = norm(x); x float32 */
void rms_norm(const float *x, const float *w, void *out, int out_bf16, int64_t rows, int64_t cols, float eps,
              int jiutian, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * cols, w, out, out_bf16, r * cols, cols, eps, jiutian);
}

/* summed = x + residual (float32); out = norm(summed) */
void add_rms_norm(const void *x, int x_bf16, const float *residual, const float *w, void *out, int out_bf16,
                  float *summed, int64_t rows, int64_t cols, float eps, int jiutian, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) {
        float *s = summed + r * cols;
        const float *b = residual + r * cols;
#ifdef __AVX512F__
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 m = tail(cols - c);
            _mm512_mask_storeu_ps(s + c, m, _mm512_add_ps(ld16(x, x_bf16, r * cols + c, m), _mm512_maskz_loadu_ps(m, b + c)));
        }
#else
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            const int64_t n = min64(CHUNK, cols - c0);
            load(x, x_bf16, r * cols + c0, n, s + c0);
            _Pragma("omp simd")
            for (int64_t i = 0; i < n; i++) s[c0 + i] += b[c0 + i];
        }
#endif
        norm_row(s, w, out, out_bf16, r * cols, cols, eps, jiutian);
    }
}

/* One head: out = x * cos + rotate_half(x) * sin (x, out float32 or bfloat16). */
static inline void rotate_head(const void *x, int x_bf16, int64_t x_off, const float *ct, const float *st, void *out,
                               int out_bf16, int64_t out_off, int d) {
    const int half = d / 2;
#ifdef __AVX512F__
    for (int e = 0; e < half; e += 16) {
        const __mmask16 m = tail(half - e);
        const __m512 x1 = ld16(x, x_bf16, x_off + e, m), x2 = ld16(x, x_bf16, x_off + half + e, m);
        const __m512 c1 = _mm512_maskz_loadu_ps(m, ct + e), s1 = _mm512_maskz_loadu_ps(m, st + e);
        const __m512 c2 = _mm512_maskz_loadu_ps(m, ct + half + e), s2 = _mm512_maskz_loadu_ps(m, st + half + e);
        st16(_mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1)), out, out_bf16, out_off + e, m);
        st16(_mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2)), out, out_bf16, out_off + half + e, m);
    }
#else
    float xh[d], oh[d];
    load(x, x_bf16, x_off, d, xh);
    _Pragma("omp simd")
    for (int e = 0; e < half; e++) oh[e] = xh[e] * ct[e] - xh[e + half] * st[e];
    _Pragma("omp simd")
    for (int e = half; e < d; e++) oh[e] = xh[e] * ct[e] + xh[e - half] * st[e];
    store(oh, out, out_bf16, out_off, d);
#endif
}

/* One head's row of an int8 cache (kv_quant.py's quantize_rows, the same float32
 * operations, so both write the same bytes): per group of kv_int8_group(d) values, the
 * scale s = float16(max|x| * (1 / 127)) and the bytes round(x * (1 / s)), ties to even,
 * clamped to +-127 (0 where s is 0); the float16 scales after the d bytes. */
static void quantize_head(const float *x, int d, int8_t *row) {
    const int gs = kv_int8_group(d);
    for (int g0 = 0; g0 < d; g0 += gs) {
        float amax = 0.f;
        for (int e = g0; e < g0 + gs; e++) amax = fmaxf(amax, fabsf(x[e]));
        const uint16_t sh = f32_to_f16(fminf(amax * (float)(1.0 / 127.0), 65504.f));
        const float s = f16_to_f32(sh), inv = s > 0.f ? 1.f / s : 0.f;
#ifdef __AVX512F__
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (int e = g0; e < g0 + gs; e += 16) {
            const __mmask16 k = tail(g0 + gs - e);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + e), vinv)); /* ties to even */
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            _mm_mask_storeu_epi8(row + e, k, _mm512_cvtepi32_epi8(q));
        }
#else
        for (int e = g0; e < g0 + gs; e++) row[e] = (int8_t)fminf(fmaxf(nearbyintf(x[e] * inv), -127.f), 127.f);
#endif
        memcpy(row + d + 2 * kv_int8_group_of(d, g0), &sh, sizeof sh);
    }
}

/* The step after the QKV projection, per token: rotate the query heads into q_out
 * [T, Hq, D]; rotate the key heads straight into their cache slot; copy the values into
 * theirs (each in the cache's kv_kind). q/k/v are views into the fused QKV output (rows of
 * `row_stride` elements). */
void rotary_store_kv(const void *q, const void *k, const void *v, int x_bf16, int64_t row_stride, const float *cos,
                     const float *sin, void *q_out, int q_out_bf16, void *k_cache, void *v_cache, int cache_kind,
                     const int64_t *slots, int64_t tokens, int hq, int hk, int d, int num_threads) {
    const int64_t width = (int64_t)hk * d; /* elements per token in a float cache */
    const int cache_bf16 = cache_kind == KV_BF16;
    _Pragma("omp parallel for num_threads(num_threads) if(tokens * (hq + 2 * hk) * d >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t t = 0; t < tokens; t++) {
        const float *ct = cos + t * d, *st = sin + t * d;
        for (int h = 0; h < hq; h++)
            rotate_head(q, x_bf16, t * row_stride + (int64_t)h * d, ct, st, q_out, q_out_bf16, (t * hq + h) * (int64_t)d, d);
        if (cache_kind == KV_INT8) {
            const int64_t hd = kv_int8_row_bytes(d);
            float head[d];
            for (int h = 0; h < hk; h++) {
                rotate_head(k, x_bf16, t * row_stride + (int64_t)h * d, ct, st, head, 0, 0, d);
                quantize_head(head, d, (int8_t *)k_cache + (slots[t] * hk + h) * hd);
                load(v, x_bf16, t * row_stride + (int64_t)h * d, d, head);
                quantize_head(head, d, (int8_t *)v_cache + (slots[t] * hk + h) * hd);
            }
            continue;
        }
        for (int h = 0; h < hk; h++)
            rotate_head(k, x_bf16, t * row_stride + (int64_t)h * d, ct, st, k_cache, cache_bf16,
                        slots[t] * width + (int64_t)h * d, d);
        if (x_bf16 == cache_bf16) {
            const size_t size = x_bf16 ? 2 : 4;
            memcpy((char *)v_cache + slots[t] * width * size, (const char *)v + t * row_stride * size, size * width);
        } else {
            float buf[CHUNK];
            for (int64_t c0 = 0; c0 < width; c0 += CHUNK) {
                const int64_t n = min64(CHUNK, width - c0);
                load(v, x_bf16, t * row_stride + c0, n, buf);
                store(buf, v_cache, cache_bf16, slots[t] * width + c0, n);
            }
        }
    }
}

/* out[r] = silu(x[r, :n]) * x[r, n:] */
void silu_and_mul(const void *x, int x_bf16, void *out, int out_bf16, int64_t rows, int64_t n, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) if(rows * n >= PARALLEL_MIN_ELEMENTS)")
    for (int64_t r = 0; r < rows; r++) {
#ifdef __AVX512F__
        for (int64_t c = 0; c < n; c += 16) {
            const __mmask16 m = tail(n - c);
            const __m512 g = ld16(x, x_bf16, r * 2 * n + c, m), u = ld16(x, x_bf16, r * 2 * n + n + c, m);
            st16(silu_mul16(g, u), out, out_bf16, r * n + c, m);
        }
#else
        float gate[CHUNK], up[CHUNK];
        for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
            const int64_t m = min64(CHUNK, n - c0);
            load(x, x_bf16, r * 2 * n + c0, m, gate);
            load(x, x_bf16, r * 2 * n + n + c0, m, up);
            _Pragma("omp simd")
            for (int64_t i = 0; i < m; i++) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
            store(gate, out, out_bf16, r * n + c0, m);
        }
#endif
    }
}
