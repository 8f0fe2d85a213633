/* A step's whole stack of decoder layers in one call, for quantized (int4/int8)
 * Llama-family models: the same C kernels the per-op path calls, in the same order on the
 * same numbers (so decode tokens come out bit-identical), without a return to Python
 * between them. Short prompt chunks come along: the chunk kernel attends for them where it
 * serves (chunk_attention.c: the context read once per chunk), else each token is a row of the
 * decode kernel whose context ends at itself (rotary_store_kv stores the whole chunk's keys
 * first). Speculative verification chunks are always such rows (the caller lists them with the
 * decodes): float32, exactly as decoding each token would attend, so speculation changes no
 * greedy token.
 *
 * Why: at one sequence the ~270 kernel calls of a step each cost 10-30 us of Python and
 * dispatch around a few us of work, and the pauses cost more than themselves: a matmul
 * called after 60 us of Python runs at half the speed of one called back to back (the
 * second core's thread has gone idle). Here they follow each other directly.
 *
 * table: per layer STACK_LAYER_SLOTS addresses (kernels.h; pagoda/ops/cpu/decoder_stack.py): the q/k/v,
 * o, gate/up and down weight tiles (three each; int8 leaves the third 0), the two norm
 * weights, the QKV bias (0: none) and the layer's K and V caches.
 * x [T, hidden] float32: the embeddings on entry, the last layer's MLP output on return;
 * residual [T, hidden] float32 receives the residual stream (the final norm adds them).
 * cos/sin [T, D], slots [T], rows [T, 3] and the block table as the per-op kernels take them.
 * lora_table (0: no adapters in this step): per layer STACK_LORA_SLOTS entries, for the qkv,
 * o, gate_up and down linears in turn their LoRA stack's A, B^T, column ranges, width and
 * scaling addresses and its max width; lora_segments [lora_nseg, 3] the (slot, first row, end row) runs. Each
 * linear's adapters are added after its matmul (and the QKV bias), by the kernel the per-op
 * path's lora_apply calls.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { QKV = 0, O = 3, GATE_UP = 6, DOWN = 9, INPUT_NORM = 12, POST_NORM = 13, QKV_BIAS = 14, K_CACHE = 15, V_CACHE = 16 };

/* the adapters of one linear (e: its 6 LoRA table entries) added into out [rows, n] */
static void lora(const int64_t *e, const float *x, float *out, const int64_t *segments, int nseg, int64_t n,
                 int64_t k, int num_threads) {
    lora_apply(out, n, x, k, segments, nseg, (const float *)e[0], (const float *)e[1], (const int32_t *)e[2],
               (const int32_t *)e[3], (const float *)e[4], e[5], k, n, num_threads);
}

/* out [rows, n] float32 = x [rows, k] (bfloat16 where x_bf16, else float32) times the tiles at w[0..2] */
static void matmul(const int64_t *w, int bits, const void *x, int x_bf16, float *out, int64_t rows, int64_t n,
                   int64_t k, int num_threads) {
    if (bits == 4)
        int4_matmul((const uint8_t *)w[0], (const uint16_t *)w[1], (const uint16_t *)w[2], x, x_bf16, out, 0, rows,
                    n, k, num_threads);
    else
        int8_matmul((const int8_t *)w[0], (const uint16_t *)w[1], x, x_bf16, out, 0, rows, n, k, num_threads);
}

