"""Triton paged attention for CUDA and MUSA: split-K decode and varlen (chunked) prefill.

Both kernels read K/V rows in place from the paged pool: a cache is [num_slots, Hk, W],
token p of sequence b lives in slot ``block_table[b, p // page_size] * page_size +
p % page_size``, so any page size works (each key row is gathered by its slot). Caches
may be bfloat16, float16, float32 or int8 rows in pagoda/ops/kv_quant.py's format
(head_dim bytes, then a float16 scale per group of ``group_size(head_dim)``), which the
kernels dequantize as they load. One program serves a whole GQA group: the group's query
heads are rows of one tile, so each K/V load is shared by all of them.

Arithmetic: scores and softmax in float32 (exp2 with log2(e) folded into the scale); the
two products run in the compute dtype: the query's when it is bfloat16/float16 and the
cache holds the same dtype or int8 (dequantized keys and values, and the probabilities,
are rounded to it, as FlashAttention does), float32 otherwise (IEEE, not TF32). Under
Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) bfloat16 products are taken in
float32: the interpreter's bfloat16 dot is wrong (Triton 3.9).

Decode (one query per sequence) is flash-decoding: the grid is (batch, kv heads,
num_splits) with num_splits fixed from the block table's capacity, so it does not depend
on the context lengths and a CUDA graph can capture it; each split takes an equal share
of its sequence's context (read on the device), writes a partial (max, sum, acc), and a
small kernel combines the splits (with one split the program writes the output itself).
Prefill handles any ragged batch (decodes included): query i of sequence b sits at
position seq_len - query_len + i and sees keys 0..that position (or all seq_len keys when
causal=False), online softmax, no score matrix.

Launchers take explicit tensors, register nothing, and return DECLINE for inputs they do
not handle (the caller falls through to another kernel or the reference).
"""

from __future__ import annotations


import torch

from pagoda.ops.cuda.triton_common import (
    AVAILABLE, CACHE_DTYPES, FLOAT_DTYPES, interpreted, next_pow2, runnable, tl, triton,
)
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.kv_quant import cache_row_width, group_size
from pagoda.ops.registry import DECLINE, kernel

_LOG2E = 1.4426950408889634

# Decode split heuristic: at least this many context tokens per split, at most this many
# splits, and no more splits than needed to give the device about this many programs.
SPLIT_MIN_TOKENS = 256
MAX_SPLITS = 32
TARGET_PROGRAMS = 1024


def _runnable(*tensors: torch.Tensor) -> bool:
    return AVAILABLE and runnable(_prefill_kernel, *tensors)


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter."""
    return AVAILABLE and interpreted(_prefill_kernel)  # (no kernels are defined without triton)






def _check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Shapes, dtypes and strides the kernels assume (False: decline)."""
    if q.dtype not in FLOAT_DTYPES or k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        return False
    if q.dim() != 3 or k_cache.dim() != 3:
        return False
    head_dim, hq, hk = q.shape[-1], q.shape[1], k_cache.shape[1]
    if hk == 0 or hq % hk != 0 or v_cache.shape != k_cache.shape:
        return False
    if k_cache.shape[-1] != cache_row_width(head_dim, k_cache.dtype):
        return False
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return False
    if k_cache.dtype == torch.int8:  # the float16 scales are read through a float16 view
        if any(s % 2 for s in (*k_cache.stride()[:2], *v_cache.stride()[:2], head_dim)):
            return False
        if k_cache.data_ptr() % 2 or v_cache.data_ptr() % 2:
            return False
    return _runnable(q) and q.device == k_cache.device == v_cache.device


def _compute_dtype(q: torch.Tensor, cache: torch.Tensor):
    """The products' dtype (a triton dtype) and input precision: the query's 16-bit dtype when
    the cache holds the same one or int8; float32 (IEEE, not TF32) otherwise, so a float32
    cache is not rounded, nor a bfloat16 one squeezed into float16's range."""
    if q.dtype == torch.float16 and cache.dtype in (torch.float16, torch.int8):
        return tl.float16, None
    if q.dtype == torch.bfloat16 and cache.dtype in (torch.bfloat16, torch.int8) and not interpreting():
        return tl.bfloat16, None
    return tl.float32, "ieee"


def _scale_view(cache: torch.Tensor) -> torch.Tensor:
    """The float16 scales of an int8 cache are read through a float16 view of its bytes."""
    return cache.view(torch.float16) if cache.dtype == torch.int8 else cache


