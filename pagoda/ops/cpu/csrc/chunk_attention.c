/* Prefill-chunk attention straight from the paged KV cache, on bf16 tile products (CPU): AMX
 * tiles, or their AVX512-BF16 vector form where the CPU has no AMX (vec_tile_dp, amx.h).
 *
 * A prompt chunk of many tokens attends to its whole context: compute-bound work (two
 * matrix products per query over every key), which the decode kernel (paged_attention.c)
 * would do one query at a time and torch's SDPA only after gathering the context out of
 * the pages into a contiguous copy, every layer. Here the keys and values are read in place
 * and both products are bf16 tile products, flash-attention style:
 *
 * - A query block is 16 rows, a row being one (query token, query head) pair of one kv
 *   head's group (GQA: the group's heads share every K/V tile), the queries rounded to bf16
 *   once. A work item is a sequence, a kv head, up to MAX_BLOCKS consecutive query blocks
 *   and one split of the context (SPLIT_KEYS keys at fixed boundaries). The item stages
 *   CHUNK_KEYS keys at a time (values transposed; bf16 key rows stay in place, their pages
 *   holding 16 consecutive keys a tile, else they are copied side by side) and every one of
 *   its blocks passes over them while they are in cache, so the context comes from memory
 *   once per item. Rows over several splits get each split's partial sums merged at the end
 *   (flash-decoding); the boundaries are fixed, so a row's sums never depend on how the work
 *   was cut (threads, heads per rank).
 * - A block's pass is three phases over all the staged keys it sees: scores, probabilities,
 *   sums. The blocks are software-pipelined: a block's probabilities (vector units) run with
 *   the next block's score products and the previous block's sum products issued between
 *   their steps, one tile product at a time, so the tile unit and the vector units work at
 *   once. The probabilities use only vector operations that do run beside tile products
 *   (exp2_bf16: no vrndscaleps, no bf16 conversion instruction).
 * - Scores are computed transposed, S^T = K Q^T ([key][row]): 16 bf16 key rows are an A tile,
 *   and the online softmax (running max and sum per row, float32) is lane-wise over 16 rows,
 *   with no horizontal reductions. The running maximum is lazy: the probabilities are taken
 *   against it as it stands, and it moves (the sums rescaled, the probabilities taken again)
 *   only where a row's probabilities sum past SUM_LIMIT. Causal masking applies only to keys
 *   inside the chunk (key position <= query position); a block stops at its last query's
 *   position.
 * - The output is computed transposed too, O^T += V^T P^T: the probabilities (bf16) are the
 *   B tile as they come (key pairs by row, no transpose), the values are staged as V^T A
 *   tiles ([dim][key]), and the sums stay float32 [dim][row], so a rescale is one vector
 *   multiply per dim. Rows are transposed back when they are written.
 * - int8 caches (kv_kind, kernels.h): key and value rows are dequantized to bf16 as they are
 *   staged (the rounding the SDPA path applies to them too), and from there on are bf16 rows.
 *
 * Without AMX the tile products run on the vector units, whole (a step of tile_work is a full
 * product, nothing to overlap), and every key row is copied to kb, so the products' row stride
 * is a constant.
 *
 * Returns 0, computing nothing, where the build has no bf16 tile products or the shape does not fit
 * (chunk_attention_fits): the caller then uses torch's SDPA, which stays the reference
 * (tests/unit/test_chunk_attention.py).
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

#if HAVE_BF16_TILES

#define KEY_TILE 32     /* keys per P V product (its depth) */
#define CHUNK_KEYS 64   /* keys staged at a time; every block of the item passes over them (64: the
                         * staged keys, two blocks' scores and probabilities stay in L1) */
#define SPLIT_KEYS 8192 /* keys per split of the context (fixed boundaries; 4,096 made 128-query chunks
                          * over 30K keys 6-9% slower, more items' start-up and partial sums) */
#define MAX_BLOCKS 128  /* query blocks per work item: their sums (512 KiB at head_dim 64) stay in L2 */
#define MAX_D 128
#define NEG_BIG (-1e30f)     /* a masked score: exp2 of it minus any maximum is 0 */
#define SUM_LIMIT 65536.f    /* a row's probabilities may sum to this before the running maximum moves */
#if HAVE_AMX
#define TILES 8 /* the tiles tile_work uses */
#endif

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