void decode_stack(const int64_t *table, int num_layers, int bits, float *x, float *residual, int64_t t,
                  int64_t hidden, int hq, int hk, int d, int64_t inter, float eps, int jiutian, const float *cos,
                  const float *sin, int kv_kind, const int64_t *slots, const int64_t *block_table,
                  int64_t bt_stride, const int64_t *rows, const int64_t *chunks, int64_t n_chunks,
                  const int64_t *decodes, int64_t n_decodes, int page_size, float scale, int max_len,
                  const int64_t *lora_table, const int64_t *lora_segments, int lora_nseg, int num_threads) {
    const int64_t q_size = (int64_t)hq * d, qkv_size = q_size + 2 * (int64_t)hk * d;
    /* The matmuls' inputs (the normed rows, attention's output, the MLP's activations) are
     * written in bfloat16 by the kernels before them: every matmul rounds its input to bfloat16
     * anyway, so the products are the same, and the rounded form reads whole blocks of bfloat16
     * rows in place where float32 rows were first copied and rounded (a decode step's matmuls
     * ~10% faster at 64 rows). LoRA's kernel takes float32 rows, so with adapters they stay so. */
    const int xb = lora_table == 0, xs = xb ? (int)sizeof(uint16_t) : (int)sizeof(float);
    void *h = malloc((size_t)xs * (size_t)(t * hidden));
    float *qkv = malloc(sizeof(float) * (size_t)(t * qkv_size));
    float *q = malloc(sizeof(float) * (size_t)(t * q_size));
    void *att = malloc((size_t)xs * (size_t)(t * q_size));
    float *gate_up = NULL; /* the gate/up sums, where they are not fused with silu (allocated then) */
    void *act = malloc((size_t)xs * (size_t)(t * inter));
    for (int l = 0; l < num_layers; l++) {
        const int64_t *w = table + (int64_t)l * STACK_LAYER_SLOTS;
        const int64_t *lw = lora_table ? lora_table + (int64_t)l * STACK_LORA_SLOTS : 0;
        if (l == 0) {
            rms_norm(x, (const float *)w[INPUT_NORM], h, xb, t, hidden, eps, jiutian, num_threads);
            memcpy(residual, x, sizeof(float) * (size_t)(t * hidden));
        } else {
            add_rms_norm(x, 0, residual, (const float *)w[INPUT_NORM], h, xb, residual, t, hidden, eps, jiutian,
                         num_threads);
        }
        matmul(w + QKV, bits, h, xb, qkv, t, qkv_size, hidden, num_threads);
        if (w[QKV_BIAS])
            for (int64_t i = 0; i < t * qkv_size; i++) qkv[i] += ((const float *)w[QKV_BIAS])[i % qkv_size];
        if (lw) lora(lw, h, qkv, lora_segments, lora_nseg, qkv_size, hidden, num_threads);
        void *k_cache = (void *)w[K_CACHE], *v_cache = (void *)w[V_CACHE];
        rotary_store_kv(qkv, qkv + q_size, qkv + q_size + (int64_t)hk * d, 0, qkv_size, cos, sin, q, 0, k_cache,
                        v_cache, kv_kind, slots, t, hq, hk, d, num_threads);
        /* prompt chunks to the chunk kernel where it serves; then the decode kernel's rows: the
         * decodes and verification chunks' tokens, or every token where it did not serve */
        const int chunked = n_chunks > 0 && paged_chunk_attention(q, q_size, k_cache, v_cache, kv_kind, block_table,
                                                                  bt_stride, chunks, n_chunks, att, xb, q_size, hq,
                                                                  hk, d, page_size, scale, num_threads);
        if (!chunked || n_decodes > 0)
            paged_decode_attention(q, q_size, k_cache, v_cache, kv_kind, block_table, bt_stride,
                                   chunked ? decodes : rows, chunked ? n_decodes : t, att, xb, q_size, hq, hk, d,
                                   page_size, scale, max_len, num_threads);
        matmul(w + O, bits, att, xb, x, t, hidden, q_size, num_threads);
        if (lw) lora(lw + 6, att, x, lora_segments, lora_nseg, hidden, q_size, num_threads);
        add_rms_norm(x, 0, residual, (const float *)w[POST_NORM], h, xb, residual, t, hidden, eps, jiutian,
                     num_threads);
        /* gate/up and silu in one pass where the rounded form serves (no adapter to add between) */
        if (lw || !quant_matmul_silu((const uint8_t *)w[GATE_UP], (const uint16_t *)w[GATE_UP + 1],
                                     bits == 4 ? (const uint16_t *)w[GATE_UP + 2] : NULL, h, xb, act, xb, t,
                                     2 * inter, hidden, bits, num_threads)) {
            if (!gate_up) gate_up = malloc(sizeof(float) * (size_t)(t * 2 * inter));
            matmul(w + GATE_UP, bits, h, xb, gate_up, t, 2 * inter, hidden, num_threads);
            if (lw) lora(lw + 12, h, gate_up, lora_segments, lora_nseg, 2 * inter, hidden, num_threads);
            silu_and_mul(gate_up, 0, act, xb, t, inter, num_threads);
        }
        matmul(w + DOWN, bits, act, xb, x, t, hidden, inter, num_threads);
        if (lw) lora(lw + 18, act, x, lora_segments, lora_nseg, hidden, inter, num_threads);
    }
    free(h);
    free(qkv);
    free(q);
    free(att);
    free(gate_up);
    free(act);
}
