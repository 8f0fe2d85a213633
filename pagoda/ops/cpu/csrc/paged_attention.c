/* Decode attention straight from the paged KV cache (CPU).
 *
 * One query token per row attends to its whole context, reading keys and values in place
 * from the page pool: no gathered copy of the context per layer. A work item is one sequence's
 * run of rows (one row when decoding; a proposal's tokens when verifying one, see row_runs) and a
 * range of kv heads (all of them when there are enough items to keep every thread busy). The
 * context's pool offsets are computed once per item and serve keys and values alike. Scores are
 * kept for the whole context (two-pass softmax, its normalisation applied to the value sums), so
 * each key and value row is read from memory once and reused from cache by the query heads of
 * its group and the other rows of its run.
 *
 * Keys/values are float32, bfloat16 or int8 rows with a float16 scale per 32 values
 * (kv_kind, kernels.h); softmax and accumulation are float32. Scores: where the CPU has AMX,
 * tile products for bf16 and int8 keys (the query rounded to bfloat16 once, as bf16
 * attention kernels do; int8 rows become bf16 exactly, each group's part times its scale);
 * else bf16 dot products for a bf16 cache on AVX512-BF16, and float32 FMAs otherwise. Value
 * sums, for head_dim a multiple of 64, keep a row's 64 columns and every head's sums in
 * registers; an int8 row's scales are folded into the probabilities (timings:
 * benchmarks/bench_attention.py, docs/BENCHMARKS.md). An int8 cache reads half a bf16
 * cache's bytes, which is what decode attention waits on.
 *
 * Built by pagoda/ops/cpu/native.py (FLAGS there: -O3 -march=native -ffast-math -fopenmp, ...); called
 * through ctypes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "simd.h"
#include "attention_tiles.h"
#include "kernels.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_GROUP 8 /* query heads per kv head whose value sums stay in registers (wider groups: plain loops) */
#define PREFETCH 32  /* tokens ahead (16 measured 1.1x slower): a context's rows are scattered over pages */

/* ---- portable float32 loops (any head_dim, any CPU) ------------------------------- */

#define DEFINE_PLAIN(SUFFIX, KV_T, LOAD, SCALE)                                                \
static void scores_plain_##SUFFIX(const float *q, const void *k_, int64_t h, const int64_t *off, \
                                  int64_t len, int g, int d, float scale, float *scores, int64_t stride, int pf) { \
    (void)pf;                                                                                  \
    const KV_T *k = (const KV_T *)k_ + h;                                                      \
    for (int j = 0; j < g; j++)                                                                \
        for (int64_t t = 0; t < len; t++) {                                                    \
            const KV_T *kr = k + off[t];                                                       \
            float s = 0.f;                                                                     \
            _Pragma("omp simd reduction(+:s)")                                                 \
            for (int e = 0; e < d; e++) s += q[j * d + e] * (LOAD(kr[e]) * SCALE(kr, d, e));   \
            scores[j * stride + t] = s * scale;                                                \
        }                                                                                      \
}                                                                                              \
static void values_plain_##SUFFIX(const void *v_, int64_t h, const int64_t *off, int64_t len, \
                                  int g, int d, const float *probs, int64_t stride, float *out, int pf) { \
    (void)pf;                                                                                  \
    const KV_T *v = (const KV_T *)v_ + h;                                                      \
    memset(out, 0, sizeof(float) * (size_t)g * (size_t)d);                                     \
    for (int64_t t = 0; t < len; t++) {                                                        \
        const KV_T *vr = v + off[t];                                                           \
        for (int j = 0; j < g; j++) {                                                          \
            const float p = probs[j * stride + t];                                             \
            _Pragma("omp simd")                                                                \
            for (int e = 0; e < d; e++) out[j * d + e] += p * (LOAD(vr[e]) * SCALE(vr, d, e)); \
        }                                                                                      \
    }                                                                                          \
}
/* The scale of value e's group in an int8 row: float16s after the row's d bytes. */
static inline float group_scale(const int8_t *row, int d, int e) {
    uint16_t h;
    memcpy(&h, row + d + 2 * kv_int8_group_of(d, e), sizeof h);
    return f16_to_f32(h);
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define LOAD_I8(x) ((float)(x))
#define UNSCALED(row, d, e) 1.f
DEFINE_PLAIN(f32, float, LOAD_F32, UNSCALED)
DEFINE_PLAIN(bf16, uint16_t, LOAD_BF16, UNSCALED)
DEFINE_PLAIN(i8, int8_t, LOAD_I8, group_scale)

/* ---- AVX-512 (head_dim a multiple of 16 [32 for bf16 dot products], group <= 8) ------ */

#ifdef __AVX512F__
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) { return bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 load16_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline void prefetch_row(const void *p, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}
/* A pass over a head's rows asks for its first PREFETCH rows before it starts (from `from`, the
 * rows its first step does not load itself; bytes of each from base + off[t] elements of elem
 * bytes), then PREFETCH ahead as it goes. */
static inline void prefetch_first_rows(const void *base, size_t elem, const int64_t *off, int64_t from, int64_t len,
                                       size_t bytes) {
    for (int64_t t = from; t < len && t < PREFETCH; t++) prefetch_row((const char *)base + off[t] * elem, bytes);
}

/* Lane i of the result is the sum of a[i]'s lanes: 16 horizontal sums in 30 shuffles and
 * adds instead of 16 separate reductions (which dominated the score loop). */
static inline __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++) /* halves of 2 rows side by side: [a0 lo+hi | a1 lo+hi] */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* one 128-bit quarter per row */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* two lanes per row */
        e[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
    /* lane 4k + m of f holds row 4m + k */
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, f);
}