typedef struct { /* one thread's working set, 64-byte aligned, kept for the thread's life */
    uint32_t qt[MAX_BLOCKS][MAX_D / 32][256];  /* queries as B tiles: row r holds dims 2r, 2r+1 of the 16 rows */
    float acc[MAX_BLOCKS][MAX_D / 16][256];    /* unnormalised outputs, per 16 dims [dim][row] */
    float m[MAX_BLOCKS][16], l[MAX_BLOCKS][16];
    int32_t qpos[MAX_BLOCKS][16];              /* each row's position in its sequence */
    uint32_t vt[CHUNK_KEYS / KEY_TILE][MAX_D / 16][256]; /* values as A tiles: [dim][key pair] per 16 dims */
    uint16_t kb[CHUNK_KEYS * MAX_D];           /* key rows copied or converted to bf16, d apart */
    float s[2][CHUNK_KEYS * 16];               /* two blocks' stored score tiles: [key][row] */
    uint32_t pb[2][CHUNK_KEYS / KEY_TILE][256]; /* two blocks' probabilities as B tiles: [key pair][row] */
    int64_t off[SPLIT_KEYS];                   /* pool offsets (elements) of the split's rows for the item's kv head */
    const uint16_t *kg[CHUNK_KEYS / 16];       /* each 16 staged keys' first row: in kb, or in place */
    int64_t kstride;                           /* bytes from one of those rows to the next */
    const int64_t *ahead;                      /* the next staged keys' pool offsets (ahead_keys of them), */
    int ahead_keys, ahead_key, ahead_line;     /* prefetched a line at a time (prefetch_next): cursor */
    int row_lines, elem_bytes;                 /* cache lines of a key or value row; bytes per element */
} scratch;

/* One thread's scratch (~1.7 MiB, about half of it touched at head_dim 64), made on its first
 * call: a fresh allocation per call would pay its first-touch faults every layer. */
static scratch *thread_scratch(void) {
    static __thread scratch *w;
    if (!w) w = aligned_alloc(64, sizeof(scratch));
    return w;
}

/* 2^x: a degree-3 polynomial on the fraction |f| <= 1/2 (relative error 1e-4, well under the
 * bf16 rounding the probabilities get) scaled by 2^round(x); very negative x gives 0. (The
 * fraction from floor(x) by vreduceps saves an instruction but moves the roundings, and with
 * them a near-tie that tests/integration/test_messages_api.py's real-model conversation
 * meets: a prompt served from the prefix cache has its last token attended by the decode
 * kernel, the same prompt uncached by this one.) */
static inline __m512 exp2_fast(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.055922036f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24264008f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312103f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992448f));
    return _mm512_scalef_ps(p, n);
}

/* 2^x rounded to bf16 precision (to nearest, an exact bf16 value in float32: its low 16 bits are
 * zero), from the vector operations that run beside tile products (vrndscaleps and the bf16
 * conversions do not: they take the tile unit's port): floor(x) by an addition rounded down,
 * a degree-3 polynomial on the fraction in [0, 1) (relative error 8.6e-5) whose last step adds
 * 2^16, which rounds it to 2^-7 (bf16's precision in [1, 2]); very negative x gives 0. */
static inline __m512 exp2_bf16(__m512 x) {
    const __m512 big = _mm512_set1_ps(12582912.f), top = _mm512_set1_ps(65536.f); /* 1.5 * 2^23, 2^16 */
    const __m512 n = _mm512_sub_ps(_mm512_add_round_ps(x, big, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), big);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.07706707f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22764495f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69511682f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(65537.f)); /* 2^16 + 1 */
    return _mm512_scalef_ps(_mm512_sub_ps(p, top), n);
}

/* word indices 0, b, 1, b+1, ..., 15, b+15: interleave words 0-15 with words b-b+15 */
static inline __m512i interleave_words(int b) {
    uint16_t idx[32];
    for (int e = 0; e < 16; e++) idx[2 * e] = (uint16_t)e, idx[2 * e + 1] = (uint16_t)(b + e);
    return _mm512_loadu_si512(idx);
}

/* 32 values of a value row from column c as bf16 (zeros past the staged keys) */
static inline __m512i value_bf16(const chunk_args *a, const int64_t *off, int u, int nk, int c) {
    if (u >= nk) return _mm512_setzero_si512();
    if (a->kv_kind == KV_BF16) return _mm512_loadu_si512((const uint16_t *)a->v + off[u] + c);
    return i8x32_to_bf16((const int8_t *)a->v + off[u], a->d, c, 1);
}

/* One more cache line of the next staged keys' rows (w->ahead: key rows, then value rows, key
 * by key) prefetched into L2. The probabilities loop issues them one per step: all at once, the
 * misses of a context that comes from memory fill the core's miss queue and stall it (8-9% of a
 * step at 30K keys of context with 128-query chunks). */
static inline void prefetch_next(const chunk_args *a, scratch *w) {
    const int line = w->ahead_line, kv = line >= w->row_lines;
    _mm_prefetch((const char *)(kv ? a->v : a->k) + w->ahead[w->ahead_key] * w->elem_bytes + 64 * (line - kv * w->row_lines),
                 _MM_HINT_T1);
    if (++w->ahead_line == 2 * w->row_lines) w->ahead_line = 0, w->ahead_key++;
}

/* whether prefetch_next has lines left */
static inline int prefetch_pending(const scratch *w) { return w->ahead_key < w->ahead_keys; }

/* Stage keys kc..kc+nk-1 (pool offsets at off): w->kg points at each 16 key rows, in place
 * (AMX, bf16 rows, pages of 16 keys or a multiple) or copied into w->kb (int8 rows dequantized
 * to bf16; without AMX every row, MAX_D apart), zeros to the end of the last 16; the values
 * as V^T A tiles. What is left of these keys' prefetches is issued first; the next `ahead`
 * keys' are queued. */
