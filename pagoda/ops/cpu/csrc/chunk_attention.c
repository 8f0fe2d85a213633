/* Prefill-chunk attention straight from the paged KV cache, on AMX tiles (CPU).
 *
 * A prompt chunk of many tokens attends to its whole context: compute-bound work (two
 * matrix products per query over every key), which the decode kernel (paged_attention.c)
 * would do one query at a time and torch's SDPA only after gathering the context out of
 * the pages into a contiguous copy, every layer. Here the keys and values are read in place
 * and both products are bf16 tile products, flash-attention style:
 *
 * - A query block is 16 rows, a row being one (query token, query head) pair of one kv
 *   head's group (GQA: the group's heads share every K/V tile), the queries rounded to bf16
 *   once. A work item is a sequence, a kv head and up to MAX_BLOCKS consecutive query blocks,
 *   which share each K/V tile while it is in L1: the context is read once per item.
 * - Keys come KEY_TILE at a time. Scores are computed transposed, S^T = K Q^T ([key][row]):
 *   16 bf16 key rows of a page are an A tile loaded in place (a row stride apart), and the
 *   online softmax (running max and sum per row, float32) is then lane-wise over 16 rows,
 *   with no horizontal reductions. Causal masking applies only to keys inside the chunk
 *   (key position <= query position); a block stops at its last query's position.
 * - Probabilities are rounded to bf16, transposed in registers into the A tile of P V, and
 *   the values repacked per tile into AMX's pair layout (VNNI) in L1; the output rows stay
 *   float32 in L1, loaded into C tiles for each product and rescaled only when a row's
 *   maximum grows.
 * - int8 caches (kv_kind, kernels.h): key rows become bf16 exactly in L1 and each 32-value
 *   group's partial scores are scaled by the row's group scale, as scores_amx_i8 does; value
 *   rows are dequantized to bf16 (the rounding the SDPA path applies to them too).
 *
 * Returns 0, computing nothing, where the build or CPU has no AMX or the shape does not fit
 * (head_dim not a multiple of 32 or above 128, more than 16 query heads per kv head): the
 * caller then uses torch's SDPA, which stays the reference (tests/unit/test_chunk_attention.py).
 *
 * Built by pagoda/ops/cpu/native.py (FLAGS there: -O3 -march=native -ffast-math -fopenmp, ...); called
 * through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "simd.h"
#include "attention_tiles.h"
#include "kernels.h"

#if HAVE_AMX

#define KEY_TILE 32   /* keys per step: the depth of one P V product */
#define MAX_BLOCKS 8  /* query blocks per work item: their output rows (64 KiB at head_dim 128) stay in L1/L2 */
#define MAX_D 128
#define NEG_BIG (-1e30f) /* a masked score: exp2 of it minus any maximum is 0 */
/* tiles: 0, 1 scores of keys 0-15 and 16-31; 2 A operand (keys, then probabilities);
 * 3 B operand (queries, then values); 4-7 output columns */
#define TILES 8

typedef struct {
    const float *q;
    int64_t q_stride;
    const void *k, *v;
    int kv_kind;
    const int64_t *block_table;
    int64_t bt_stride;
    void *out;
    int out_bf16;
    int64_t out_stride;
    int g, d, hd, page_size, tokens_per_block;
    int64_t row_stride; /* elements per token in the pool */
    float scale2;       /* the softmax scale times log2(e): scores are exponentiated base 2 */
} chunk_args;

typedef struct { /* one thread's working set, 64-byte aligned */
    uint32_t qt[MAX_BLOCKS][MAX_D / 32][256]; /* queries as B tiles: row r holds dims 2r, 2r+1 of the 16 rows */
    float acc[MAX_BLOCKS][16 * MAX_D];        /* unnormalised outputs, [row][d] */
    float m[MAX_BLOCKS][16], l[MAX_BLOCKS][16];
    int32_t qpos[MAX_BLOCKS][16]; /* each row's position in its sequence */
    uint16_t kb[2][16 * MAX_D];   /* key rows copied or converted to bf16 */
    float ks[2][MAX_D / 32][16];  /* int8 keys: each row's group scales */
    uint32_t vt[MAX_D / 16][256]; /* values in pair layout: [key pair][16 columns] per 16 columns */
    float s[2][MAX_D / 32][256];  /* stored score tiles (int8: one per group) */
    uint16_t pa[16 * 32];         /* probabilities, [row][key] */
    int64_t *off; /* pool offsets (elements) of the context's rows for the item's kv head */
} scratch;