/* Scores of one query head against 16 keys at a time (fewer at the end): a partial dot
 * product per key row, then one reduce16. DOT(acc, query part c, key row, c) adds one
 * 16- or 32-wide slice. The first head of a group prefetches the rows ahead. */
#define DEFINE_SCORES(NAME, KV_T, Q_T, QPREP, DOT, STEP)                                       \
static inline __attribute__((always_inline)) void NAME##_d(const float *q, const void *k_, int64_t h,      \
        const int64_t *off, int64_t len, int g, const int d, float scale, float *scores, int64_t stride, int pf) { \
    const KV_T *k = (const KV_T *)k_ + h;                                                      \
    const __m512 sc = _mm512_set1_ps(scale);                                                   \
    for (int j = 0; j < g; j++) {                                                              \
        Q_T qv[128 / STEP]; /* head_dim <= 128 */                                              \
        for (int c = 0; c < d; c += STEP) qv[c / STEP] = QPREP(q + j * d + c);                  \
        float *sj = scores + j * stride;                                                       \
        for (int64_t t = 0; t < len; t += 16) {                                                \
            const int n = len - t < 16 ? (int)(len - t) : 16;                                 \
            __m512 acc[16];                                                                    \
            for (int u = 0; u < 16; u++) {                                                     \
                acc[u] = _mm512_setzero_ps();                                                  \
                if (u >= n) continue;                                                          \
                const KV_T *kr = k + off[t + u];                                               \
                if (j == 0 && pf && t + 16 + u < len) prefetch_row(k + off[t + 16 + u], pf * sizeof(KV_T)); \
                for (int c = 0; c < d; c += STEP) acc[u] = DOT(acc[u], qv[c / STEP], kr, c);   \
            }                                                                                  \
            _mm512_mask_storeu_ps(sj + t, (__mmask16)((1u << n) - 1), _mm512_mul_ps(reduce16(acc), sc)); \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
static void NAME(const float *q, const void *k_, int64_t h, const int64_t *off, int64_t len, int g, int d, \
                 float scale, float *scores, int64_t stride, int pf) { /* head_dim 64 unrolled */ \
    if (d == 64) NAME##_d(q, k_, h, off, len, g, 64, scale, scores, stride, pf);               \
    else NAME##_d(q, k_, h, off, len, g, d, scale, scores, stride, pf);                        \
}
#define QPREP_F32(p) _mm512_loadu_ps(p)
#define DOT_F32(a, qc, kr, c) _mm512_fmadd_ps(qc, load16_f32((kr) + (c)), a)
#define DOT_BF16_FMA(a, qc, kr, c) _mm512_fmadd_ps(qc, load16_bf16((kr) + (c)), a)
DEFINE_SCORES(scores_vec_f32, float, __m512, QPREP_F32, DOT_F32, 16)
DEFINE_SCORES(scores_vec_bf16, uint16_t, __m512, QPREP_F32, DOT_BF16_FMA, 16)
/* int8 keys, scales included: 16 rows at a time become float32 (times each row's scale) once,
 * in L1, and every query head of the group takes its dot products from there (converting
 * per head, as the macro above would, costs a group of 3 three times the conversions). */
static inline __attribute__((always_inline)) void scores_vec_i8_d(const float *q, const void *k_, int64_t h,
        const int64_t *off, int64_t len, int g, const int d, float scale, float *scores, int64_t stride, int pf) {
    const int8_t *k = (const int8_t *)k_ + h;
    const __m512 sc = _mm512_set1_ps(scale);
    float kf[16 * 128] __attribute__((aligned(64))); /* head_dim <= 128 */
    const int gs = kv_int8_group(d); /* 16 or 32 here: whole 16-wide parts */
    for (int64_t t = 0; t < len; t += 16) {
        const int n = len - t < 16 ? (int)(len - t) : 16;
        for (int u = 0; u < n; u++) {
            const int8_t *kr = k + off[t + u];
            if (pf && t + 16 + u < len) prefetch_row(k + off[t + 16 + u], (size_t)pf);
            for (int c0 = 0; c0 < d; c0 += gs) {
                const __m512 sv = _mm512_set1_ps(group_scale(kr, d, c0));
                for (int c = c0; c < c0 + gs; c += 16) _mm512_store_ps(kf + u * d + c, _mm512_mul_ps(load16_i8(kr + c), sv));
            }
        }
        for (int j = 0; j < g; j++) {
            const float *qj = q + j * d;
            __m512 acc[16];
            for (int u = 0; u < 16; u++) {
                acc[u] = _mm512_setzero_ps();
                if (u >= n) continue;
                for (int c = 0; c < d; c += 16)
                    acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c), _mm512_load_ps(kf + u * d + c), acc[u]);
            }
            _mm512_mask_storeu_ps(scores + j * stride + t, (__mmask16)((1u << n) - 1), _mm512_mul_ps(reduce16(acc), sc));
        }
    }
}
static void scores_vec_i8(const float *q, const void *k_, int64_t h, const int64_t *off, int64_t len, int g, int d,
                          float scale, float *scores, int64_t stride, int pf) {
    if (d == 64) scores_vec_i8_d(q, k_, h, off, len, g, 64, scale, scores, stride, pf);
    else scores_vec_i8_d(q, k_, h, off, len, g, d, scale, scores, stride, pf);
}

/* out[j] = sum_t p_j[t] v[t], 16 columns at a time with the group's sums in registers. An
 * int8 row's scales are applied as the row is read: here its first touch, behind the prefetch
 * (a separate pass over the scales beforehand waited on DRAM row by row). */
#define DEFINE_VALUES_VEC(SUFFIX, KV_T, SCALE_OF)                                              \
static void values_vec_##SUFFIX(const void *v_, int64_t h, const int64_t *off, int64_t len, \
                                int g, int d, const float *probs, int64_t stride, float *out, int pf) { \
    const KV_T *v = (const KV_T *)v_ + h;                                                        \
    for (int c = 0; c < d; c += 16) {                                                          \
        __m512 acc[MAX_GROUP];                                                                 \
        for (int j = 0; j < MAX_GROUP; j++) acc[j] = _mm512_setzero_ps();                      \
        for (int64_t t = 0; t < len; t++) {                                                    \
            if (c == 0 && pf && t + PREFETCH < len) prefetch_row(v + off[t + PREFETCH], pf * sizeof(KV_T));        \
            const KV_T *vr = v + off[t];                                                       \
            const __m512 vv = _mm512_mul_ps(load16_##SUFFIX(vr + c), _mm512_set1_ps(SCALE_OF(vr, d, c))); \
            for (int j = 0; j < MAX_GROUP; j++)                                                \
                if (j < g) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(probs[j * stride + t]), vv, acc[j]); \
        }                                                                                      \
        for (int j = 0; j < g; j++) _mm512_storeu_ps(out + j * d + c, acc[j]);                 \
    }                                                                                          \
}
/* SCALE_OF(row, d, c): the scale of a row's values from column c on. An int8 row passes
 * group_scale; float rows have none, so 1 (the product by 1 folds away). */