static void stage_chunk(const chunk_args *a, const int64_t *off, int nk, int ahead, scratch *w) {
    const int in_place = HAVE_AMX && a->kv_kind == KV_BF16 && a->page_size % 16 == 0;
    const int d = a->d, kd = HAVE_AMX ? d : MAX_D; /* key rows in kb: kd apart (vec_tile_dp's constant a_row) */
    w->kstride = in_place ? 2 * a->row_stride : 2 * kd;
    while (prefetch_pending(w)) prefetch_next(a, w);
    w->ahead = off + nk, w->ahead_keys = ahead, w->ahead_key = w->ahead_line = 0;
    for (int h = 0; h * 16 < nk; h++) {
        const int n = nk - 16 * h < 16 ? nk - 16 * h : 16;
        const int64_t *ho = off + 16 * h;
        uint16_t *kb = w->kb + 16 * h * kd;
        w->kg[h] = kb;
        if (in_place) {
            w->kg[h] = (const uint16_t *)a->k + ho[0]; /* the 16 keys are consecutive rows of one page */
            continue;
        }
        if (a->kv_kind == KV_BF16) {
            for (int u = 0; u < n; u++) memcpy(kb + u * kd, (const uint16_t *)a->k + ho[u], 2 * (size_t)d);
        } else {
            for (int u = 0; u < n; u++)
                for (int c = 0; c < d; c += 32)
                    _mm512_storeu_si512(kb + u * kd + c, i8x32_to_bf16((const int8_t *)a->k + ho[u], d, c, 1));
        }
        for (int u = n; u < 16; u++) memset(kb + u * kd, 0, 2 * (size_t)d); /* rows past the keys: finite */
    }
    /* V^T: per key tile, pairs of keys as dwords (lane = dim), transposed to rows of dims */
    const __m512i lo = interleave_words(32), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int t = 0; t * KEY_TILE < nk; t++)
        for (int c = 0; c < d; c += 32) {
            __m512i x0[16], x1[16];
            for (int r = 0; r < KEY_TILE / 2; r++) { /* pair r: keys 2r and 2r+1 of the tile */
                const int u = t * KEY_TILE + 2 * r;
                const __m512i x = value_bf16(a, off, u, nk, c), y = value_bf16(a, off, u + 1, nk, c);
                x0[r] = _mm512_permutex2var_epi16(x, lo, y);
                x1[r] = _mm512_permutex2var_epi16(x, hi, y);
            }
            transpose16(x0);
            transpose16(x1);
            for (int e = 0; e < 16; e++) {
                _mm512_store_si512(w->vt[t][c / 16] + 16 * e, x0[e]);
                _mm512_store_si512(w->vt[t][c / 16 + 1] + 16 * e, x1[e]);
            }
        }
}

/* A block's pass over the staged keys is three phases, each over all n keys it sees (up to
 * CHUNK_KEYS): scores (tile products), probabilities (vector), sums (tile products). The
 * tile products of the next block's scores and the previous block's sums run interleaved
 * with a block's probabilities, one product at a time (tile_work): the tile unit and the
 * vector units then work at once. Scores and probabilities are double-buffered by block
 * parity for that. */

/* The tile work beside one block's probabilities: the scores of block sb over its first
 * sgroups 16-key groups into sdst, and the sums of block pbk over its first ptiles key tiles
 * with probabilities from pbuf, as steps of one tile product each. Tiles: scores 0-1 (by
 * group parity), queries 4-5, keys 6; sums 2, values 3, probabilities 7. */
typedef struct {
    int sb, sgroups, sg, sdb; /* sb < 0: no scores */
    float *sdst;
    int pbk, ptiles, pc, pt; /* pbk < 0: no sums */
    int turn;                /* the last step's kind, while both are left: 1 scores */
    uint32_t (*pbuf)[256];
} tile_work;

#if HAVE_AMX
/* queries of dim block b in tile 4 + b % 2 */
#define LOAD_Q(b)                                                                 \
    do {                                                                          \
        if ((b) & 1)                                                              \
            _tile_loadd(5, w->qt[tw->sb][b], 64);                                 \
        else                                                                      \
            _tile_loadd(4, w->qt[tw->sb][b], 64);                                 \
    } while (0)

/* dim block sdb's product of key group sg's scores, in tile X */
#define SCORE_STEP(X)                                                             \
    do {                                                                          \
        if (tw->sdb == 0) _tile_zero(X);                                          \
        if (d > 64) LOAD_Q(tw->sdb); /* else resident (start_scores) */          \
        _tile_loadd(6, w->kg[tw->sg] + 32 * tw->sdb, w->kstride);                 \
        if (tw->sdb & 1)                                                          \
            _tile_dpbf16ps(X, 6, 5);                                              \
        else                                                                      \
            _tile_dpbf16ps(X, 6, 4);                                              \
        if (++tw->sdb == d / 32) {                                                \
            _tile_stored(X, tw->sdst + 256 * tw->sg, 64);                         \
            tw->sdb = 0, tw->sg++;                                                \
        }                                                                         \
    } while (0)
