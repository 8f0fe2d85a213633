/* Decode attention straight from the paged KV cache (CPU).
 *
 * One query token per sequence attends to its whole context, reading keys and values
 * in place from the page pool: no gathered copy of the context per layer. A work item
 * is one sequence and a range of kv heads (all of them when there are enough
 * sequences to keep every thread busy). The context's pool offsets are computed once
 * per item and serve keys and values alike. Scores are kept for the whole context
 * (two-pass softmax), so each key and value row is read from memory once and reused
 * from cache by the query heads of its group.
 *
 * Keys/values are float32 or bfloat16; softmax and accumulation are float32. With a
 * bfloat16 cache on a CPU with AVX512-BF16, scores are bf16 dot products (the query
 * is rounded to bfloat16 once, as bf16 attention kernels do); otherwise float32 FMAs.
 *
 * Built by pagoda/ops/native.py with -O3 -march=native -fopenmp; called through ctypes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_GROUP 8 /* query heads per kv head kept in registers (wider groups: plain loops) */
#define PREFETCH 16  /* tokens ahead: a context's rows are scattered over pages */

/* ---- portable float32 loops (any head_dim, any CPU) ------------------------------- */

#define DEFINE_PLAIN(SUFFIX, KV_T, LOAD)                                                       \
static void scores_plain_##SUFFIX(const float *q, const void *k_, int64_t h, const int64_t *off, \
                                  int64_t len, int g, int d, float scale, float *scores, int64_t stride) { \
    const KV_T *k = (const KV_T *)k_ + h;                                                      \
    for (int j = 0; j < g; j++)                                                                \
        for (int64_t t = 0; t < len; t++) {                                                    \
            const KV_T *kr = k + off[t];                                                       \
            float s = 0.f;                                                                     \
            _Pragma("omp simd reduction(+:s)")                                                 \
            for (int e = 0; e < d; e++) s += q[j * d + e] * LOAD(kr[e]);                       \
            scores[j * stride + t] = s * scale;                                                \
        }                                                                                      \
}                                                                                              \
static void values_plain_##SUFFIX(const void *v_, int64_t h, const int64_t *off, int64_t len, \
                                  int g, int d, const float *probs, int64_t stride, float *out) { \
    const KV_T *v = (const KV_T *)v_ + h;                                                      \
    memset(out, 0, sizeof(float) * (size_t)g * (size_t)d);                                     \
    for (int64_t t = 0; t < len; t++) {                                                        \
        const KV_T *vr = v + off[t];                                                           \
        for (int j = 0; j < g; j++) {                                                          \
            const float p = probs[j * stride + t];                                             \
            _Pragma("omp simd")                                                                \
            for (int e = 0; e < d; e++) out[j * d + e] += p * LOAD(vr[e]);                     \
        }                                                                                      \
    }                                                                                          \
}
#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_PLAIN(f32, float, LOAD_F32)
DEFINE_PLAIN(bf16, uint16_t, LOAD_BF16)

/* ---- AVX-512 (head_dim a multiple of 16 [32 for bf16 dot products], group <= 8) ------ */

#ifdef __AVX512F__
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline void prefetch_row(const void *p, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}

/* Each key row is loaded once and dotted with every query head of the group. */
#define DEFINE_SCORES_VEC(SUFFIX, KV_T)                                                        \
static void scores_vec_##SUFFIX(const float *q, const void *k_, int64_t h, const int64_t *off, \
                                int64_t len, int g, int d, float scale, float *scores, int64_t stride) { \
    const KV_T *k = (const KV_T *)k_ + h;                                                        \
    for (int64_t t = 0; t < len; t++) {                                                        \
        const KV_T *kr = k + off[t];                                                           \
        if (t + PREFETCH < len) prefetch_row(k + off[t + PREFETCH], d * sizeof(KV_T));                      \
        __m512 acc[MAX_GROUP];                                                                 \
        for (int j = 0; j < MAX_GROUP; j++) acc[j] = _mm512_setzero_ps();                      \
        for (int c = 0; c < d; c += 16) {                                                      \
            const __m512 kv = load16_##SUFFIX(kr + c);                                         \
            for (int j = 0; j < MAX_GROUP; j++)                                                \
                if (j < g) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * d + c), kv, acc[j]); \
        }                                                                                      \
        for (int j = 0; j < g; j++) scores[j * stride + t] = _mm512_reduce_add_ps(acc[j]) * scale; \
    }                                                                                          \
}

/* out[j] = sum_t p_j[t] v[t], 16 columns at a time with the group's sums in registers. */
#define DEFINE_VALUES_VEC(SUFFIX, KV_T)                                                        \
static void values_vec_##SUFFIX(const void *v_, int64_t h, const int64_t *off, int64_t len, \
                                int g, int d, const float *probs, int64_t stride, float *out) { \
    const KV_T *v = (const KV_T *)v_ + h;                                                        \
    for (int c = 0; c < d; c += 16) {                                                          \
        __m512 acc[MAX_GROUP];                                                                 \
        for (int j = 0; j < MAX_GROUP; j++) acc[j] = _mm512_setzero_ps();                      \
        for (int64_t t = 0; t < len; t++) {                                                    \
            if (c == 0 && t + PREFETCH < len) prefetch_row(v + off[t + PREFETCH], d * sizeof(KV_T));        \
            const __m512 vv = load16_##SUFFIX(v + off[t] + c);                                 \
            for (int j = 0; j < MAX_GROUP; j++)                                                \
                if (j < g) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(probs[j * stride + t]), vv, acc[j]); \
        }                                                                                      \
        for (int j = 0; j < g; j++) _mm512_storeu_ps(out + j * d + c, acc[j]);                 \
    }                                                                                          \
}
DEFINE_SCORES_VEC(f32, float)
DEFINE_SCORES_VEC(bf16, uint16_t)
DEFINE_VALUES_VEC(f32, float)
DEFINE_VALUES_VEC(bf16, uint16_t)
#endif