#define NO_SCALE(row, d, c) 1.f
DEFINE_VALUES_VEC(f32, float, NO_SCALE)
DEFINE_VALUES_VEC(bf16, uint16_t, NO_SCALE)
DEFINE_VALUES_VEC(i8, int8_t, group_scale)

#define X64_GROUP 6 /* query heads per kv head for values_x64: 24 sums + a row part in registers */
/* head_dim a multiple of 64, 64 columns at a time: a row's four 16-wide parts at once, every
 * head's sums in registers, one broadcast per head and row (an int8 row's two group scales
 * folded into it). Rows wider than 64 are read once per block, from cache after the first. */
#define DEFINE_VALUES_X64(SUFFIX, KV_T, SCALE_OF)                                              \
static void values_x64_##SUFFIX(const void *v_, int64_t h, const int64_t *off, int64_t len, int g, int d, \
                                const float *probs, int64_t stride, float *out, int pf) {     \
    const KV_T *v = (const KV_T *)v_ + h;                                                      \
    if (pf) prefetch_first_rows(v, sizeof(KV_T), off, 0, len, pf * sizeof(KV_T));                \
    for (int c0 = 0; c0 < d; c0 += 64) {                                                       \
        __m512 acc[X64_GROUP][4];                                                              \
        for (int j = 0; j < X64_GROUP; j++)                                                    \
            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();                       \
        for (int64_t t = 0; t < len; t++) {                                                    \
            const KV_T *vr = v + off[t];                                                       \
            if (c0 == 0 && pf && t + PREFETCH < len) prefetch_row(v + off[t + PREFETCH], pf * sizeof(KV_T)); \
            __m512 x[4];                                                                       \
            for (int c = 0; c < 4; c++) x[c] = load16_##SUFFIX(vr + c0 + 16 * c);              \
            const float s0 = SCALE_OF(vr, d, c0), s1 = SCALE_OF(vr, d, c0 + 32);               \
            for (int j = 0; j < X64_GROUP; j++) {                                              \
                if (j >= g) break;                                                             \
                const float p = probs[j * stride + t];                                         \
                const __m512 a = _mm512_set1_ps(p * s0), b = _mm512_set1_ps(p * s1);           \
                acc[j][0] = _mm512_fmadd_ps(a, x[0], acc[j][0]);                               \
                acc[j][1] = _mm512_fmadd_ps(a, x[1], acc[j][1]);                               \
                acc[j][2] = _mm512_fmadd_ps(b, x[2], acc[j][2]);                               \
                acc[j][3] = _mm512_fmadd_ps(b, x[3], acc[j][3]);                               \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < g; j++)                                                            \
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + j * d + c0 + 16 * c, acc[j][c]); \
    }                                                                                          \
}
DEFINE_VALUES_X64(f32, float, NO_SCALE)
DEFINE_VALUES_X64(bf16, uint16_t, NO_SCALE)
DEFINE_VALUES_X64(i8, int8_t, group_scale)
#endif