#endif

/* the keys of the staged chunk at kc (nk of them) that block bi's last row sees */
static inline int keys_seen(const scratch *w, int bi, int64_t kc, int nk) {
    const int64_t vis = w->qpos[bi][15] + 1 - kc;
    return vis < nk ? (int)vis : nk;
}

/* Block sb's scores set up as tile work over n keys, into score buffer sdst. */
static inline void start_scores(const chunk_args *a, scratch *w, tile_work *tw, int sb, int n, float *sdst) {
    tw->sb = sb, tw->sgroups = (n + 15) / 16, tw->sg = 0, tw->sdb = 0, tw->sdst = sdst;
#if HAVE_AMX
    if (a->d <= 64) { /* the queries stay in tiles 4-5 through the block's scores */
        _tile_loadd(4, w->qt[sb][0], 64);
        if (a->d > 32) _tile_loadd(5, w->qt[sb][1], 64);
    }
#else
    (void)a, (void)w;
#endif
}

/* One step of the tile work: a score product or a sum product, in turn while both are left.
 * Returns 0 when none is. On the vector units (no AMX) a step is a 16-key group's scores over
 * every dim block, or a dim tile's sums over every key tile: nothing runs beside it there, so
 * the steps are as long as they can be. */
static inline __attribute__((always_inline)) int tile_step(const chunk_args *a, scratch *w, tile_work *tw) {
    const int d = a->d;
    const int scores = tw->sb >= 0 && tw->sg < tw->sgroups, sums = tw->pbk >= 0 && tw->pc < d / 16;
#if HAVE_VEC_TILES
    if (scores && (!sums || (tw->turn ^= 1))) {
        vec_tile_dp(tw->sdst + 256 * tw->sg, 1, (const uint32_t *)w->kg[tw->sg], MAX_D / 2, 16, w->qt[tw->sb][0],
                    d / 32); /* key rows copied MAX_D apart (stage_chunk) */
        tw->sg++;
        return 1;
    }
    if (!sums) return 0;
    vec_tile_dp(w->acc[tw->pbk][tw->pc], 0, w->vt[0][tw->pc], 16, sizeof(w->vt[0]) / 4, tw->pbuf[0], tw->ptiles);
    tw->pc++;
    return 1;
#else
    if (scores && (!sums || (tw->turn ^= 1))) {
        if (tw->sg & 1)
            SCORE_STEP(1);
        else
            SCORE_STEP(0);
        return 1;
    }
    if (!sums) return 0;
    if (tw->pt == 0) _tile_loadd(2, w->acc[tw->pbk][tw->pc], 64);
    _tile_loadd(7, tw->pbuf[tw->pt], 64);
    _tile_loadd(3, w->vt[tw->pt][tw->pc], 64);
    _tile_dpbf16ps(2, 3, 7);
    if (++tw->pt == tw->ptiles) {
        _tile_stored(2, w->acc[tw->pbk][tw->pc], 64);
        tw->pt = 0, tw->pc++;
    }
    return 1;
#endif
}

/* the rest of the tile work done */
static inline void tile_drain(const chunk_args *a, scratch *w, tile_work *tw) {
    while (tile_step(a, w, tw)) {
    }
}

/* key k's score in base-2 log units, less the running maximum m, from score buffer s */
static inline __m512 key_score(const float *s, int k, __m512 scale, __m512 m) {
    return _mm512_fmsub_ps(_mm512_load_ps(s + 16 * k), scale, m);
}

/* a key of the chunk (position pos) is hidden from rows before it */
static inline __m512 causal(__m512 x, __m512i qpos, int64_t pos) {
    return _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(qpos, _mm512_set1_epi32((int32_t)pos)), x,
                                _mm512_set1_ps(NEG_BIG));
}

/* keys k, k+1's probabilities (bf16 values in float32, but for denormals) as one row of their
 * P^T B tile: key pairs as dwords (p1's upper half over p0's), lane = row */
static inline __attribute__((always_inline)) void store_pair(uint32_t (*pb)[256], int k, __m512 p0, __m512 p1) {
    const __m512i upper = _mm512_set1_epi32((int)0xFFFF0000u); /* (p1 & upper) | (p0 >> 16): */
    _mm512_store_si512(pb[k / KEY_TILE] + 8 * (k % KEY_TILE),
                       _mm512_ternarylogic_epi32(_mm512_castps_si512(p1), _mm512_srli_epi32(_mm512_castps_si512(p0), 16),
                                                 upper, 0xEC));
}

/* The probabilities 2^(score - m) of the first n keys of score buffer s into pb (zeros past n,
 * to the end of their key tile) and their sum per row, a step of the tile work tw (when not
 * NULL) beside every few keys. The first `open` keys, which every row sees, go through a loop
 * without masks or bounds. */