#ifdef __AVX512BF16__
/* bf16 keys: 32 products per instruction against the group's queries rounded to bf16. */
static void scores_dot_bf16(const float *q, const void *k_, int64_t h, const int64_t *off, int64_t len,
                            int g, int d, float scale, float *scores, int64_t stride) {
    const uint16_t *k = (const uint16_t *)k_ + h;
    __m512bh qb[MAX_GROUP * 4]; /* head_dim <= 128 */
    for (int j = 0; j < g; j++)
        for (int c = 0; c < d; c += 32)
            qb[j * 4 + c / 32] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + j * d + c + 16), _mm512_loadu_ps(q + j * d + c));
    for (int64_t t = 0; t < len; t++) {
        const uint16_t *kr = k + off[t];
        if (t + PREFETCH < len) prefetch_row(k + off[t + PREFETCH], d * sizeof(uint16_t));
        __m512 acc[MAX_GROUP];
        for (int j = 0; j < MAX_GROUP; j++) acc[j] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 32) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(kr + c));
            for (int j = 0; j < MAX_GROUP; j++)
                if (j < g) acc[j] = _mm512_dpbf16_ps(acc[j], qb[j * 4 + c / 32], kv);
        }
        for (int j = 0; j < g; j++) scores[j * stride + t] = _mm512_reduce_add_ps(acc[j]) * scale;
    }
}
#endif

/* (q, cache, head offset, row offsets, len, group, head_dim, scale, out, stride) */
typedef void (*scores_fn)(const float *, const void *, int64_t, const int64_t *, int64_t, int, int, float, float *,
                          int64_t);
typedef void (*values_fn)(const void *, int64_t, const int64_t *, int64_t, int, int, const float *, int64_t, float *);

static void pick_kernels(int kv_bf16, int g, int d, scores_fn *scores, values_fn *values) {
    *scores = kv_bf16 ? scores_plain_bf16 : scores_plain_f32;
    *values = kv_bf16 ? values_plain_bf16 : values_plain_f32;
#ifdef __AVX512F__
    if (g <= MAX_GROUP && d % 16 == 0) {
        *scores = kv_bf16 ? scores_vec_bf16 : scores_vec_f32;
        *values = kv_bf16 ? values_vec_bf16 : values_vec_f32;
    }
#endif
#ifdef __AVX512BF16__
    if (kv_bf16 && g <= MAX_GROUP && d % 32 == 0 && d <= 128) *scores = scores_dot_bf16;
#endif
}

/* rows[i] = {token index in q/out, block-table row, context length}; q float32, out float32
 * or (out_bf16) bfloat16, ready for a bf16 output projection. */
void paged_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            int kv_bf16, const int64_t *block_table, int64_t bt_stride, const int64_t *rows,
                            int64_t n, void *out, int out_bf16, int64_t out_stride, int hq, int hk, int d,
                            int page_size, float scale, int max_len, int num_threads) {
    const int g = hq / hk;
    /* few sequences: one item per kv head, so every thread has work */
    const int heads_per_item = n >= 2 * num_threads ? hk : 1;
    const int items_per_row = hk / heads_per_item;
    const int64_t row_stride = (int64_t)hk * d; /* elements per token in the pool */
    scores_fn scores_of;
    values_fn values_of;
    pick_kernels(kv_bf16, g, d, &scores_of, &values_of);
    _Pragma("omp parallel num_threads(num_threads)")
    {
        float *probs = malloc(sizeof(float) * (size_t)g * (size_t)max_len);
        int64_t *off = malloc(sizeof(int64_t) * (size_t)max_len);
        float *acc = malloc(sizeof(float) * (size_t)g * (size_t)d); /* bf16 output: rounded from here */
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t item = 0; item < n * items_per_row; item++) {
            const int64_t i = item / items_per_row;
            const int h0 = (int)(item % items_per_row) * heads_per_item;
            const int64_t tok = rows[3 * i], len = rows[3 * i + 2];
            const int64_t *pages = block_table + rows[3 * i + 1] * bt_stride;
            for (int64_t t = 0, p = 0; t < len; p++)
                for (int u = 0; u < page_size && t < len; u++, t++) off[t] = (pages[p] * page_size + u) * row_stride;
            for (int kh = h0; kh < h0 + heads_per_item; kh++) {
                const float *qh = q + tok * q_stride + (int64_t)kh * g * d;
                const int64_t o = tok * out_stride + (int64_t)kh * g * d;
                float *oh = out_bf16 ? acc : (float *)out + o;
                scores_of(qh, k_cache, (int64_t)kh * d, off, len, g, d, scale, probs, max_len);
                for (int j = 0; j < g; j++) {
                    float *pj = probs + j * max_len, m = -FLT_MAX, sum = 0.f;
                    for (int64_t t = 0; t < len; t++) m = pj[t] > m ? pj[t] : m;
                    _Pragma("omp simd reduction(+:sum)")
                    for (int64_t t = 0; t < len; t++) { pj[t] = expf(pj[t] - m); sum += pj[t]; }
                    const float inv = 1.f / sum;
                    _Pragma("omp simd")
                    for (int64_t t = 0; t < len; t++) pj[t] *= inv;
                }
                values_of(v_cache, (int64_t)kh * d, off, len, g, d, probs, max_len, oh);
                if (out_bf16)
                    for (int e = 0; e < g * d; e++) ((uint16_t *)out)[o + e] = f32_to_bf16(acc[e]);
            }
        }
        free(probs);
        free(off);
        free(acc);
    }
}
