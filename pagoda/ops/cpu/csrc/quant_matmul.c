/* Weight-only int4 and int8 matmuls (CPU, AVX-512): y = x W^T with W stored as GGUF
 * Q4_1 and Q8_0 do, kept exact: per group of 32 inputs, w = d * q + m with q in 0..15
 * (int4), or w = d * q with q in -127..127 (int8); d and m float16.
 *
 * Why not torch's int4 kernel: it keeps scale and zero in bfloat16 (every Q4_1 block is
 * slightly off) and its cost grows fast with the number of rows. Here the sixteen outputs
 * of a tile are one vector: per pair of inputs, sixteen bytes of nibbles become two
 * float32 weight vectors that are FMA'd against up to eight activation rows at once
 * (broadcast), so no horizontal sums are needed and the weights are unpacked once per
 * eight rows. Per group, sum(q x) is scaled by d and m * sum(x) added. About 1.4x
 * torch's speed for one row and 1.8x bfloat16 oneDNN at eight (measured on the default
 * model's layers). Where the CPU has AMX, tile products take over from 5 rows (below):
 * exactly up to 16 rows, and from 17 rows with the weights rounded to bfloat16 (up to 3x
 * faster). Without AMX but with AVX512-BF16 (AMD Zen 4 and later), the rounded form runs on
 * the vector units from 24 rows (2x the FMA passes at 512 rows and more). Activations are
 * rounded to bfloat16 on every path, so below the rounded forms the products are exact and
 * the paths agree bit for bit; on every path a row's result depends on its own inputs and
 * the row count only, never on the rows beside it.
 *
 * Layout (made by pagoda/ops/cpu/linear.py): int4 qp [N/16][K/32][16 pairs][16 outputs] bytes
 * with input 2p in the low nibble and 2p+1 in the high one; int8 qp [N/16][K/32][32
 * inputs][16 outputs]; d and m [N/16][K/32][16] float16. x [M, K] float32 or bfloat16;
 * y [M, N] float32 or bfloat16.
 *
 * Built by pagoda/ops/cpu/native.py (FLAGS there: -O3 -march=native -ffast-math -fopenmp, ...); called
 * through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"
#include "kernels.h"
#include "simd.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ROWS 8      /* activation rows per pass over a tile's weights */
#define GROUP 32    /* inputs per scale */
#define PREFETCH 8  /* groups ahead */

int quant_matmul_available(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512F__
/* 16 outputs at out + o, float32 or rounded to bfloat16 */
static inline void store_row(__m512 y, void *out, int out_bf16, int64_t o) {
    if (out_bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + o), f32_to_bf16x16(y));
    else
        _mm512_storeu_ps((float *)out + o, y);
}

/* q of inputs 2p and 2p+1 of a group, for the tile's 16 outputs, as float32 (exact) */
static inline __attribute__((always_inline)) void pair_weights(const uint8_t *qg, int p, const int bits, __m512 *w0,
                                                                __m512 *w1) {
    if (bits == 4) {
        const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qg + p * 16)));
        *w0 = _mm512_permutexvar_ps(b, values); /* the low nibble indexes (the rest is ignored) */
        *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
    } else {
        *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + p * 32))));
        *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + p * 32 + 16))));
    }
}

/* out rows r0.. r0+rn of tile t (16 outputs); xf float32 rows, xs per-group sums of x
 * (int4's min term); bits 4 or 8 */
static inline __attribute__((always_inline)) void tile_rows(
        const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const float *xf, const float *xs,
        void *out, int out_bf16, int64_t t, int64_t r0, int64_t n, int64_t k, const int rn, const int bits) {
    const int64_t groups = k / GROUP, group_bytes = GROUP * 16 * bits / 8;
    const uint8_t *qt = qp + t * groups * group_bytes;
    __m512 acc[ROWS];
    for (int r = 0; r < rn; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *qg = qt + g * group_bytes;
        for (int l = 0; l < group_bytes; l += 64) _mm_prefetch((const char *)(qg + PREFETCH * group_bytes + l), _MM_HINT_T0);
        __m512 even[ROWS], odd[ROWS]; /* two chains per row: half the FMA latency in the way */
        for (int r = 0; r < rn; r++) even[r] = odd[r] = _mm512_setzero_ps();
        const float *xg = xf + r0 * k + g * GROUP;
        for (int p = 0; p < GROUP / 2; p++) {
            __m512 w0, w1; /* inputs 2p and 2p+1 for the tile's 16 outputs */
            pair_weights(qg, p, bits, &w0, &w1);
            for (int r = 0; r < rn; r++) {
                even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xg[r * k + 2 * p]), even[r]);
                odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xg[r * k + 2 * p + 1]), odd[r]);
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (t * groups + g) * 16)));
        for (int r = 0; r < rn; r++) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(even[r], odd[r]), d, acc[r]);
        if (bits == 4) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m16 + (t * groups + g) * 16)));
            for (int r = 0; r < rn; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[(r0 + r) * groups + g]), m, acc[r]);
        }
    }
    for (int r = 0; r < rn; r++) store_row(acc[r], out, out_bf16, (r0 + r) * n + t * 16);
}