/* 2^x for x <= 0 (a degree-5 polynomial on the fraction: relative error ~2e-6, well under
 * the bf16 rounding the probabilities get); very negative x gives 0. */
static inline __m512 exp2_neg(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* word indices 0, b, 1, b+1, ..., 15, b+15: interleave words 0-15 with words b-b+15 */
static inline __m512i interleave_words(int b) {
    uint16_t idx[32];
    for (int e = 0; e < 16; e++) idx[2 * e] = (uint16_t)e, idx[2 * e + 1] = (uint16_t)(b + e);
    return _mm512_loadu_si512(idx);
}

/* 32 values of a value row from column c as bf16 (zeros past the tile's keys) */
static inline __m512i value_bf16(const chunk_args *a, const int64_t *off, int u, int nk, int c) {
    if (u >= nk) return _mm512_setzero_si512();
    if (a->kv_kind == KV_BF16) return _mm512_loadu_si512((const uint16_t *)a->v + off[u] + c);
    return i8x32_to_bf16((const int8_t *)a->v + off[u], a->d, c, 1);
}

/* Keys kt..kt+nk-1 of the tile (of the item's keys before end; pool offsets in w->off): key A
 * tiles (in place where 16 bf16 rows are evenly spaced, else copied; int8 rows converted),
 * values in pair layout; the next tile's rows are prefetched. */
static void stage_tile(const chunk_args *a, int64_t kt, int nk, int64_t end, scratch *w,
                       const uint16_t *kptr[2], int64_t kstride[2]) {
    const int d = a->d;
    const int64_t *off = w->off + kt;
    const int es = a->kv_kind == KV_BF16 ? 2 : 1; /* bytes per element */
    for (int64_t t = KEY_TILE; t < 2 * KEY_TILE && kt + t < end; t++) /* the next tile's rows */
        for (int b = 0; b < a->hd * es; b += 64) {
            _mm_prefetch((const char *)a->k + off[t] * es + b, _MM_HINT_T0);
            _mm_prefetch((const char *)a->v + off[t] * es + b, _MM_HINT_T0);
        }
    for (int h = 0; h * 16 < nk; h++) {
        const int n = nk - 16 * h < 16 ? nk - 16 * h : 16;
        const int64_t *ho = off + 16 * h;
        if (a->kv_kind == KV_BF16) {
            const int64_t step = ho[1] - ho[0];
            int even = n == 16 && step > 0;
            for (int u = 2; u < n && even; u++) even = ho[u] == ho[0] + u * step;
            if (even) {
                kptr[h] = (const uint16_t *)a->k + ho[0], kstride[h] = step * 2;
                continue;
            }
            for (int u = 0; u < n; u++) memcpy(w->kb[h] + u * d, (const uint16_t *)a->k + ho[u], 2 * (size_t)d);
        } else {
            for (int u = 0; u < n; u++) {
                const int8_t *kr = (const int8_t *)a->k + ho[u];
                for (int c = 0; c < d; c += 32) {
                    _mm512_storeu_si512(w->kb[h] + u * d + c, i8x32_to_bf16(kr, d, c, 0));
                    uint16_t sh;
                    memcpy(&sh, kr + d + 2 * (c / 32), sizeof sh);
                    w->ks[h][c / 32][u] = f16_to_f32(sh);
                }
            }
        }
        memset(w->kb[h] + n * d, 0, 2 * (size_t)(16 - n) * (size_t)d); /* rows past the context: finite */
        kptr[h] = w->kb[h], kstride[h] = 2 * (int64_t)d;
    }
    const __m512i lo = interleave_words(32), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int r = 0; r < KEY_TILE / 2; r++) /* pair r: keys 2r and 2r+1, word by word */
        for (int c = 0; c < d; c += 32) {
            const __m512i x = value_bf16(a, off, 2 * r, nk, c), y = value_bf16(a, off, 2 * r + 1, nk, c);
            _mm512_store_si512(w->vt[c / 16] + 16 * r, _mm512_permutex2var_epi16(x, lo, y));
            _mm512_store_si512(w->vt[c / 16 + 1] + 16 * r, _mm512_permutex2var_epi16(x, hi, y));
        }
}

