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
 * model's layers). From 10 rows on, where the CPU has AMX, each group is one tile product
 * instead (below). Activations are rounded to bfloat16 on both paths, so the products are
 * exact and the two paths agree bit for bit: a row's result does not depend on the rows
 * beside it.
 *
 * Layout (made by pagoda/ops/cpu.py): int4 qp [N/16][K/32][16 pairs][16 outputs] bytes
 * with input 2p in the low nibble and 2p+1 in the high one; int8 qp [N/16][K/32][32
 * inputs][16 outputs]; d and m [N/16][K/32][16] float16. x [M, K] float32 or bfloat16;
 * y [M, N] float32 or bfloat16.
 *
 * Built by pagoda/ops/native.py with -O3 -march=native -fopenmp; called through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"
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
    if (!out_bf16) {
        _mm512_storeu_ps((float *)out + o, y);
        return;
    }
    float v[16];
    _mm512_storeu_ps(v, y);
    for (int j = 0; j < 16; j++) ((uint16_t *)out)[o + j] = f32_to_bf16(v[j]);
}

/* q of inputs 2p and 2p+1 of a group, for the tile's 16 outputs, as float32 (exact) */
static inline __attribute__((always_inline)) void pair_weights(const uint8_t *qg, int p, const int bits, __m512 *w0,
                                                                __m512 *w1) {
    if (bits == 4) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qg + p * 16)));
        *w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
        *w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* ---- AMX (Intel Sapphire Rapids and later): 16 rows x 16 outputs x 32 inputs per
 * instruction. Per group, the tile's weights become bfloat16 pairs (q is exact in bf16),
 * one tile product per 16 rows gives sum(q x), which is scaled into float32 sums as the
 * FMA path does. A tile's bfloat16 weights are made once for all row blocks, and a block's
 * sums stay in registers across groups (1.4x the speed of rebuilding and reloading them; the
 * loops over a block's rows have constant trip counts, padding included, or GCC keeps the
 * sums on the stack: another 1.1-1.3x).
 * Used from AMX_MIN_ROWS rows on (prefill chunks, large batches). */
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MIN_ROWS 10

static int amx_ready(void) { /* Linux hands out the tile registers on request, once per process */
    static int state = 0; /* 0 unknown, 1 yes, -1 no */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* weights of input pair p for the tile's 16 outputs as 16 (bf16 q[2p], bf16 q[2p+1]) lanes */
static inline __m512i bf16_pairs(__m512 w0, __m512 w1) {
    const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(w0), 16);
    return _mm512_or_si512(lo, _mm512_and_si512(_mm512_castps_si512(w1), _mm512_set1_epi32((int)0xFFFF0000u)));
}

static void amx_tiles(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const float *xf, void *out,
                      int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int num_threads) {
    const int64_t groups = k / GROUP, group_bytes = GROUP * 16 * bits / 8, blocks = (rows + 15) / 16;
    uint16_t *xb = calloc((size_t)(blocks * 16 * k), sizeof(uint16_t)); /* bf16 rows, zero padding */
    for (int64_t i = 0; i < rows * k; i++) xb[i] = f32_to_bf16(xf[i]); /* exact: xf is bf16-valued */
    float *xs = calloc((size_t)(blocks * 16 * groups), sizeof(float)); /* group sums, zero padding */
    if (bits == 4) memcpy(xs, xf + rows * k, sizeof(float) * (size_t)(rows * groups));
    _Pragma("omp parallel num_threads(num_threads)")
    {
        tile_config cfg = {0};
        cfg.palette = 1;
        for (int i = 0; i < 3; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
        _tile_loadconfig(&cfg);
        __attribute__((aligned(64))) float c[16 * 16];
        /* the tile's weights as bf16 B tiles, every group: made once, read by every row block */
        uint32_t *b = aligned_alloc(64, sizeof(uint32_t) * 16 * 16 * (size_t)groups);
        _Pragma("omp for schedule(static)")
        for (int64_t t = 0; t < n / 16; t++) {
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *qg = qp + t * groups * group_bytes + g * group_bytes;
                for (int p = 0; p < GROUP / 2; p++) {
                    __m512 w0, w1;
                    pair_weights(qg, p, bits, &w0, &w1);
                    _mm512_store_si512((__m512i *)(b + (g * 16 + p) * 16), bf16_pairs(w0, w1));
                }
            }
            for (int64_t rb = 0; rb < blocks; rb++) {
                /* constant trip counts throughout, so the block's sums stay in registers */
                __m512 acc[16];
                _Pragma("GCC unroll 16")
                for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                const float *xsb = xs + rb * 16 * groups;
                for (int64_t g = 0; g < groups; g++) {
                    _tile_zero(0);
                    _tile_loadd(1, xb + rb * 16 * k + g * GROUP, k * 2);
                    _tile_loadd(2, b + g * 256, 64);
                    _tile_dpbf16ps(0, 1, 2);
                    _tile_stored(0, c, 64);
                    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (t * groups + g) * 16)));
                    if (bits == 4) {
                        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m16 + (t * groups + g) * 16)));
                        _Pragma("GCC unroll 16")
                        for (int r = 0; r < 16; r++) {
                            acc[r] = _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), d, acc[r]);
                            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xsb[r * groups + g]), m, acc[r]);
                        }
                    } else {
                        _Pragma("GCC unroll 16")
                        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(_mm512_load_ps(c + r * 16), d, acc[r]);
                    }
                }
                const int rn = rows - rb * 16 < 16 ? (int)(rows - rb * 16) : 16;
                _Pragma("GCC unroll 16")
                for (int r = 0; r < 16; r++)
                    if (r < rn) store_row(acc[r], out, out_bf16, (rb * 16 + r) * n + t * 16);
            }
        }
        free(b);
        _tile_release();
    }
    free(xb);
    free(xs);
}
#define USE_AMX(rows) ((rows) >= AMX_MIN_ROWS && amx_ready())
#else
#define USE_AMX(rows) 0
#define amx_tiles(...) ((void)0)
#endif
#endif

/* y [M, N] = x [M, K] W^T; N a multiple of 16, K of 32. */
void int4_matmul(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16, void *out,
                 int out_bf16, int64_t rows, int64_t n, int64_t k, int num_threads) {
#ifdef __AVX512F__
    float *xf = float_rows(x, x_bf16, rows, k, 1);
    if (USE_AMX(rows))
        amx_tiles(qp, d16, m16, xf, out, out_bf16, rows, n, k, 4, num_threads);
    else
        int4_tiles(qp, d16, m16, xf, xf + rows * k, out, out_bf16, rows, n, k, num_threads);
    free(xf);
#else
    (void)qp, (void)d16, (void)m16, (void)x, (void)x_bf16, (void)out, (void)out_bf16, (void)rows, (void)n, (void)k,
        (void)num_threads;
#endif
}

void int8_matmul(const int8_t *qp, const uint16_t *d16, const void *x, int x_bf16, void *out, int out_bf16,
                 int64_t rows, int64_t n, int64_t k, int num_threads) {
#ifdef __AVX512F__
    float *xf = float_rows(x, x_bf16, rows, k, 0);
    if (USE_AMX(rows))
        amx_tiles((const uint8_t *)qp, d16, NULL, xf, out, out_bf16, rows, n, k, 8, num_threads);
    else
        int8_tiles((const uint8_t *)qp, d16, NULL, xf, NULL, out, out_bf16, rows, n, k, num_threads);
    free(xf);
#else
    (void)qp, (void)d16, (void)x, (void)x_bf16, (void)out, (void)out_bf16, (void)rows, (void)n, (void)k,
        (void)num_threads;
#endif
}