/* The row count and width as constants, so a pass's sums live in registers. */
#define TILE(RN) tile_rows(qp, d16, m16, xf, xs, out, out_bf16, t, r0, n, k, RN, BITS)
#define DEFINE_MATMUL(NAME, BITS_)                                                              \
static void NAME##_tiles(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const float *xf,     \
                         const float *xs, void *out, int out_bf16, int64_t rows, int64_t n, int64_t k,     \
                         int num_threads) {                                                                \
    enum { BITS = BITS_ };                                                                                 \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")                                  \
    for (int64_t t = 0; t < n / 16; t++)                                                                   \
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {                                                      \
            switch (rows - r0 < ROWS ? rows - r0 : ROWS) {                                                 \
            case 1: TILE(1); break;                                                                        \
            case 2: TILE(2); break;                                                                        \
            case 3: TILE(3); break;                                                                        \
            case 4: TILE(4); break;                                                                        \
            case 5: TILE(5); break;                                                                        \
            case 6: TILE(6); break;                                                                        \
            case 7: TILE(7); break;                                                                        \
            default: TILE(8); break;                                                                       \
            }                                                                                              \
        }                                                                                                  \
}
DEFINE_MATMUL(int4, 4)
DEFINE_MATMUL(int8, 8)

/* x rounded to bfloat16, as float32 rows (what the FMAs broadcast from), with sums per
 * group for int4. Rounded because the AMX path takes bfloat16: both paths then multiply the
 * same numbers exactly and differ at most in the order of float32 additions. */
static float *float_rows(const void *x, int x_bf16, int64_t rows, int64_t k, int sums) {
    const int64_t groups = k / GROUP;
    float *xf = malloc(sizeof(float) * (size_t)(rows * k + (sums ? rows * groups : 0)));
    for (int64_t i = 0; i < rows * k; i++)
        xf[i] = bf16_to_f32(x_bf16 ? ((const uint16_t *)x)[i] : f32_to_bf16(((const float *)x)[i]));
    for (int64_t i = 0; sums && i < rows * groups; i++) {
        float s = 0.f;
        for (int j = 0; j < GROUP; j++) s += xf[i * GROUP + j];
        xf[rows * k + i] = s;
    }
    return xf;
}

#if HAVE_BF16_TILES
/* Up to this many rows the products are exact; from the next on, the weights are rounded to
 * bfloat16 (the rounded forms below). The vector form's 17-23 rows would be two row blocks,
 * the second mostly padding: slower than the FMA passes there (measured on an AMD EPYC). */
#if HAVE_AMX
#define EXACT_MAX_ROWS 16
#else
#define EXACT_MAX_ROWS 23
#endif

/* float32 w0, w1 rounded to bfloat16 (nearest even) as 16 (w0[j], w1[j]) pairs: a B tile row */
static inline __m512i bf16_pairs(__m512 w0, __m512 w1) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
}

/* The rounded form's B tile of one group of one output tile (256 bf16 pairs) into b */
static inline __attribute__((always_inline)) void rounded_group(const uint8_t *qg, const uint16_t *d16g,
                                                                 const uint16_t *m16g, int bits, uint32_t *b) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d16g));
    const __m512 m = bits == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m16g)) : _mm512_setzero_ps();
    for (int p = 0; p < GROUP / 2; p++) {
        __m512 q0, q1;
        pair_weights(qg, p, bits, &q0, &q1);
        _mm512_store_si512((__m512i *)(b + p * 16), bf16_pairs(_mm512_fmadd_ps(q0, d, m), _mm512_fmadd_ps(q1, d, m)));
    }
}