static __m512 probabilities(const chunk_args *a, scratch *w, tile_work *tw, const float *s, uint32_t (*pb)[256], int n,
                            int open, int64_t kc, __m512i qpos, __m512 scale, __m512 m) {
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 4 <= open; k += 4) {
        if (tw) tile_step(a, w, tw);
        if (prefetch_pending(w)) prefetch_next(a, w);
        const __m512 p0 = exp2_bf16(key_score(s, k, scale, m));
        const __m512 p1 = exp2_bf16(key_score(s, k + 1, scale, m));
        const __m512 p2 = exp2_bf16(key_score(s, k + 2, scale, m));
        const __m512 p3 = exp2_bf16(key_score(s, k + 3, scale, m));
        sum0 = _mm512_add_ps(sum0, _mm512_add_ps(p0, p1));
        sum1 = _mm512_add_ps(sum1, _mm512_add_ps(p2, p3));
        store_pair(pb, k, p0, p1);
        store_pair(pb, k + 2, p2, p3);
    }
    for (; k < ((n + KEY_TILE - 1) & -KEY_TILE); k += 2) {
        if (tw) tile_step(a, w, tw);
        __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
        if (k < n) p0 = exp2_bf16(causal(key_score(s, k, scale, m), qpos, kc + k));
        if (k + 1 < n) p1 = exp2_bf16(causal(key_score(s, k + 1, scale, m), qpos, kc + k + 1));
        sum0 = _mm512_add_ps(sum0, _mm512_add_ps(p0, p1));
        store_pair(pb, k, p0, p1);
    }
    return _mm512_add_ps(sum0, sum1);
}

/* Block bi's online softmax over its first n staged keys (positions kc..) from score buffer s:
 * probabilities into pb, their sums added to l, the tile work tw done beside them. The running
 * maximum is lazy: the probabilities are taken against the maximum so far, which stands unless
 * a row's sum passes SUM_LIMIT (each probability is then at most that) or the row had none
 * yet; then it moves to the scores' maximum, the sums are rescaled and the probabilities taken
 * again. */
static void block_softmax(const chunk_args *a, scratch *w, tile_work *tw, int bi, int n, int64_t kc, const float *s,
                          uint32_t (*pb)[256]) {
    const int d = a->d;
    const __m512 scale = _mm512_set1_ps(a->scale2);
    const __m512i qpos = _mm512_load_si512(w->qpos[bi]);
    const int64_t seen = w->qpos[bi][0] + 1 - kc; /* keys of the chunk every row sees */
    const int open = seen < 0 ? 0 : seen < n ? (int)seen : n;
    const __m512 m = _mm512_load_ps(w->m[bi]);
    __m512 l = _mm512_load_ps(w->l[bi]), sum = _mm512_setzero_ps();
    const int fresh = _mm512_cmp_ps_mask(m, _mm512_set1_ps(NEG_BIG / 1e6f), _CMP_LT_OQ) != 0;
    if (!fresh) sum = probabilities(a, w, tw, s, pb, n, open, kc, qpos, scale, m);
    tile_drain(a, w, tw);
    if (fresh || _mm512_cmp_ps_mask(sum, _mm512_set1_ps(SUM_LIMIT), _CMP_NLE_UQ)) {
        __m512 mt = _mm512_set1_ps(NEG_BIG);
        for (int k = 0; k < n; k++) {
            const __m512 x = key_score(s, k, scale, _mm512_setzero_ps());
            mt = _mm512_max_ps(mt, k < open ? x : causal(x, qpos, kc + k));
        }
        __m512 m_new = _mm512_max_ps(m, mt);
        /* rows that see no key yet see none in this split (its first staged keys hold its first
         * key): a maximum of 0 keeps their probabilities 0, and the merge gives them no weight */
        m_new = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(NEG_BIG / 1e6f), _CMP_LT_OQ),
                                   _mm512_setzero_ps());
        const __m512 alpha = exp2_fast(_mm512_sub_ps(m, m_new));
        for (int c = 0; c < d / 16; c++)
            for (int e = 0; e < 16; e++)
                _mm512_store_ps(w->acc[bi][c] + 16 * e, _mm512_mul_ps(_mm512_load_ps(w->acc[bi][c] + 16 * e), alpha));
        l = _mm512_mul_ps(l, alpha);
        _mm512_store_ps(w->m[bi], m_new);
        sum = probabilities(a, w, NULL, s, pb, n, open, kc, qpos, scale, m_new);
    }
    _mm512_store_ps(w->l[bi], _mm512_add_ps(l, sum));
}

/* The 16 rows of a block's sums (acc [dim tiles][dim][row]) times inv[row], written out: row r
 * (0..rows-1) to token tok0 + r / g's head kh * g + r % g. */
static void write_rows(const chunk_args *a, float (*acc)[256], __m512 inv, int rows, int64_t tok0, int kh) {
    const int d = a->d, g = a->g;
    for (int c = 0; c < d / 16; c++) {
        __m512i t[16];
        for (int e = 0; e < 16; e++) t[e] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(acc[c] + 16 * e), inv));
        transpose16(t); /* t[r]: row r's 16 dims */
        for (int r = 0; r < rows; r++) {
            const int64_t o = (tok0 + r / g) * a->out_stride + ((int64_t)kh * g + r % g) * d + 16 * c;
            const __m512 y = _mm512_castsi512_ps(t[r]);
            if (a->out_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + o), f32_to_bf16x16(y));
            else
                _mm512_storeu_ps((float *)a->out + o, y);
        }
    }
}