#ifdef __AVX512BF16__
/* bf16 keys: 32 products per instruction against the query rounded to bf16 once. */
#define QPREP_BF16(p) _mm512_cvtne2ps_pbh(_mm512_loadu_ps((p) + 16), _mm512_loadu_ps(p))
#define DOT_BF16(a, qc, kr, c) _mm512_dpbf16_ps(a, qc, (__m512bh)_mm512_loadu_si512((const void *)((kr) + (c))))
DEFINE_SCORES(scores_dot_bf16, uint16_t, __m512bh, QPREP_BF16, DOT_BF16, 32)
#endif

#if HAVE_AMX
/* AMX scores: the caller has loaded this tile configuration in its thread. */
#define AMX_SCORE_TILES 3 /* 0: scores [16 rows][16 heads]; 1: 16 key rows x 32 dims; 2: queries */

/* Column j of a stored [16 rows][16 heads] score tile: head j's scores of the 16 rows. */
static inline __m512 tile_column(const float *c, int j) {
    const __m512i rows = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    return _mm512_i32gather_ps(rows, c + j, 4);
}

/* bf16 keys, for a run of rows of one sequence (one row when decoding; row r's heads to scores +
 * r * g * stride): 16 rows of a page are one A tile (a row stride apart), and one tile product with
 * up to 16 / g rows' query groups side by side in the B tile's columns gives all their scores for
 * those keys: no horizontal sums, and a key tile loaded and multiplied once for all the rows. A
 * tile's columns are independent sums, so a row's scores do not depend on the rows beside it.
 * Runs of 16 keys that are not evenly spaced (pages shorter than 16 tokens) and each row's last
 * partial run take the dot-product kernel. */