/* out rows block * 16.. of output tile column t0 (16 outputs at t0 * 16, in rows `width` wide)
 * from a 16 x 16 tile of sums c (or, with silu, gate sums c and up sums c + 256) */
static inline void store_tile(const float *c, int silu, void *out, int out_bf16, int64_t block, int64_t rows,
                              int64_t width, int64_t t0) {
    for (int r = 0; r < 16 && block * 16 + r < rows; r++) {
        const __m512 y = silu ? silu_mul16(_mm512_load_ps(c + r * 16), _mm512_load_ps(c + 256 + r * 16))
                              : _mm512_load_ps(c + r * 16);
        store_row(y, out, out_bf16, (block * 16 + r) * width + t0 * 16);
    }
}
#endif

#if HAVE_VEC_TILES
/* ---- The rounded form (below, at AMX) on AVX512-BF16 vector units, for CPUs without AMX: rows
 * > EXACT_MAX_ROWS take bfloat16 weights (w = d * q + m rounded, as a bfloat16 copy holds them)
 * times bfloat16 activations, accumulated in float32 by vec_tile_dp over the whole input. The
 * activations are laid out once per call as A tiles (per 16-row block and group, 16 rows x 16
 * input pairs; zero rows pad the last block); each output tile's weights are made once per
 * call and every row block passes over them. 2x the float32 FMA passes' multiply-adds per
 * instruction, and no unpacking per row pass. */
static void vec_rounded(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16,
                        void *out, int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int silu,
                        int num_threads) {
    const int64_t groups = k / GROUP, blocks = (rows + 15) / 16, tiles = n / 16, group_bytes = GROUP * 16 * bits / 8;
    const int64_t outs = silu ? tiles / 2 : tiles, width = silu ? n / 2 : n; /* silu: gate tile t, up t + tiles / 2 */
    uint32_t *xa = aligned_alloc(64, sizeof(uint32_t) * 256 * (size_t)(blocks * groups));
    _Pragma("omp parallel num_threads(num_threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int64_t bg = 0; bg < blocks * groups; bg++) { /* xa [block][group][16 rows][16 pairs] */
            const int64_t b = bg / groups, g = bg % groups;
            for (int r = 0; r < 16; r++) {
                const int64_t row = b * 16 + r, at = row * k + g * GROUP;
                __m512i v = _mm512_setzero_si512();
                if (row < rows && x_bf16) v = _mm512_loadu_si512((const uint16_t *)x + at);
                if (row < rows && !x_bf16)
                    v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps((const float *)x + at + 16),
                                                     _mm512_loadu_ps((const float *)x + at));
                _mm512_store_si512(xa + bg * 256 + r * 16, v);
            }
        }
        __attribute__((aligned(64))) float c[2 * 256]; /* a tile's sums (silu: gate, then up) */
        uint32_t *wb = aligned_alloc(64, sizeof(uint32_t) * 2 * 256 * (size_t)groups); /* its weights (silu: gate, up) */
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < outs; t++) {
            for (int j = 0; j < 1 + silu; j++) {
                const int64_t tt = t + j * outs;
                for (int64_t g = 0; g < groups; g++)
                    rounded_group(qp + (tt * groups + g) * group_bytes, d16 + (tt * groups + g) * 16,
                                  m16 ? m16 + (tt * groups + g) * 16 : NULL, bits, wb + (j * groups + g) * 256);
            }
            for (int64_t b = 0; b < blocks; b++) {
                for (int j = 0; j < 1 + silu; j++)
                    vec_tile_dp(c + j * 256, 1, xa + b * groups * 256, 16, 256, wb + j * groups * 256, (int)groups);
                store_tile(c, silu, out, out_bf16, b, rows, width, t);
            }
        }
        free(wb);
    }
    free(xa);
}
#define rounded_form(...) vec_rounded(__VA_ARGS__)
#endif