typedef struct {
    int64_t seq, b0, b1, split, cost;
    int kh;
} work_item;

/* A chunk's query blocks and its context's splits (rows[i] of paged_chunk_attention) */
static inline int64_t row_blocks(const int64_t *row, int tpb) { return (row[2] + tpb - 1) / tpb; }
static inline int64_t row_splits(const int64_t *row) { return (row[3] + SPLIT_KEYS - 1) / SPLIT_KEYS; }

/* The chunk's partial sums of each (kv head, block, split), where its context spans splits:
 * [m 16][l 16][sums d/16 x 256] floats per slot. */
static inline int64_t slot_floats(int d) { return 32 + 16 * (int64_t)d; }

/* Query blocks b0..b1-1 of sequence `row` (see paged_chunk_attention) for kv head kh over keys
 * of split `split`: written out when the context is one split, else to their partial slots
 * (part: the chunk's first slot). */
static void chunk_item(const chunk_args *a, const int64_t *row, const work_item *it, float *part, scratch *w) {
    const int g = a->g, d = a->d, tpb = a->tokens_per_block, kh = it->kh, nb = (int)(it->b1 - it->b0);
    const int64_t tok = row[0], qlen = row[2], len = row[3], prefix = len - qlen;
    const int64_t splits = row_splits(row), blocks = row_blocks(row, tpb);
    const int64_t *pages = a->block_table + row[1] * a->bt_stride;
    for (int bi = 0; bi < nb; bi++) {
        const int64_t t0 = (it->b0 + bi) * tpb;
        const int nt = qlen - t0 < tpb ? (int)(qlen - t0) : tpb;
        const float *qs[16]; /* the block's tokens' query groups: row r is token r / g's head r % g */
        for (int i = 0; i < nt; i++) qs[i] = a->q + (tok + t0 + i) * a->q_stride + (int64_t)kh * g * d;
        query_tiles(qs, nt, g, d, w->qt[bi]);
        memset(w->acc[bi], 0, sizeof(w->acc[bi][0]) * (size_t)(d / 16));
        for (int r = 0; r < 16; r++) {
            w->m[bi][r] = NEG_BIG, w->l[bi][r] = 0.f;
            w->qpos[bi][r] = (int32_t)(prefix + t0 + (r < nt * g ? r / g : nt - 1)); /* padding: the last row's */
        }
    }
    const int64_t k0 = it->split * SPLIT_KEYS;
    int64_t k1 = k0 + SPLIT_KEYS, last = w->qpos[nb - 1][15] + 1; /* keys the item's last row sees */
    k1 = k1 < last ? k1 : last;
    const int64_t head = (int64_t)kh * a->hd;
    for (int64_t t = k0, p = k0 / a->page_size, u = k0 % a->page_size; t < k1; t++) { /* no division per key */
        w->off[t - k0] = (pages[p] * a->page_size + u) * a->row_stride + head;
        if (++u == a->page_size) u = 0, p++;
    }
    w->elem_bytes = a->kv_kind == KV_BF16 ? 2 : 1, w->row_lines = (a->hd * w->elem_bytes + 63) / 64;
    w->ahead_keys = w->ahead_key = 0; /* nothing queued from the last item */
    for (int64_t kc = k0; kc < k1; kc += CHUNK_KEYS) {
        const int nk = k1 - kc < CHUNK_KEYS ? (int)(k1 - kc) : CHUNK_KEYS;
        const int64_t rest = k1 - kc - nk;
        stage_chunk(a, w->off + (kc - k0), nk, rest < CHUNK_KEYS ? (int)rest : CHUNK_KEYS, w);
        /* the blocks that see keys of this chunk (the later ones: positions grow with the block),
         * each block's probabilities beside the next one's scores and the previous one's sums */
        int first = 0;
        while (first < nb && keys_seen(w, first, kc, nk) <= 0) first++;
        if (first == nb) continue;
        tile_work tw = {.sb = -1, .pbk = -1};
        start_scores(a, w, &tw, first, keys_seen(w, first, kc, nk), w->s[first & 1]);
        tile_drain(a, w, &tw); /* the first block's scores alone */
        for (int bi = first; bi < nb; bi++) {
            const int n = keys_seen(w, bi, kc, nk);
            if (bi + 1 < nb) start_scores(a, w, &tw, bi + 1, keys_seen(w, bi + 1, kc, nk), w->s[(bi + 1) & 1]);
            block_softmax(a, w, &tw, bi, n, kc, w->s[bi & 1], w->pb[bi & 1]);
            tw.pbk = bi, tw.ptiles = (n + KEY_TILE - 1) / KEY_TILE, tw.pc = 0, tw.pt = 0, tw.pbuf = w->pb[bi & 1];
        }
        tile_drain(a, w, &tw); /* the last block's sums alone */
    }
    for (int bi = 0; bi < nb; bi++) {
        const int64_t b = it->b0 + bi, t0 = b * tpb;
        if (splits == 1) {
            const int rows = (qlen - t0 < tpb ? (int)(qlen - t0) : tpb) * g;
            write_rows(a, w->acc[bi], _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_load_ps(w->l[bi])), rows, tok + t0, kh);
        } else {
            float *slot = part + (((int64_t)kh * blocks + b) * splits + it->split) * slot_floats(d);
            memcpy(slot, w->m[bi], sizeof(float) * 16);
            memcpy(slot + 16, w->l[bi], sizeof(float) * 16);
            memcpy(slot + 32, w->acc[bi], sizeof(float) * 16 * (size_t)d);
        }
    }
}