static void scores_amx_bf16_run(const float *const *qs, const int64_t *lens, int rows, const void *k_, int64_t h,
                                const int64_t *off, int g, int d, float scale, float *scores, int64_t stride,
                                int pf) {
    const uint16_t *k = (const uint16_t *)k_ + h;
    const int blocks = d / 32, per_pass = 16 / g;
    uint32_t b[4][256] __attribute__((aligned(64)));
    float c[256] __attribute__((aligned(64)));
    const __m512 sc = _mm512_set1_ps(scale);
    for (int r0 = 0; r0 < rows; r0 += per_pass) {
        const int rn = rows - r0 < per_pass ? rows - r0 : per_pass;
        const int64_t longest = lens[r0 + rn - 1];
        query_tiles(qs + r0, rn, g, d, b);
        if (pf && r0 == 0) prefetch_first_rows(k, sizeof(uint16_t), off, 16, longest, pf * sizeof(uint16_t));
        for (int64_t t = 0; t + 16 <= longest; t += 16) {
            const int64_t step = off[t + 1] - off[t];
            if (pf && r0 == 0)
                for (int u = 0; u < 16 && t + PREFETCH + u < longest; u++) prefetch_row(k + off[t + PREFETCH + u], pf * sizeof(uint16_t));
            int even = step > 0;
            for (int u = 2; u < 16; u++) even &= off[t + u] == off[t] + u * step;
            if (!even) {
                for (int r = 0; r < rn; r++)
                    if (t + 16 <= lens[r0 + r])
                        scores_dot_bf16(qs[r0 + r], k_, h, off + t, 16, g, d, scale,
                                        scores + (int64_t)(r0 + r) * g * stride + t, stride, 0);
                continue;
            }
            _tile_zero(0);
            for (int blk = 0; blk < blocks; blk++) {
                _tile_loadd(1, k + off[t] + 32 * blk, step * (int64_t)sizeof(uint16_t));
                _tile_loadd(2, b[blk], 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, c, 64);
            __m512i col[16]; /* col[r * g + j]: the 16 keys' scores of row r's head j */
            const int transposed = rn * g > 4; /* else a few gathers cost less than the transpose */
            if (transposed) {
                for (int u = 0; u < 16; u++) col[u] = _mm512_load_si512((const __m512i *)(c + 16 * u));
                transpose16(col);
            }
            for (int r = 0; r < rn; r++)
                if (t + 16 <= lens[r0 + r])
                    for (int j = 0; j < g; j++)
                        _mm512_storeu_ps(scores + (int64_t)((r0 + r) * g + j) * stride + t,
                                         _mm512_mul_ps(transposed ? _mm512_castsi512_ps(col[r * g + j])
                                                                  : tile_column(c, r * g + j), sc));
        }
        for (int r = 0; r < rn; r++) {
            const int64_t len = lens[r0 + r], tail = len / 16 * 16;
            if (tail < len)
                scores_dot_bf16(qs[r0 + r], k_, h, off + tail, len - tail, g, d, scale,
                                scores + (int64_t)(r0 + r) * g * stride + tail, stride, r0 + r == 0 ? pf : 0);
        }
    }
}

static void scores_amx_bf16(const float *q, const void *k_, int64_t h, const int64_t *off, int64_t len, int g, int d,
                            float scale, float *scores, int64_t stride, int pf) {
    scores_amx_bf16_run(&q, &len, 1, k_, h, off, g, d, scale, scores, stride, pf);
}

/* int8 keys on AMX: 16 rows at a time become bf16 (exact: |q| <= 127) in L1, one tile product
 * per 32-value group gives the group's part of every head's scores, and each part is scaled
 * by its row's group scale as the parts are summed. The query is rounded to bf16, as for a
 * bf16 cache. Rows need not be evenly spaced: they are copied. */
static void scores_amx_i8(const float *q, const void *k_, int64_t h, const int64_t *off, int64_t len, int g, int d,
                          float scale, float *scores, int64_t stride, int pf) {
    const int8_t *k = (const int8_t *)k_ + h;
    const int blocks = d / 32;
    uint32_t b[4][256] __attribute__((aligned(64)));
    uint16_t a[4][16 * 32] __attribute__((aligned(64))); /* per group: 16 rows of 32 bf16 */
    float c[4][256] __attribute__((aligned(64)));
    float gs[4][16] __attribute__((aligned(64))); /* group scales per row */
    query_tiles(&q, 1, g, d, b);
    memset(a, 0, sizeof a); /* rows past a short context's end stay finite */
    memset(gs, 0, sizeof gs);
    const __m512 sc = _mm512_set1_ps(scale);
    if (pf) prefetch_first_rows(k, 1, off, 16, len, (size_t)pf);
    for (int64_t t = 0; t < len; t += 16) {
        const int n = len - t < 16 ? (int)(len - t) : 16;
        for (int u = 0; u < n; u++) {
            const int8_t *kr = k + off[t + u];
            if (pf && t + PREFETCH + u < len) prefetch_row(k + off[t + PREFETCH + u], (size_t)pf);
            for (int blk = 0; blk < blocks; blk++) {
                _mm512_store_si512((__m512i *)(a[blk] + u * 32), i8x32_to_bf16(kr, d, 32 * blk, 0));
                gs[blk][u] = group_scale(kr, d, 32 * blk);
            }
        }
        for (int blk = 0; blk < blocks; blk++) {
            _tile_zero(0);
            _tile_loadd(1, a[blk], 64);
            _tile_loadd(2, b[blk], 64);
            _tile_dpbf16ps(0, 1, 2);
            _tile_stored(0, c[blk], 64);
        }
        for (int j = 0; j < g; j++) {
            __m512 s = _mm512_setzero_ps();
            for (int blk = 0; blk < blocks; blk++)
                s = _mm512_fmadd_ps(tile_column(c[blk], j), _mm512_load_ps(gs[blk]), s);
            _mm512_mask_storeu_ps(scores + j * stride + t, (__mmask16)((1u << n) - 1), _mm512_mul_ps(s, sc));
        }
    }
}
#endif

/* (q, cache, head offset, row offsets, len, group, head_dim, scale, out, stride) */
/* ..., pf: elements of each context row to prefetch from this head on (0: none, the rows
 * are in cache already because an earlier row of the same run fetched them) */
typedef void (*scores_fn)(const float *, const void *, int64_t, const int64_t *, int64_t, int, int, float, float *,
                          int64_t, int);
typedef void (*values_fn)(const void *, int64_t, const int64_t *, int64_t, int, int, const float *, int64_t, float *,
                          int);

static void pick_kernels(int kv_kind, int g, int d, scores_fn *scores, values_fn *values) {
    const scores_fn plain_scores[] = {scores_plain_f32, scores_plain_bf16, scores_plain_i8};
    const values_fn plain_values[] = {values_plain_f32, values_plain_bf16, values_plain_i8};
    *scores = plain_scores[kv_kind];
    *values = plain_values[kv_kind];
#ifdef __AVX512F__
    const scores_fn vec_scores[] = {scores_vec_f32, scores_vec_bf16, scores_vec_i8};
    const values_fn vec_values[] = {values_vec_f32, values_vec_bf16, values_vec_i8};
    if (d % 16 == 0 && d <= 128) *scores = vec_scores[kv_kind];
    if (g <= MAX_GROUP && d % 16 == 0) *values = vec_values[kv_kind];
    const values_fn x64_values[] = {values_x64_f32, values_x64_bf16, values_x64_i8};
    if (d % 64 == 0 && g <= X64_GROUP) *values = x64_values[kv_kind];
#endif
#ifdef __AVX512BF16__
    if (kv_kind == KV_BF16 && d % 32 == 0 && d <= 128) *scores = scores_dot_bf16;
#endif
#if HAVE_AMX
    if (kv_kind == KV_BF16 && d % 32 == 0 && d <= 128 && g <= 16 && amx_ready()) *scores = scores_amx_bf16;
    if (kv_kind == KV_INT8 && d % 32 == 0 && d <= 128 && g <= 16 && amx_ready()) *scores = scores_amx_i8;
#endif
}

/* p[t] := exp(p[t] - max) over a row of scores; returns 1 / sum, which the caller applies to
 * the value sums (one multiply per output, not a pass over the probabilities). */
static float exp_minus_max(float *p, int64_t len) {
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-FLT_MAX);
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 k = len - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - t)) - 1);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, p + t));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sv = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 k = len - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + t), m));
        _mm512_mask_storeu_ps(p + t, k, e);
        sv = _mm512_mask_add_ps(sv, k, sv, e);
    }
    return 1.f / _mm512_reduce_add_ps(sv);
