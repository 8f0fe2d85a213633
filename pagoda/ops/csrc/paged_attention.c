/* Decode attention straight from the paged KV cache (CPU).
 *
 * One query token per sequence attends to its whole context, reading keys and values
 * in place from the page pool: no gathered copy of the context per layer. A work item
 * is one sequence and a range of kv heads (all of them when there are enough
 * sequences to keep every thread busy). The context's pool offsets are computed once
 * per item and serve keys and values alike. Scores are kept for the whole context
 * (two-pass softmax), so values are read once from memory; the query heads of a group
 * reuse each key/value row from cache. Keys/values are float32 or bfloat16; the math
 * is float32. With AVX-512 and head_dim % 16 == 0 the inner loops use 16-wide vectors
 * explicitly; otherwise plain loops that the compiler vectorizes.
 *
 * Built by pagoda/ops/native.py with -O3 -march=native -fopenmp; called through ctypes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

#ifdef __AVX512F__
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#define VEC16 1
/* rows of a context are scattered over pages: fetch a few tokens ahead */
#define PREFETCH 8
static inline void prefetch_row(const void *p, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}
#else
#define VEC16 0
#endif

/* Scores of query heads [j0, j0+g) against kv head kh for every context token. */
#define DEFINE_SCORES(NAME, KV_T, LOAD, LOAD16)                                                   \
static void NAME(const float *qh, const KV_T *k_cache, const int64_t *off, int64_t len, int g,   \
                 int d, float scale, float *scores, int64_t score_stride, float *mx) {            \
    for (int j = 0; j < g; j++) {                                                                 \
        const float *qj = qh + j * d;                                                             \
        float *sj = scores + j * score_stride, m = -FLT_MAX;                                      \
        if (VEC16 && d % 16 == 0) {                                                               \
            VEC16_SCORES(KV_T, LOAD16)                                                            \
        } else {                                                                                  \
            for (int64_t t = 0; t < len; t++) {                                                   \
                const KV_T *kr = k_cache + off[t];                                                \
                float s = 0.f;                                                                    \
                _Pragma("omp simd reduction(+:s)")                                                \
                for (int e = 0; e < d; e++) s += qj[e] * LOAD(kr[e]);                             \
                sj[t] = s * scale;                                                                \
            }                                                                                     \
        }                                                                                         \
        for (int64_t t = 0; t < len; t++) m = sj[t] > m ? sj[t] : m;                              \
        mx[j] = m;                                                                                \
    }                                                                                             \
}