/* output columns c and c+1 of the block += P V, in C tiles T0 and T1 (tile numbers are immediates) */
#define PV_PAIR(T0, T1, c)                                            \
    do {                                                              \
        _tile_loadd(T0, acc + 16 * (c), astride);                     \
        _tile_loadd(3, w->vt[c], 64);                                 \
        _tile_dpbf16ps(T0, 2, 3);                                     \
        _tile_loadd(T1, acc + 16 * ((c) + 1), astride);               \
        _tile_loadd(1, w->vt[(c) + 1], 64);                           \
        _tile_dpbf16ps(T1, 2, 1);                                     \
        _tile_stored(T0, acc + 16 * (c), astride);                    \
        _tile_stored(T1, acc + 16 * ((c) + 1), astride);              \
    } while (0)

/* scores of dims 32 blk.. for both halves of the keys: queries in tile TQ, keys in TK0, TK1 */
#define QK_STEP(TQ, TK0, TK1, blk)                                    \
    do {                                                              \
        _tile_loadd(TQ, w->qt[bi][blk], 64);                          \
        _tile_loadd(TK0, kptr[0] + 32 * (blk), kstride[0]);           \
        _tile_dpbf16ps(0, TK0, TQ);                                   \
        if (halves > 1) {                                             \
            _tile_loadd(TK1, kptr[1] + 32 * (blk), kstride[1]);       \
            _tile_dpbf16ps(1, TK1, TQ);                               \
        }                                                             \
    } while (0)

/* One query block against the staged tile: scores, online softmax, then P V into acc. */
static void block_step(const chunk_args *a, scratch *w, int bi, int64_t kt, int nk, const uint16_t *kptr[2],
                       const int64_t kstride[2]) {
    const int d = a->d, blocks = d / 32, halves = nk > 16 ? 2 : 1, i8 = a->kv_kind == KV_INT8;
    if (!i8) {
        _tile_zero(0);
        _tile_zero(1);
    }
    for (int blk = 0; blk < blocks; blk++) { /* both halves at once: two independent sums */
        if (i8) {
            _tile_zero(0);
            _tile_zero(1);
        }
        if (blk & 1)
            QK_STEP(4, 6, 7, blk);
        else
            QK_STEP(3, 2, 5, blk);
        if (i8 || blk == blocks - 1) {
            _tile_stored(0, w->s[0][i8 ? blk : 0], 64);
            if (halves > 1) _tile_stored(1, w->s[1][i8 ? blk : 0], 64);
        }
    }
    const __m512i qpos = _mm512_load_si512(w->qpos[bi]);
    const int32_t first = w->qpos[bi][0];
    const __m512 sc = _mm512_set1_ps(a->scale2);
    __m512 p[KEY_TILE], mt = _mm512_set1_ps(NEG_BIG);
    for (int k = 0; k < nk; k++) {
        const int h = k / 16, u = k % 16;
        __m512 s;
        if (a->kv_kind == KV_BF16) {
            s = _mm512_load_ps(w->s[h][0] + 16 * u);
        } else {
            s = _mm512_mul_ps(_mm512_load_ps(w->s[h][0] + 16 * u), _mm512_set1_ps(w->ks[h][0][u]));
            for (int blk = 1; blk < blocks; blk++)
                s = _mm512_fmadd_ps(_mm512_load_ps(w->s[h][blk] + 16 * u), _mm512_set1_ps(w->ks[h][blk][u]), s);
        }
        s = _mm512_mul_ps(s, sc);
        if (kt + k > first) /* a key of the chunk: hidden from rows before it */
            s = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(qpos, _mm512_set1_epi32((int32_t)(kt + k))), s,
                                     _mm512_set1_ps(NEG_BIG));
        p[k] = s;
        mt = _mm512_max_ps(mt, s);
    }
    const __m512 m_old = _mm512_load_ps(w->m[bi]), m_new = _mm512_max_ps(m_old, mt);
    const __m512 alpha = exp2_neg(_mm512_sub_ps(m_old, m_new));
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < KEY_TILE; k++) {
        p[k] = k < nk ? exp2_neg(_mm512_sub_ps(p[k], m_new)) : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, p[k]);
    }
    _mm512_store_ps(w->l[bi], _mm512_fmadd_ps(_mm512_load_ps(w->l[bi]), alpha, sum));
    _mm512_store_ps(w->m[bi], m_new);
    if (_mm512_cmp_ps_mask(m_new, m_old, _CMP_GT_OQ)) { /* some row's maximum grew: rescale its sums */
        float al[16] __attribute__((aligned(64)));
        _mm512_store_ps(al, alpha);
        for (int r = 0; r < 16; r++) {
            if (al[r] == 1.f) continue;
            float *o = w->acc[bi] + r * d;
            for (int c = 0; c < d; c += 16) _mm512_store_ps(o + c, _mm512_mul_ps(_mm512_load_ps(o + c), _mm512_set1_ps(al[r])));
        }
    }
    /* P as an A tile: key pairs as dwords (lane = row), then rows as dwords (lane = key pair) */
    const __m512i pair = interleave_words(16);
    __m512i pr[16];
    for (int k = 0; k < 16; k++)
        pr[k] = _mm512_permutexvar_epi16(pair, (__m512i)_mm512_cvtne2ps_pbh(p[2 * k + 1], p[2 * k]));
    transpose16(pr);
    for (int r = 0; r < 16; r++) _mm512_store_si512(w->pa + 32 * r, pr[r]);
    _tile_loadd(2, w->pa, 64);
    float *acc = w->acc[bi];
    const int64_t astride = 4 * (int64_t)d;
    for (int c = 0; c < d / 16; c += 2) /* two output columns at a time, tiles 4-5 and 6-7 by turns */
        if (c & 2)
            PV_PAIR(6, 7, c);
        else
            PV_PAIR(4, 5, c);
}