#else
    float m = -FLT_MAX, sum = 0.f;
    for (int64_t t = 0; t < len; t++) m = p[t] > m ? p[t] : m;
    for (int64_t t = 0; t < len; t++) { p[t] = expf(p[t] - m); sum += p[t]; }
    return 1.f / sum;
#endif
}

/* Runs of rows of one sequence (the tokens of a speculative proposal being verified, or of a
 * prompt chunk on a CPU without the chunk kernel: the same block-table row, each context one
 * longer than the one before) are one work item's rows: their keys and values come from memory
 * once, for the first row, and from cache for the others, where one item per row read the whole
 * context again per row. Each row is still attended on its own, exactly as decoding it would be.
 * Runs are cut into pieces when there are too few of them to keep every thread busy. */
#define RUN_MAX 16
typedef struct { int64_t first, count; } row_run;

static int64_t row_runs(const int64_t *rows, int64_t n, int64_t want, row_run *out) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (m > 0 && out[m - 1].count < RUN_MAX && rows[3 * i + 1] == rows[3 * (i - 1) + 1] &&
            rows[3 * i + 2] == rows[3 * (i - 1) + 2] + 1)
            out[m - 1].count++;
        else
            out[m++] = (row_run){i, 1};
    }
    if (m == 0 || m >= want) return m;
    row_run *whole = malloc(sizeof(row_run) * (size_t)m);
    memcpy(whole, out, sizeof(row_run) * (size_t)m);
    const int64_t pieces = (want + m - 1) / m; /* per run */
    int64_t k = 0;
    for (int64_t r = 0; r < m; r++) {
        const int64_t size = (whole[r].count + pieces - 1) / pieces;
        for (int64_t a = 0; a < whole[r].count; a += size)
            out[k++] = (row_run){whole[r].first + a, whole[r].count - a < size ? whole[r].count - a : size};
    }
    free(whole);
    return k;
}