#if HAVE_AMX
/* ---- AMX (Intel Sapphire Rapids and later): tile products of 16 rows x 16 outputs x 32
 * inputs, in two forms by row count.
 * - One row block (AMX_MIN_ROWS to 16 rows: decode batches) stays exact: per group, the
 *   tile's q as bfloat16 (exact) times the rows gives sum(q x), which is stored and scaled
 *   into float32 sums as the FMA path does, so the two paths agree bit for bit. int4's q
 *   become bfloat16 by a table lookup, and up to 8 rows take a block of 8, so only real
 *   rows are rescaled: with both, on the default model's whole stack streamed from memory,
 *   8 rows take 0.73x the time of the FMA passes and 16 rows 0.86x of the first exact form
 *   (4 rows break even, so the FMA passes keep 1-4).
 * - More rows (prefill chunks, large batches): the weights become bfloat16 w = d * q + m,
 *   rounded to nearest even (what a bfloat16 copy of the weights holds), made once per call
 *   for all row blocks, so a block's products accumulate in the tile registers over the whole
 *   input instead of being stored and rescaled every 32 inputs: 2 row blocks x 2 output tiles
 *   per pass, four accumulators fed by two activation and two weight tiles, over spans of
 *   rows that fit in L2 (2,048 rows: 1.2-1.3x over one span). A tile pair's first pass makes
 *   its weights group by group as it multiplies (rounded_pass), so the vector and tile units
 *   work side by side: the whole 30-layer stack at 32 rows 1.5x, at 48 rows 1.2x faster than
 *   making every weight before the first product; the later passes reuse them. Against the
 *   exact form (measured on the default model's matrices): 1.1-1.4x at 32 rows, 1.3-1.6x at
 *   64, 2.5-3x at 512; the price is each weight's bfloat16 rounding (relative 2^-9, about
 *   what rounding the activations already costs). With one block the exact form is
 *   faster: making these weights costs more than the rescaling it saves. */

#define AMX_MIN_ROWS 5
#define CHUNK_BYTES (1 << 20) /* the rounded form's activation rows per span (bf16 bytes) */

/* q as bfloat16 pairs, as bf16_pairs lays them out: exact, so the top halves of the float32s */
static inline __m512i exact_bf16_pairs(__m512 q0, __m512 q1) {
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(q0), 16);
    return _mm512_or_si512(lo, _mm512_and_si512(_mm512_castps_si512(q1), _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* B tile row p of an int4 group (inputs 2p, 2p+1 of the tile's 16 outputs) as exact bfloat16
 * pairs: each byte's two nibbles become the two halves of a dword's index into a table of
 * bf16(0..15). Four instructions, where converting through float32 takes nine. */
static inline __m512i int4_bf16_pairs(const uint8_t *qg, int p) {
    const __m512i lut = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150,
                                         0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080,
                                         0x4040, 0x4000, 0x3f80, 0);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qg + p * 16)));
    /* (b | b << 12) & 0x000F000F: the low nibble in the low word, the high one in the high word */
    const __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return _mm512_permutexvar_epi16(idx, lut);
}

/* The exact form for R (8 or 16) padded rows: xb bf16 rows, xs int4's group sums (both R rows,
 * zero padding), rows <= R of them real. */
static inline __attribute__((always_inline)) void amx_exact_block(
        const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const uint16_t *xb, const float *xs, void *out,
        int out_bf16, int64_t rows, int64_t n, int64_t k, const int bits, const int R, int num_threads) {
    const int64_t groups = k / GROUP, group_bytes = GROUP * 16 * bits / 8;
    _Pragma("omp parallel num_threads(num_threads)")
    {
        tile_config cfg = tile_config_of(3); /* C tile 0 and A tile 1: R rows; B tile 2: 16 */
        cfg.rows[0] = cfg.rows[1] = (uint8_t)R;
        _tile_loadconfig(&cfg);
        __attribute__((aligned(64))) float c[16 * 16];
        __attribute__((aligned(64))) uint32_t b[256];
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < n / 16; t++) {
            /* constant trip counts throughout, so the sums stay in registers */
            __m512 acc[16];
            _Pragma("GCC unroll 16")
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *qg = qp + (t * groups + g) * group_bytes;
                for (int l = 0; l < group_bytes; l += 64)
                    _mm_prefetch((const char *)(qg + PREFETCH * group_bytes + l), _MM_HINT_T0);
                for (int p = 0; p < GROUP / 2; p++) {
                    if (bits == 4) {
                        _mm512_store_si512((__m512i *)(b + p * 16), int4_bf16_pairs(qg, p));
                    } else {
                        __m512 q0, q1;
                        pair_weights(qg, p, bits, &q0, &q1);
                        _mm512_store_si512((__m512i *)(b + p * 16), exact_bf16_pairs(q0, q1));
                    }
                }
                _tile_zero(0);
                _tile_loadd(1, xb + g * GROUP, k * 2);
                _tile_loadd(2, b, 64);
                _tile_dpbf16ps(0, 1, 2);
                _tile_stored(0, c, 64);
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (t * groups + g) * 16)));
                if (bits == 4) {
                    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m16 + (t * groups + g) * 16)));
                    _Pragma("GCC unroll 16")
                    for (int r = 0; r < R; r++) {
                        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), d, acc[r]);
                        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * groups + g]), m, acc[r]);
                    }
                } else {
                    _Pragma("GCC unroll 16")
                    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), d, acc[r]);
                }
            }
            _Pragma("GCC unroll 16")
            for (int r = 0; r < R; r++)
                if (r < rows) store_row(acc[r], out, out_bf16, r * n + t * 16);
        }
        _tile_release();
    }
}