/* Block b of sequence `row`, kv head kh: its splits' partial sums merged (in split order) and written out. */
static void merge_block(const chunk_args *a, const int64_t *row, int kh, int64_t b, const float *part, scratch *w) {
    const int g = a->g, d = a->d, tpb = a->tokens_per_block;
    const int64_t qlen = row[2], len = row[3], t0 = b * tpb, splits = row_splits(row);
    const int nt = qlen - t0 < tpb ? (int)(qlen - t0) : tpb;
    const int64_t last = len - qlen + t0 + nt; /* keys the block's last token sees */
    const int64_t used = (last + SPLIT_KEYS - 1) / SPLIT_KEYS, blocks = row_blocks(row, tpb);
    const float *slot0 = part + ((int64_t)kh * blocks + b) * splits * slot_floats(d);
    __m512 m = _mm512_set1_ps(NEG_BIG); /* over the splits where a row saw keys (a positive sum) */
    for (int64_t s = 0; s < used; s++) {
        const float *slot = slot0 + s * slot_floats(d);
        m = _mm512_mask_max_ps(m, _mm512_cmp_ps_mask(_mm512_loadu_ps(slot + 16), _mm512_setzero_ps(), _CMP_GT_OQ), m,
                               _mm512_loadu_ps(slot));
    }
    __m512 l = _mm512_setzero_ps();
    float(*acc)[256] = w->acc[0];
    memset(acc, 0, sizeof(float) * 16 * (size_t)d);
    for (int64_t s = 0; s < used; s++) {
        const float *slot = slot0 + s * slot_floats(d);
        const __m512 wgt = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(slot + 16), _mm512_setzero_ps(), _CMP_GT_OQ),
                                               exp2_fast(_mm512_sub_ps(_mm512_loadu_ps(slot), m)));
        l = _mm512_fmadd_ps(_mm512_loadu_ps(slot + 16), wgt, l);
        for (int e = 0; e < d; e++)
            _mm512_store_ps(acc[0] + 16 * e, _mm512_fmadd_ps(_mm512_loadu_ps(slot + 32 + 16 * e), wgt,
                                                             _mm512_load_ps(acc[0] + 16 * e)));
    }
    write_rows(a, acc, _mm512_div_ps(_mm512_set1_ps(1.f), l), nt * g, row[0] + t0, kh);
}

/* blocks of a chunk that merge splits: all of them (every kv head) where its context spans splits */
static inline int64_t merge_count(const int64_t *row, int hk, int tpb) {
    return row_splits(row) > 1 ? hk * row_blocks(row, tpb) : 0;
}

/* the length of each run of query blocks that items take, at most `group`: the runs as even as can be */
static inline int64_t run_length(int64_t blocks, int64_t group) {
    const int64_t runs = (blocks + group - 1) / group;
    return (blocks + runs - 1) / runs;
}

/* The work items of chunks rows[0..n-1] with runs of up to `group` query blocks, written to
 * item (when not NULL), their number returned; *total and *largest: their summed and largest
 * cost (blocks x keys). */
static int64_t plan_items(const int64_t *rows, int64_t n, int hk, int tpb, int64_t group, work_item *item,
                          int64_t *total, int64_t *largest) {
    int64_t it = 0;
    *total = *largest = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t qlen = rows[4 * i + 2], len = rows[4 * i + 3], blocks = row_blocks(rows + 4 * i, tpb);
        const int64_t splits = row_splits(rows + 4 * i);
        for (int kh = 0; kh < hk; kh++)
            for (int64_t b = 0, run = run_length(blocks, group); b < blocks; b += run)
                for (int64_t s = 0; s < splits; s++, it++) {
                    const int64_t b1 = b + run < blocks ? b + run : blocks;
                    const int64_t last = len - qlen + (b1 * tpb < qlen ? b1 * tpb : qlen); /* keys the run sees */
                    const int64_t keys = last < (s + 1) * SPLIT_KEYS ? last - s * SPLIT_KEYS : SPLIT_KEYS;
                    const int64_t cost = (b1 - b) * keys;
                    if (item) item[it] = (work_item){i, b, b1, s, cost, kh};
                    *total += cost > 0 ? cost : 0;
                    *largest = cost > *largest ? cost : *largest;
                }
    }
    return it;
}