/* rows[i] = {token index in q/out, block-table row, context length}; q float32, out float32
 * or (out_bf16) bfloat16, ready for a bf16 output projection. */
void paged_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            int kv_kind, const int64_t *block_table, int64_t bt_stride, const int64_t *rows,
                            int64_t n, void *out, int out_bf16, int64_t out_stride, int hq, int hk, int d,
                            int page_size, float scale, int max_len, int num_threads) {
    const int g = hq / hk;
    row_run *runs = malloc(sizeof(row_run) * (size_t)(n > 0 ? n : 1));
    const int64_t n_runs = row_runs(rows, n, (2 * num_threads + hk - 1) / hk, runs);
    /* few runs: one item per kv head, so every thread has work */
    const int heads_per_item = n_runs >= 2 * num_threads ? hk : 1;
    const int items_per_run = hk / heads_per_item;
    const int hd = kv_kind == KV_INT8 ? kv_int8_row_bytes(d) : d; /* elements per head row */
    const int64_t row_stride = (int64_t)hk * hd;                     /* elements per token in the pool */
    scores_fn scores_of;
    values_fn values_of;
    pick_kernels(kv_kind, g, d, &scores_of, &values_of);
#if HAVE_AMX
    const int run_scores = scores_of == scores_amx_bf16;
#else
    const int run_scores = 0;
#endif
    int64_t longest_run = 1;
    for (int64_t r = 0; r < n_runs; r++) longest_run = runs[r].count > longest_run ? runs[r].count : longest_run;
    _Pragma("omp parallel num_threads(num_threads)")
    {
        /* scores, then probabilities: a row's, or a whole run's where it is scored at once */
        float *probs = malloc(sizeof(float) * (size_t)(run_scores ? longest_run : 1) * (size_t)g * (size_t)max_len);
        int64_t *off = malloc(sizeof(int64_t) * (size_t)max_len);
        float *acc = malloc(sizeof(float) * (size_t)g * (size_t)d); /* bf16 output: rounded from here */
        float *inv = malloc(sizeof(float) * (size_t)g);              /* per head: 1 / its softmax sum */
#if HAVE_AMX
        const int amx_scores = scores_of == scores_amx_bf16 || scores_of == scores_amx_i8;
        if (amx_scores) load_tile_config(AMX_SCORE_TILES);
#endif
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t item = 0; item < n_runs * items_per_run; item++) {
            const row_run run = runs[item / items_per_run];
            const int h0 = (int)(item % items_per_run) * heads_per_item;
            const int64_t *pages = block_table + rows[3 * run.first + 1] * bt_stride;
            const int64_t longest = rows[3 * (run.first + run.count - 1) + 2];
            for (int64_t t = 0, p = 0; t < longest; p++)
                for (int u = 0; u < page_size && t < longest; u++, t++) off[t] = (pages[p] * page_size + u) * row_stride;
            for (int kh = h0; kh < h0 + heads_per_item; kh++) {
                const int64_t head = (int64_t)kh * hd;
                /* a run's scores in one pass over its keys where the kernel allows, else row by row */
                const int together = run.count > 1 && run_scores;
#if HAVE_AMX
                if (together) {
                    const float *qs[RUN_MAX];
                    int64_t lens[RUN_MAX];
                    for (int r = 0; r < run.count; r++) {
                        qs[r] = q + rows[3 * (run.first + r)] * q_stride + (int64_t)kh * g * d;
                        lens[r] = rows[3 * (run.first + r) + 2];
                    }
                    scores_amx_bf16_run(qs, lens, (int)run.count, k_cache, head, off, g, d, scale, probs, max_len,
                                        hd);
                }
#endif
                for (int64_t i = run.first; i < run.first + run.count; i++) {
                    const int64_t tok = rows[3 * i], len = rows[3 * i + 2];
                    const float *qh = q + tok * q_stride + (int64_t)kh * g * d;
                    const int64_t o = tok * out_stride + (int64_t)kh * g * d;
                    float *oh = out_bf16 ? acc : (float *)out + o;
                    /* each head fetches its own part of the rows, for the first row of a run: the
                     * memory traffic spread over every head's passes (one head fetching the whole
                     * rows left memory idle while the others ran: 1.15x at 64 x 192 tokens,
                     * 1.4x at 2K) */
                    const int pf = i == run.first ? hd : 0;
                    float *p = together ? probs + (i - run.first) * g * max_len : probs;
                    if (!together) scores_of(qh, k_cache, head, off, len, g, d, scale, p, max_len, pf);
                    for (int j = 0; j < g; j++) inv[j] = exp_minus_max(p + j * max_len, len);
                    values_of(v_cache, head, off, len, g, d, p, max_len, oh, pf);
                    for (int j = 0; j < g; j++)
                        for (int e = 0; e < d; e++) oh[j * d + e] *= inv[j];
                    if (out_bf16)
                        for (int e = 0; e < g * d; e++) ((uint16_t *)out)[o + e] = f32_to_bf16(acc[e]);
                }
            }
        }
#if HAVE_AMX
        if (amx_scores) _tile_release();
#endif
        free(probs);
        free(off);
        free(acc);
        free(inv);
    }
    free(runs);
}