/* acc[j] = sum_t p_j[t] * v[t] for query heads [j0, j0+g) over kv head kh. */
#define DEFINE_VALUES(NAME, KV_T, LOAD, LOAD16)                                                   \
static void NAME(const KV_T *v_cache, const int64_t *off, int64_t len, int g, int d,              \
                 const float *scores, int64_t score_stride, float *acc) {                         \
    for (int j = 0; j < g; j++) {                                                                 \
        const float *pj = scores + j * score_stride;                                              \
        float *a = acc + j * d;                                                                   \
        if (VEC16 && d % 16 == 0) {                                                               \
            VEC16_VALUES(KV_T, LOAD16)                                                            \
        } else {                                                                                  \
            memset(a, 0, sizeof(float) * (size_t)d);                                              \
            for (int64_t t = 0; t < len; t++) {                                                   \
                const KV_T *vr = v_cache + off[t];                                                \
                const float p = pj[t];                                                            \
                _Pragma("omp simd")                                                               \
                for (int e = 0; e < d; e++) a[e] += p * LOAD(vr[e]);                              \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

#if VEC16
/* up to 8 vectors of q (head_dim <= 128) stay in registers across the context */
#define VEC16_SCORES(KV_T, LOAD16)                                                                \
    if (d <= 128) {                                                                               \
        const int nc = d / 16;                                                                    \
        __m512 qv[8];                                                                             \
        for (int c = 0; c < nc; c++) qv[c] = _mm512_loadu_ps(qj + 16 * c);                        \
        for (int64_t t = 0; t < len; t++) {                                                       \
            const KV_T *kr = k_cache + off[t];                                                    \
            if (t + PREFETCH < len) prefetch_row(k_cache + off[t + PREFETCH], d * sizeof(KV_T));  \
            __m512 s = _mm512_mul_ps(qv[0], LOAD16(kr));                                          \
            for (int c = 1; c < nc; c++) s = _mm512_fmadd_ps(qv[c], LOAD16(kr + 16 * c), s);       \
            sj[t] = _mm512_reduce_add_ps(s) * scale;                                              \
        }                                                                                         \
    } else {                                                                                      \
        for (int64_t t = 0; t < len; t++) {                                                       \
            const KV_T *kr = k_cache + off[t];                                                    \
            __m512 s = _mm512_setzero_ps();                                                       \
            for (int c = 0; c < d; c += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c), LOAD16(kr + c), s); \
            sj[t] = _mm512_reduce_add_ps(s) * scale;                                              \
        }                                                                                         \
    }
#define VEC16_VALUES(KV_T, LOAD16)                                                                \
    for (int c = 0; c < d; c += 16) {                                                             \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                \
        int64_t t = 0;                                                                            \
        for (; t + 1 < len; t += 2) {                                                             \
            if (c == 0 && t + PREFETCH < len) {                                                   \
                prefetch_row(v_cache + off[t + PREFETCH], d * sizeof(KV_T));                      \
                prefetch_row(v_cache + off[t + PREFETCH + 1 < len ? t + PREFETCH + 1 : t], d * sizeof(KV_T)); \
            }                                                                                     \
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(pj[t]), LOAD16(v_cache + off[t] + c), a0);        \
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(pj[t + 1]), LOAD16(v_cache + off[t + 1] + c), a1); \
        }                                                                                         \
        if (t < len) a0 = _mm512_fmadd_ps(_mm512_set1_ps(pj[t]), LOAD16(v_cache + off[t] + c), a0); \
        _mm512_storeu_ps(a + c, _mm512_add_ps(a0, a1));                                           \
    }
#else
#define VEC16_SCORES(KV_T, LOAD16)
#define VEC16_VALUES(KV_T, LOAD16)
#define load16_f32(p) 0
#define load16_bf16(p) 0
#endif

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_SCORES(scores_f32, float, LOAD_F32, load16_f32)
DEFINE_SCORES(scores_bf16, uint16_t, LOAD_BF16, load16_bf16)
DEFINE_VALUES(values_f32, float, LOAD_F32, load16_f32)
DEFINE_VALUES(values_bf16, uint16_t, LOAD_BF16, load16_bf16)

/* rows[i] = {token index in q/out, block-table row, context length} */
#define DEFINE_DECODE(NAME, KV_T, SCORES, VALUES)                                                 \
void NAME(const float *q, int64_t q_stride, const KV_T *k_cache, const KV_T *v_cache,             \
          const int64_t *block_table, int64_t bt_stride, const int64_t *rows, int64_t n,           \
          float *out, int64_t out_stride, int hq, int hk, int d, int page_size, float scale,       \
          int max_len, int num_threads) {                                                         \
    const int g = hq / hk;                                                                        \
    /* few sequences: one item per kv head, so every thread has work */                          \
    const int heads_per_item = n >= 2 * num_threads ? hk : 1;                                     \
    const int items_per_row = hk / heads_per_item;                                                \
    const int64_t row_stride = (int64_t)hk * d; /* elements per token in the pool */             \
    _Pragma("omp parallel num_threads(num_threads)")                                              \
    {                                                                                             \
        float *scores = malloc(sizeof(float) * (size_t)g * (size_t)max_len);                      \
        float *mx = malloc(sizeof(float) * (size_t)g);                                            \
        int64_t *off = malloc(sizeof(int64_t) * (size_t)max_len);                                 \
        _Pragma("omp for schedule(dynamic, 1)")                                                   \
        for (int64_t item = 0; item < n * items_per_row; item++) {                                \
            const int64_t i = item / items_per_row;                                               \
            const int h0 = (int)(item % items_per_row) * heads_per_item;                          \
            const int64_t tok = rows[3 * i], len = rows[3 * i + 2];                               \
            const int64_t *pages = block_table + rows[3 * i + 1] * bt_stride;                     \
            for (int64_t t = 0, p = 0; t < len; p++)                                              \
                for (int u = 0; u < page_size && t < len; u++, t++)                               \
                    off[t] = (pages[p] * page_size + u) * row_stride;                             \
            for (int kh = h0; kh < h0 + heads_per_item; kh++) {                                   \
                const float *qh = q + tok * q_stride + (int64_t)kh * g * d;                       \
                SCORES(qh, k_cache + (int64_t)kh * d, off, len, g, d, scale, scores, max_len, mx); \
                for (int j = 0; j < g; j++) {                                                     \
                    float *sj = scores + j * max_len, sum = 0.f, m = mx[j];                       \
                    _Pragma("omp simd reduction(+:sum)")                                          \
                    for (int64_t t = 0; t < len; t++) { sj[t] = expf(sj[t] - m); sum += sj[t]; }  \
                    const float inv = 1.f / sum;                                                  \
                    for (int64_t t = 0; t < len; t++) sj[t] *= inv;                               \
                }                                                                                 \
                VALUES(v_cache + (int64_t)kh * d, off, len, g, d, scores, max_len,                \
                       out + tok * out_stride + (int64_t)kh * g * d);                             \
            }                                                                                     \
        }                                                                                         \
        free(scores);                                                                             \
        free(mx);                                                                                 \
        free(off);                                                                                \
    }                                                                                             \
}

DEFINE_DECODE(paged_decode_attention_f32, float, scores_f32, values_f32)
DEFINE_DECODE(paged_decode_attention_bf16, uint16_t, scores_bf16, values_bf16)