static int by_cost(const void *x, const void *y) { /* costliest first: the last items are the short ones */
    const int64_t cx = ((const work_item *)x)->cost, cy = ((const work_item *)y)->cost;
    return cx < cy ? 1 : cx > cy ? -1 : 0;
}
#endif

/* 1 where paged_chunk_attention serves this cache and shape: bf16 tile products in the build (AMX,
 * ready in this process, or AVX512-BF16), a bf16 or int8 cache, head_dim a multiple of 32 up to
 * 128, at most 16 query heads per kv head. */
int chunk_attention_fits(int kv_kind, int hq, int hk, int d) {
#if HAVE_BF16_TILES
    return (kv_kind == KV_BF16 || kv_kind == KV_INT8) && d % 32 == 0 && d <= MAX_D && hq / hk <= 16 &&
           bf16_tiles_ready();
#else
    (void)kv_kind, (void)hq, (void)hk, (void)d;
    return 0;
#endif
}

/* rows[i] = {first token index in q/out, block-table row, query length, context length} of
 * each chunk (its tokens are the context's last ones, already in the cache); q float32
 * [tokens][hq][d] rows q_stride apart, out float32 or (out_bf16) bfloat16. Returns 1, or 0
 * where it cannot serve (see above) and did nothing. */
int paged_chunk_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_kind,
                          const int64_t *block_table, int64_t bt_stride, const int64_t *rows, int64_t n, void *out,
                          int out_bf16, int64_t out_stride, int hq, int hk, int d, int page_size, float scale,
                          int num_threads) {
#if HAVE_BF16_TILES
    const int g = hq / hk;
    if (!chunk_attention_fits(kv_kind, hq, hk, d)) return 0;
    const chunk_args a = {q, q_stride, k_cache, v_cache, kv_kind, block_table, bt_stride, out, out_bf16, out_stride,
                          g, d, kv_kind == KV_INT8 ? kv_int8_row_bytes(d) : d, page_size, 16 / g,
                          (int64_t)hk * (kv_kind == KV_INT8 ? kv_int8_row_bytes(d) : d), scale * 1.44269504f};
    const int tpb = a.tokens_per_block;
    /* work items: (sequence, kv head, run of query blocks, split); runs as long as MAX_BLOCKS
     * (each staged key serves the most blocks) while the items are enough, and even enough, to
     * keep the threads busy: at least 3 a thread, none over half a thread's share */
    int64_t group = MAX_BLOCKS, items = 0, total = 0, largest = 0;
    for (;; group /= 2) {
        items = plan_items(rows, n, hk, tpb, group, NULL, &total, &largest);
        if (group == 1 || (items >= 3 * num_threads && 2 * num_threads * largest <= total)) break;
    }
    work_item *item = malloc(sizeof(*item) * (size_t)items);
    plan_items(rows, n, hk, tpb, group, item, &total, &largest);
    int64_t *first_slot = malloc(sizeof(int64_t) * (size_t)n), merges = 0, slots = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t splits = row_splits(rows + 4 * i);
        first_slot[i] = slots;
        merges += merge_count(rows + 4 * i, hk, tpb);
        if (splits > 1) slots += hk * row_blocks(rows + 4 * i, tpb) * splits;
    }
    qsort(item, (size_t)items, sizeof(*item), by_cost);
    static __thread float *part; /* the caller's partial sums, kept: grown, never shrunk */
    static __thread int64_t part_cap;
    if (slots * slot_floats(d) > part_cap) {
        free(part);
        part_cap = slots * slot_floats(d);
        part = aligned_alloc(64, sizeof(float) * (size_t)part_cap);
    }
    float *const partials = part;
    _Pragma("omp parallel num_threads(num_threads)")
    {
        scratch *w = thread_scratch();
#if HAVE_AMX
        load_tile_config(TILES);
#endif
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t it = 0; it < items; it++) {
            const work_item *wi = item + it;
            if (wi->cost > 0) chunk_item(&a, rows + 4 * wi->seq, wi, partials + first_slot[wi->seq] * slot_floats(d), w);
        }
#if HAVE_AMX
        _tile_release();
#endif
        if (merges) {
            _Pragma("omp for schedule(static)")
            for (int64_t j = 0; j < merges; j++) { /* (chunk, kv head, block) of the chunks over several splits */
                int64_t i = 0, base = 0;
                while (merge_count(rows + 4 * i, hk, tpb) <= j - base) base += merge_count(rows + 4 * i++, hk, tpb);
                const int64_t blocks = row_blocks(rows + 4 * i, tpb), jj = j - base;
                merge_block(&a, rows + 4 * i, (int)(jj / blocks), jj % blocks, partials + first_slot[i] * slot_floats(d),
                            w);
            }
        }
    }
    free(first_slot);
    free(item);
    return 1;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)kv_kind, (void)block_table, (void)bt_stride;
    (void)rows, (void)n, (void)out, (void)out_bf16, (void)out_stride, (void)hq, (void)hk, (void)d, (void)page_size;
    (void)scale, (void)num_threads;
    return 0;
#endif
}