/* The exact form: rows <= 16 (one block of 8 or 16), xf float32 rows with int4's group sums
 * after them. */
static void amx_exact(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const float *xf, void *out,
                      int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int num_threads) {
    const int64_t groups = k / GROUP;
    const int block = rows <= 8 ? 8 : 16;
    uint16_t *xb = calloc((size_t)(block * k), sizeof(uint16_t)); /* bf16 rows, zero padding */
    for (int64_t i = 0; i < rows * k; i++) xb[i] = f32_to_bf16(xf[i]); /* exact: xf is bf16-valued */
    float *xs = calloc((size_t)(block * groups), sizeof(float));        /* group sums, zero padding */
    if (bits == 4) memcpy(xs, xf + rows * k, sizeof(float) * (size_t)(rows * groups));
    if (bits == 4 && block == 8) amx_exact_block(qp, d16, m16, xb, xs, out, out_bf16, rows, n, k, 4, 8, num_threads);
    else if (bits == 4) amx_exact_block(qp, d16, m16, xb, xs, out, out_bf16, rows, n, k, 4, 16, num_threads);
    else if (block == 8) amx_exact_block(qp, d16, m16, xb, xs, out, out_bf16, rows, n, k, 8, 8, num_threads);
    else amx_exact_block(qp, d16, m16, xb, xs, out, out_bf16, rows, n, k, 8, 16, num_threads);
    free(xb);
    free(xs);
}

/* One pass of RB (1-2) row blocks (16 rows at x0, x1) x NT (1-2) output tiles (t, t + ts) over all groups:
 * sums in C tiles 0, 1 (x0) and 2, 3 (x1); A tiles 4, 5; B tiles 6, 7; c gets them as
 * [RB][NT][16 x 16]. b holds the NT tiles' B tiles group by group (group g's at b + g * NT * 256).
 * A tile pair's first pass (make: qp given, t its first tile) makes each group's weights into b as
 * it goes, so the vector units make group g + 1 while the tile unit multiplies group g (made all
 * first, each unit idled while the other worked: at 32 rows the weights cost more than the
 * products); the later passes read b. The same products in the same order either way. */