/* Query blocks b0..b1-1 of sequence `row` (see paged_chunk_attention) for kv head kh. */
static void chunk_item(const chunk_args *a, const int64_t *row, int kh, int b0, int b1, scratch *w) {
    const int g = a->g, d = a->d, tpb = a->tokens_per_block;
    const int64_t tok = row[0], qlen = row[2], len = row[3], prefix = len - qlen;
    const int64_t *pages = a->block_table + row[1] * a->bt_stride;
    for (int bi = 0; bi < b1 - b0; bi++) {
        const int64_t t0 = (int64_t)(b0 + bi) * tpb;
        const int nt = qlen - t0 < tpb ? (int)(qlen - t0) : tpb;
        const float *qs[16]; /* the block's tokens' query groups: row r is token r / g's head r % g */
        for (int i = 0; i < nt; i++) qs[i] = a->q + (tok + t0 + i) * a->q_stride + (int64_t)kh * g * d;
        query_tiles(qs, nt, g, d, w->qt[bi]);
        memset(w->acc[bi], 0, sizeof(float) * 16 * (size_t)d);
        for (int r = 0; r < 16; r++) {
            w->m[bi][r] = NEG_BIG, w->l[bi][r] = 0.f;
            w->qpos[bi][r] = (int32_t)(prefix + t0 + (r < nt * g ? r / g : nt - 1)); /* padding: the last row's */
        }
    }
    const int64_t end = w->qpos[b1 - b0 - 1][15] + 1; /* keys the last row sees */
    const int64_t head = (int64_t)kh * a->hd;
    for (int64_t t = 0, p = 0; t < end; p++)
        for (int u = 0; u < a->page_size && t < end; u++, t++)
            w->off[t] = (pages[p] * a->page_size + u) * a->row_stride + head;
    for (int64_t kt = 0; kt < end; kt += KEY_TILE) {
        const int nk = end - kt < KEY_TILE ? (int)(end - kt) : KEY_TILE;
        const uint16_t *kptr[2];
        int64_t kstride[2];
        stage_tile(a, kt, nk, end, w, kptr, kstride);
        for (int bi = 0; bi < b1 - b0; bi++) {
            const int64_t visible = w->qpos[bi][15] + 1 - kt; /* keys of this tile the block's last row sees */
            if (visible > 0) block_step(a, w, bi, kt, visible < nk ? (int)visible : nk, kptr, kstride);
        }
    }
    for (int bi = 0; bi < b1 - b0; bi++) {
        const int64_t t0 = (int64_t)(b0 + bi) * tpb;
        const int rows = (qlen - t0 < tpb ? (int)(qlen - t0) : tpb) * g;
        for (int r = 0; r < rows; r++) {
            const __m512 inv = _mm512_set1_ps(1.f / w->l[bi][r]);
            const int64_t o = (tok + t0 + r / g) * a->out_stride + ((int64_t)kh * g + r % g) * d;
            for (int c = 0; c < d; c += 16) {
                const __m512 y = _mm512_mul_ps(_mm512_load_ps(w->acc[bi] + r * d + c), inv);
                if (a->out_bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + o + c), f32_to_bf16x16(y));
                else
                    _mm512_storeu_ps((float *)a->out + o + c, y);
            }
        }
    }
}
#endif

