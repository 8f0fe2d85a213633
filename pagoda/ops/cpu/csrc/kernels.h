/* Every C function pagoda calls, declared once: the files that define them include this
 * too, so the compiler checks that both sides agree, and tests/unit/test_native_bindings.py
 * checks these declarations against the ctypes table in native.py (SIGNATURES) and the
 * shared constants below against theirs. What the arguments mean is documented at each
 * definition. */
#ifndef PAGODA_KERNELS_H
#define PAGODA_KERNELS_H
#include <stdint.h>

/* How a KV cache stores each token's head (pagoda/ops/kv_quant.py for the int8 rows). */
enum kv_kind {
    KV_F32 = 0,
    KV_BF16 = 1,
    KV_INT8 = 2, /* head_dim signed bytes, then a float16 scale per group: value = byte * scale */
};

/* Values per scale in an int8 row: 32, or the largest power of two dividing head_dim
 * (bit arithmetic, no division: kernels ask per value read). */
static inline int kv_int8_group(int d) {
    const int low = d & -d;
    return low < 32 ? low : 32;
}

/* Which group value e of an int8 row belongs to. */
static inline int kv_int8_group_of(int d, int e) { return e >> __builtin_ctz((unsigned)kv_int8_group(d)); }

/* Bytes of one head's int8 row, scales included. */
static inline int kv_int8_row_bytes(int d) { return d + 2 * (d / kv_int8_group(d)); }

void rms_norm(const float *x, const float *w, void *out, int out_bf16, int64_t rows, int64_t cols, float eps,
              int jiutian, int num_threads);
void add_rms_norm(const void *x, int x_bf16, const float *residual, const float *w, void *out, int out_bf16,
                  float *summed, int64_t rows, int64_t cols, float eps, int jiutian, int num_threads);
void rotary_store_kv(const void *q, const void *k, const void *v, int x_bf16, int64_t row_stride, const float *cos,
                     const float *sin, void *q_out, int q_out_bf16, void *k_cache, void *v_cache, int cache_kind,
                     const int64_t *slots, int64_t tokens, int hq, int hk, int d, int num_threads);
void silu_and_mul(const void *x, int x_bf16, void *out, int out_bf16, int64_t rows, int64_t n, int num_threads);
void paged_decode_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            int kv_kind, const int64_t *block_table, int64_t bt_stride, const int64_t *rows,
                            int64_t n, void *out, int out_bf16, int64_t out_stride, int hq, int hk, int d,
                            int page_size, float scale, int max_len, int num_threads);
int chunk_attention_fits(int kv_kind, int hq, int hk, int d);
int paged_chunk_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_kind,
                          const int64_t *block_table, int64_t bt_stride, const int64_t *rows, int64_t n, void *out,
                          int out_bf16, int64_t out_stride, int hq, int hk, int d, int page_size, float scale,
                          int num_threads);
void int4_matmul(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16, void *out,
                 int out_bf16, int64_t rows, int64_t n, int64_t k, int num_threads);
void int8_matmul(const int8_t *qp, const uint16_t *d16, const void *x, int x_bf16, void *out, int out_bf16,
                 int64_t rows, int64_t n, int64_t k, int num_threads);
int quant_matmul_silu(const uint8_t *qp, const uint16_t *d16, const uint16_t *m16, const void *x, int x_bf16,
                      void *out, int out_bf16, int64_t rows, int64_t n, int64_t k, int bits, int num_threads);

void lora_apply(float *y, int64_t y_stride, const float *x, int64_t x_stride, const int64_t *segments, int nseg,
                const float *a, const float *bt, const int32_t *cols, const int32_t *width, const float *scaling,
                int64_t max_width, int64_t in, int64_t out, int num_threads);

void argmax_rows(const void *x, int x_bf16, int64_t rows, int64_t cols, int64_t *out, int num_threads);
int quant_matmul_available(void);
int quant_matmul_rounded_rows(void);

/* decode_stack's table: addresses per layer (decode_stack.c says which); its LoRA table:
 * per layer and linear (qkv, o, gate_up, down) A, B^T, column ranges, width, scaling and max width. */
#define STACK_LAYER_SLOTS 17
#define STACK_LORA_SLOTS 24
void decode_stack(const int64_t *table, int num_layers, int bits, float *x, float *residual, int64_t t,
                  int64_t hidden, int hq, int hk, int d, int64_t inter, float eps, int jiutian, const float *cos,
                  const float *sin, int kv_kind, const int64_t *slots, const int64_t *block_table,
                  int64_t bt_stride, const int64_t *rows, const int64_t *chunks, int64_t n_chunks,
                  const int64_t *decodes, int64_t n_decodes, int page_size, float scale, int max_len,
                  const int64_t *lora_table, const int64_t *lora_segments, int lora_nseg, int num_threads);

#endif