static inline __attribute__((always_inline)) void rounded_pass(const uint8_t *qp, const uint16_t *d16,
                                                                const uint16_t *m16, int64_t t, int64_t ts, int bits,
                                                                const uint16_t *x0, const uint16_t *x1, uint32_t *b,
                                                                int64_t groups, int64_t k, const int RB, const int NT,
                                                                float *c) {
    const int64_t group_bytes = GROUP * 16 * bits / 8;
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (RB > 1) _tile_zero(2);
    if (RB > 1 && NT > 1) _tile_zero(3);
    for (int64_t g = 0; g < groups; g++) {
        uint32_t *bg = b + g * NT * 256;
        for (int j = 0; qp && j < NT; j++) {
            const int64_t tg = (t + j * ts) * groups + g; /* the weights come from memory: fetched well ahead */
            for (int l = 0; l < group_bytes; l += 64)
                _mm_prefetch((const char *)(qp + (tg + 4 * PREFETCH) * group_bytes + l), _MM_HINT_T0);
            rounded_group(qp + tg * group_bytes, d16 + tg * 16, m16 ? m16 + tg * 16 : NULL, bits, bg + j * 256);
        }
        _tile_loadd(4, x0 + g * GROUP, k * 2);
        _tile_loadd(6, bg, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (NT > 1) {
            _tile_loadd(7, bg + 256, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (RB > 1) {
            _tile_loadd(5, x1 + g * GROUP, k * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (NT > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 64);
    if (NT > 1) _tile_stored(1, c + 256, 64);
    if (RB > 1) _tile_stored(2, c + NT * 256, 64);
    if (RB > 1 && NT > 1) _tile_stored(3, c + 3 * 256, 64);
}

/* The rounded form: rows > 16, x float32 or bfloat16 as given. With silu, n is a gate/up
 * projection's 2 x width: each pass pairs gate tile t with up tile t + tiles / 2 and writes
 * silu(gate) * up [rows, n / 2] as silu_and_mul would (the same sums, the same bits), so the
 * gate and up sums never go to memory. */
static void amx_rounded(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16,
                        void *out, int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int silu,
                        int num_threads) {
    const int64_t groups = k / GROUP, blocks = (rows + 15) / 16, tiles = n / 16, full = x_bf16 ? rows / 16 : 0;
    const int64_t pair_step = silu ? 1 : 2, pairs_end = silu ? tiles / 2 : tiles, ts = silu ? tiles / 2 : 1;
    /* bf16 rows: bfloat16 x in place but for its last partial block, which is copied with zero
     * padding; float32 x rounded here */
    const int64_t copied = rows - full * 16; /* rows in xb, then zeros to the block's end */
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)((blocks - full) * 16 * k));
    if (x_bf16) memcpy(xb, (const uint16_t *)x + full * 16 * k, sizeof(uint16_t) * (size_t)(copied * k));
    memset(xb + copied * k, 0, sizeof(uint16_t) * (size_t)(((blocks - full) * 16 - copied) * k));
    _Pragma("omp parallel num_threads(num_threads)")
    {
        if (!x_bf16) {
            _Pragma("omp for schedule(static)")
            for (int64_t i = 0; i < rows * k; i += 16)
                _mm256_storeu_si256((__m256i *)(xb + i), f32_to_bf16x16(_mm512_loadu_ps((const float *)x + i)));
        }
        load_tile_config(8);
        __attribute__((aligned(64))) float c[4 * 256]; /* a pass's sums */
        uint32_t *b = aligned_alloc(64, sizeof(uint32_t) * 2 * 256 * (size_t)groups);
        /* rows in spans of about CHUNK_BYTES of activations, which stay in L2 while every
         * output tile passes over them (the weights are made again per span) */
        const int64_t span = CHUNK_BYTES / (32 * k) < 2 ? 2 : CHUNK_BYTES / (32 * k) / 2 * 2; /* blocks, even */
        for (int64_t rb0 = 0; rb0 < blocks; rb0 += span) {
            const int64_t rb1 = rb0 + span < blocks ? rb0 + span : blocks;
            _Pragma("omp for schedule(static)")
            for (int64_t t = 0; t < pairs_end; t += pair_step) {
                const int nt = silu || tiles - t >= 2 ? 2 : 1;
                for (int64_t rb = rb0; rb < rb1; rb += 2) {
                    const int rbn = rb1 - rb < 2 ? 1 : 2;
                    const uint16_t *x0 = rb < full ? (const uint16_t *)x + rb * 16 * k : xb + (rb - full) * 16 * k;
                    const uint16_t *x1 = rb + 1 < full ? x0 + 16 * k : xb + (rb + 1 - full) * 16 * k;
                    const uint8_t *make = rb == rb0 ? qp : NULL; /* the first pass makes b */
                    if (rbn == 2 && nt == 2) rounded_pass(make, d16, m16, t, ts, bits, x0, x1, b, groups, k, 2, 2, c);
                    else if (rbn == 2) rounded_pass(make, d16, m16, t, ts, bits, x0, x1, b, groups, k, 2, 1, c);
                    else if (nt == 2) rounded_pass(make, d16, m16, t, ts, bits, x0, x1, b, groups, k, 1, 2, c);
                    else rounded_pass(make, d16, m16, t, ts, bits, x0, x1, b, groups, k, 1, 1, c);
                    for (int i = 0; i < rbn; i++) {
                        if (silu) store_tile(c + i * 2 * 256, 1, out, out_bf16, rb + i, rows, n / 2, t);
                        else
                            for (int j = 0; j < nt; j++)
                                store_tile(c + (i * nt + j) * 256, 0, out, out_bf16, rb + i, rows, n, t + j);
                    }
                }
            }
        }
        free(b);
        _tile_release();
    }
    free(xb);
}
#define USE_AMX(rows) ((rows) >= AMX_MIN_ROWS && amx_ready())
#define rounded_form(...) amx_rounded(__VA_ARGS__)
#else
#define USE_AMX(rows) 0
#define amx_exact(...) ((void)0)
#endif
#if HAVE_BF16_TILES
#define USE_ROUNDED(rows) ((rows) > EXACT_MAX_ROWS && bf16_tiles_ready()) /* the rounded form's rows */
#else
#define USE_ROUNDED(rows) 0
#define rounded_form(...) ((void)0)
#endif
#endif

#ifdef __AVX512F__
/* The path a row count takes (see the top of this file), for both widths: bits 4 with m16
 * the mins, or 8 with m16 NULL. */
static void quant_matmul(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16,
                         void *out, int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int num_threads) {
    if (USE_ROUNDED(rows)) {
        rounded_form(qp, d16, m16, x, x_bf16, out, out_bf16, rows, n, k, bits, 0, num_threads);
        return;
    }
    float *xf = float_rows(x, x_bf16, rows, k, bits == 4); /* int4's min term needs the group sums */
    if (USE_AMX(rows))
        amx_exact(qp, d16, m16, xf, out, out_bf16, rows, n, k, bits, num_threads);
    else if (bits == 4)
        int4_tiles(qp, d16, m16, xf, xf + rows * k, out, out_bf16, rows, n, k, num_threads);
    else
        int8_tiles(qp, d16, NULL, xf, NULL, out, out_bf16, rows, n, k, num_threads);
    free(xf);
}
#endif

/* y [M, N] = x [M, K] W^T; N a multiple of 16, K of 32. */
void int4_matmul(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16, void *out,
                 int out_bf16, int64_t rows, int64_t n, int64_t k, int num_threads) {
#ifdef __AVX512F__
    quant_matmul(qp, d16, m16, x, x_bf16, out, out_bf16, rows, n, k, 4, num_threads);
#else
    (void)qp, (void)d16, (void)m16, (void)x, (void)x_bf16, (void)out, (void)out_bf16, (void)rows, (void)n, (void)k,
        (void)num_threads;
#endif
}

void int8_matmul(const int8_t *qp, const uint16_t *d16, const void *x, int x_bf16, void *out, int out_bf16,
                 int64_t rows, int64_t n, int64_t k, int num_threads) {
#ifdef __AVX512F__
    quant_matmul((const uint8_t *)qp, d16, NULL, x, x_bf16, out, out_bf16, rows, n, k, 8, num_threads);
#else
    (void)qp, (void)d16, (void)x, (void)x_bf16, (void)out, (void)out_bf16, (void)rows, (void)n, (void)k,
        (void)num_threads;
#endif
}

/* out [rows, n / 2] = silu(x W_gate^T) * (x W_up^T) for a gate/up projection W [n, k] (gate rows
 * first), in one pass where the rounded form serves (bf16 tile products, rows > 16, n / 16 even):
 * returns 1, or 0 where it does not and the caller multiplies and applies silu_and_mul itself.
 * bits 4 (m16 the mins) or 8 (m16 NULL). */
int quant_matmul_silu(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16,
                      void *out, int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int num_threads) {
#if defined(__AVX512F__) && HAVE_BF16_TILES
    if (!USE_ROUNDED(rows) || (n / 16) % 2) return 0;
    rounded_form(qp, d16, m16, x, x_bf16, out, out_bf16, rows, n, k, bits, 1, num_threads);
    return 1;
#else
    (void)qp, (void)d16, (void)m16, (void)x, (void)x_bf16, (void)out, (void)out_bf16, (void)rows, (void)n, (void)k,
        (void)bits, (void)num_threads;
    return 0;
#endif
}

/* The row count from which weights are rounded to bfloat16 (the rounded form, on AMX or vectors;
 * below it every path computes the same exact sums), or 0 where this CPU or build has neither. */
int quant_matmul_rounded_rows(void) {
#if HAVE_BF16_TILES
    return bf16_tiles_ready() ? EXACT_MAX_ROWS + 1 : 0;
#else
    return 0;
#endif
}