/* rows[i] = {first token index in q/out, block-table row, query length, context length} of
 * each chunk (its tokens are the context's last ones, already in the cache); q float32
 * [tokens][hq][d] rows q_stride apart, out float32 or (out_bf16) bfloat16. Returns 1, or 0
 * where it cannot serve (see above) and did nothing. */
int paged_chunk_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_kind,
                          const int64_t *block_table, int64_t bt_stride, const int64_t *rows, int64_t n, void *out,
                          int out_bf16, int64_t out_stride, int hq, int hk, int d, int page_size, float scale,
                          int num_threads) {
#if HAVE_AMX
    const int g = hq / hk;
    if ((kv_kind != KV_BF16 && kv_kind != KV_INT8) || d % 32 || d > MAX_D || g > 16 || !amx_ready()) return 0;
    const chunk_args a = {q, q_stride, k_cache, v_cache, kv_kind, block_table, bt_stride, out, out_bf16, out_stride,
                          g, d, kv_kind == KV_INT8 ? kv_int8_row_bytes(d) : d, page_size, 16 / g,
                          (int64_t)hk * (kv_kind == KV_INT8 ? kv_int8_row_bytes(d) : d), scale * 1.44269504f};
    /* work items: (sequence, kv head, run of query blocks), short runs when there are few blocks */
    int64_t total = 0, max_len = 0;
    for (int64_t i = 0; i < n; i++) {
        total += (rows[4 * i + 2] + a.tokens_per_block - 1) / a.tokens_per_block * hk;
        max_len = rows[4 * i + 3] > max_len ? rows[4 * i + 3] : max_len;
    }
    int64_t per_item = total / (4 * (int64_t)num_threads);
    per_item = per_item < 1 ? 1 : per_item > MAX_BLOCKS ? MAX_BLOCKS : per_item;
    int64_t items = 0;
    for (int64_t i = 0; i < n; i++)
        items += (rows[4 * i + 2] + a.tokens_per_block * per_item - 1) / (a.tokens_per_block * per_item) * hk;
    int64_t(*item)[3] = malloc(sizeof(*item) * (size_t)items); /* {sequence, kv head, first block} */
    for (int64_t i = 0, it = 0; i < n; i++) {
        const int64_t blocks = (rows[4 * i + 2] + a.tokens_per_block - 1) / a.tokens_per_block;
        for (int kh = 0; kh < hk; kh++)
            for (int64_t b = 0; b < blocks; b += per_item) item[it][0] = i, item[it][1] = kh, item[it++][2] = b;
    }
    _Pragma("omp parallel num_threads(num_threads)")
    {
        scratch *w = aligned_alloc(64, sizeof(scratch));
        w->off = malloc(sizeof(int64_t) * (size_t)max_len);
        load_tile_config(TILES);
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t it = 0; it < items; it++) {
            const int64_t *row = rows + 4 * item[it][0];
            const int64_t blocks = (row[2] + a.tokens_per_block - 1) / a.tokens_per_block, b0 = item[it][2];
            chunk_item(&a, row, (int)item[it][1], (int)b0, (int)(b0 + per_item < blocks ? b0 + per_item : blocks), w);
        }
        _tile_release();
        free(w->off);
        free(w);
    }
    free(item);
    return 1;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)kv_kind, (void)block_table, (void)bt_stride;
    (void)rows, (void)n, (void)out, (void)out_bf16, (void)out_stride, (void)hq, (void)hk, (void)d, (void)page_size;
    (void)scale, (void)num_threads;
    return 0;
#endif
}