def _block_n(dot_dtype) -> int:
    """Keys per loop step: 32 with 16-bit products; 16 with float32 ones (an sm_90 build of
    the float32 kernels spills registers at 32), and in the interpreter (faster there)."""
    return 16 if interpreting() or dot_dtype == tl.float32 else 32


def _prefill_warps(dot_dtype) -> int:
    """8 warps for 64 query rows with 16-bit products (4 spill registers on sm_80), else 4."""
    return 4 if dot_dtype == tl.float32 else 8


def default_num_splits(batch: int, num_kv_heads: int, capacity: int) -> int:
    """Splits for a decode over block tables holding `capacity` tokens per sequence: a
    function of the shapes only (not of the lengths), so a captured graph stays valid."""
    by_len = max(1, -(-capacity // SPLIT_MIN_TOKENS))
    by_occupancy = max(1, -(-TARGET_PROGRAMS // max(1, batch * num_kv_heads)))
    return max(1, min(MAX_SPLITS, by_len, by_occupancy))


if AVAILABLE:

    @triton.jit
    def _load_rows(ptr, scale_ptr, row_off, d, row_mask, d_mask, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   QUANT_GROUP: tl.constexpr, INT8: tl.constexpr):
        """[rows, D_PAD] K or V rows at element offsets row_off; int8 rows dequantized to float32
        (each row's scales loaded once, as [rows, groups], and broadcast over their groups)."""
        x = tl.load(ptr + row_off[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0)
        if INT8:
            NUM_GROUPS: tl.constexpr = D_PAD // QUANT_GROUP  # D_PAD and QUANT_GROUP are powers of two
            gi = tl.arange(0, NUM_GROUPS)
            scale = tl.load(scale_ptr + (row_off[:, None] + HEAD_DIM) // 2 + gi[None, :],
                            mask=row_mask[:, None] & (gi[None, :] * QUANT_GROUP < HEAD_DIM), other=0.0)
            x = tl.reshape(x.to(tl.float32), [x.shape[0], NUM_GROUPS, QUANT_GROUP]) * scale.to(tl.float32)[:, :, None]
            x = tl.reshape(x, [x.shape[0], D_PAD])
        return x

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, block_table_ptr, seq_lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
        stride_qb, stride_qh, stride_kslot, stride_khead, stride_vslot, stride_vhead, stride_bt, stride_ob, stride_oh,
        page_size, qk_scale,
        NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_GROUP: tl.constexpr, INT8: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS
        split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        table = block_table_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            page = tl.load(table + pos // page_size, mask=valid, other=0).to(tl.int64)
            slot = page * page_size + pos % page_size
            k = _load_rows(k_ptr, ks_ptr, slot * stride_kslot + kvh * stride_khead, d, valid, d_mask,
                           HEAD_DIM, D_PAD, QUANT_GROUP, INT8)
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_rows(v_ptr, vs_ptr, slot * stride_vslot + kvh * stride_vhead, d, valid, d_mask,
                           HEAD_DIM, D_PAD, QUANT_GROUP, INT8)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            m_i = m_new

        if NUM_SPLITS == 1:  # the whole context in this program: normalise and write the output
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a zero-length row: zeros
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            row = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [B, Hq, S] partials
            tl.store(m_ptr + row, m_i, mask=g_mask)
            tl.store(l_ptr + row, l_i, mask=g_mask)
            tl.store(acc_ptr + row.to(tl.int64)[:, None] * D_PAD + d[None, :], acc, mask=g_mask[:, None])

    @triton.jit
    def _decode_reduce_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh,
        NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        s_mask = s < NUM_SPLITS
        row = (b * tl.num_programs(1) + h) * NUM_SPLITS + s
        m = tl.load(m_ptr + row, mask=s_mask, other=float("-inf"))
        l_part = tl.load(l_ptr + row, mask=s_mask, other=0.0)
        used = l_part > 0  # empty splits (and all of a zero-length row) weigh nothing
        m_max = tl.max(tl.where(used, m, float("-inf")), axis=0)
        w = tl.where(used, tl.exp2(tl.where(used, m, 0.0) - tl.where(used, m_max, 0.0)), 0.0)
        acc = tl.load(acc_ptr + row.to(tl.int64)[:, None] * D_PAD + d[None, :], mask=used[:, None], other=0.0)
        num = tl.sum(w[:, None] * acc, axis=0)
        den = tl.sum(w * l_part, axis=0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, block_table_ptr, query_starts_ptr, seq_lens_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kslot, stride_khead, stride_vslot, stride_vhead,
        stride_bt, page_size, qk_scale,
        CAUSAL: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_GROUP: tl.constexpr,
        INT8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        qblk = tl.program_id(0)
        b = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(query_starts_ptr + b).to(tl.int32)
        q_len = tl.load(query_starts_ptr + b + 1).to(tl.int32) - q_start
        if qblk * BLOCK_Q < q_len:
            seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
            # Rows are (query token, head of the group) pairs: the group shares every K/V tile.
            r = tl.arange(0, BLOCK_Q * GROUP_PAD)
            tok = qblk * BLOCK_Q + r // GROUP_PAD
            gi = r % GROUP_PAD
            row_mask = (tok < q_len) & (gi < GROUP)
            heads = kvh * GROUP + gi
            d = tl.arange(0, D_PAD)
            d_mask = d < HEAD_DIM
            tok_off = (q_start + tok).to(tl.int64)
            q = tl.load(q_ptr + tok_off[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
            q_pos = seq_len - q_len + tok
            if CAUSAL:
                kv_end = tl.minimum(seq_len, seq_len - q_len + (qblk + 1) * BLOCK_Q)
            else:
                kv_end = seq_len

            m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
            acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], tl.float32)
            table = block_table_ptr + b.to(tl.int64) * stride_bt
            for n0 in range(0, kv_end, BLOCK_N):
                pos = n0 + tl.arange(0, BLOCK_N)
                valid = pos < kv_end
                page = tl.load(table + pos // page_size, mask=valid, other=0).to(tl.int64)
                slot = page * page_size + pos % page_size
                k = _load_rows(k_ptr, ks_ptr, slot * stride_kslot + kvh * stride_khead, d, valid, d_mask,
                               HEAD_DIM, D_PAD, QUANT_GROUP, INT8)
                s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
                keep = valid[None, :]
                if CAUSAL:
                    keep = keep & (pos[None, :] <= q_pos[:, None])
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = _load_rows(v_ptr, vs_ptr, slot * stride_vslot + kvh * stride_vhead, d, valid, d_mask,
                               HEAD_DIM, D_PAD, QUANT_GROUP, INT8)
                acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
                m_i = m_new

            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + tok_off[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    page_size: int, scale: float, out_dtype: torch.dtype | None = None, num_splits: int | None = None,
):
    """One query per sequence over its paged context (flash-decoding, graph-capturable).

    q: [B, Hq, D]; k_cache, v_cache: [num_slots, Hk, W] (W = D, or int8 rows); block_table:
    [B, max_pages] integer page ids; seq_lens: [B] integer tensor on q's device, the context
    length of each sequence including the new token (0: the row's output is zeros). The
    grid is fixed by the shapes and num_splits (default: default_num_splits of the block
    table's capacity), not by the lengths. Returns [B, Hq, D] in out_dtype (default q's),
    or DECLINE (unsupported dtype or layout, or a device Triton cannot run on).
    """
    if not _check_caches(q, k_cache, v_cache) or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        return DECLINE
    if seq_lens.shape != (q.shape[0],) or block_table.dtype.is_floating_point or seq_lens.dtype.is_floating_point:
        return DECLINE
    out_dtype = out_dtype or q.dtype
    if out_dtype not in FLOAT_DTYPES:
        return DECLINE
    batch, hq, head_dim = q.shape
    hk = k_cache.shape[1]
    group = hq // hk
    out = torch.empty((batch, hq, head_dim), dtype=out_dtype, device=q.device)
    if batch == 0:
        return out
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    if num_splits is None:
        num_splits = default_num_splits(batch, hk, block_table.shape[1] * page_size)
    num_splits = max(1, int(num_splits))
    d_pad = max(16, next_pow2(head_dim))
    if num_splits > 1:  # partial (max, sum, acc) per split, combined by _decode_reduce_kernel
        m = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m)
        acc = torch.empty((batch, hq, num_splits, d_pad), dtype=torch.float32, device=q.device)
    else:  # one split writes the output itself
        m = l_part = acc = out
    dot_dtype, precision = _compute_dtype(q, k_cache)
    int8 = k_cache.dtype == torch.int8
    _decode_split_kernel[(batch, hk, num_splits)](
        q, k_cache, v_cache, _scale_view(k_cache), _scale_view(v_cache), block_table, seq_lens, m, l_part, acc, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), page_size, scale * _LOG2E,
        NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_N=_block_n(dot_dtype), QUANT_GROUP=group_size(head_dim), INT8=int8,
        DOT_DTYPE=dot_dtype, PRECISION=precision,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, hq)](
            m, l_part, acc, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, S_PAD=next_pow2(num_splits), HEAD_DIM=head_dim, D_PAD=d_pad,
        )
    return out


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    query_starts: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
    out_dtype: torch.dtype | None = None, causal: bool = True, max_query_len: int | None = None,
):
    """Attention of a ragged batch of new tokens (prefill chunks, decodes) over the paged pool.

    q: [T, Hq, D], the batch's new tokens, whose K/V are already stored; query_starts: [B + 1]
    integer tensor (cumulative query lengths, query_starts[-1] = T); seq_lens: [B] context
    lengths including the new tokens; block_table: [B, max_pages]. Query i of sequence b
    sits at position seq_len - query_len + i and, when causal, sees keys 0..that position;
    otherwise all seq_len keys. max_query_len sizes the grid (read from query_starts, one
    host sync, when not given). Returns [T, Hq, D] in out_dtype (default q's), or DECLINE.
    """
    if not _check_caches(q, k_cache, v_cache) or block_table.dim() != 2:
        return DECLINE
    batch = block_table.shape[0]
    if query_starts.shape != (batch + 1,) or seq_lens.shape != (batch,):
        return DECLINE
    if block_table.dtype.is_floating_point or query_starts.dtype.is_floating_point or seq_lens.dtype.is_floating_point:
        return DECLINE
    out_dtype = out_dtype or q.dtype
    if out_dtype not in FLOAT_DTYPES:
        return DECLINE
    tokens, hq, head_dim = q.shape
    hk = k_cache.shape[1]
    group = hq // hk
    out = torch.empty((tokens, hq, head_dim), dtype=out_dtype, device=q.device)
    if tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_starts[1:] - query_starts[:-1]).max())
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    group_pad = next_pow2(group)
    dot_dtype, precision = _compute_dtype(q, k_cache)
    rows = 16 if interpreting() or dot_dtype == tl.float32 else 64  # query rows (tokens x group heads)
    block_q = max(1, rows // group_pad)  # a group wider than `rows` still gets one token's rows
    grid = (triton.cdiv(max_query_len, block_q), batch, hk)
    _prefill_kernel[grid](
        q, k_cache, v_cache, _scale_view(k_cache), _scale_view(v_cache), out, block_table, query_starts, seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_table.stride(0), page_size, scale * _LOG2E,
        CAUSAL=bool(causal), GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        D_PAD=max(16, next_pow2(head_dim)), BLOCK_N=_block_n(dot_dtype),
        QUANT_GROUP=group_size(head_dim), INT8=k_cache.dtype == torch.int8,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=_prefill_warps(dot_dtype),
    )
    return out


def query_starts(batch: ForwardBatch) -> torch.Tensor:
    """The batch's cumulative query lengths on its device ([B + 1] int32)."""
    return torch.tensor(batch.query_starts, dtype=torch.int32, device=batch.block_table.device)


@kernel("paged_attention", priority=15)
def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    out_dtype: torch.dtype | None = None,
):
    """Decode-only batches: flash-decoding over the pages, its launch fixed by the shapes (so
    a captured graph may hold it). Other batches: the varlen prefill kernel (not in a graph:
    its grid follows the longest chunk). FlashAttention, where installed, ranks above."""
    if batch.is_decode_only:
        return decode_attention(q, k_cache, v_cache, batch.block_table, batch.context_lens, batch.page_size, scale,
                                out_dtype)
    if batch.static:
        return DECLINE
    return prefill_attention(q, k_cache, v_cache, batch.block_table, batch.view(query_starts), batch.context_lens,
                             batch.page_size, scale, out_dtype, causal=True, max_query_len=max(batch.query_lens))


__all__ = ["AVAILABLE", "decode_attention", "default_num_splits", "interpreting", "paged_attention_triton",
           "prefill_attention"]
