"""The Triton kernels (pagoda/ops/cuda/triton_*.py) against their references.

Without a GPU they run in Triton's CPU interpreter on host tensors (this module sets
TRITON_INTERPRET=1 before triton is first imported: Triton decides when a kernel is
decorated, so a process that imported triton earlier without it cannot interpret), so the
sizes here are tiny. Where torch sees a GPU they run compiled, on it.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagoda.ops import reference, sampling
from pagoda.ops.attention_metadata import AttentionMetadata
from pagoda.ops.kv_quant import cache_row_width, dequantize_rows, quantize_rows
from pagoda.ops.registry import DECLINE

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

if not GPU:  # before triton's first import (its library functions are decorated then), for good:
    os.environ["TRITON_INTERPRET"] = "1"  # triton also reads it while running kernels
pytest.importorskip("triton")
from pagoda.ops.cuda import triton_attention as ta  # noqa: E402
from pagoda.ops.cuda import triton_elementwise as te  # noqa: E402

bf16 = torch.bfloat16


def _close(got: torch.Tensor, want: torch.Tensor, loose: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if loose:  # bf16 products / roundings on either side
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------
# Attention


def _attention_inputs(query_lens, seq_lens, page_size=4, hq=4, hk=1, d=16, kv_dtype=torch.float32,
                      q_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(seq_lens))
    pages_needed = [(s + page_size - 1) // page_size for s in seq_lens]
    perm = torch.randperm(sum(pages_needed) + 3, generator=g)[: sum(pages_needed)] + 1  # scattered pages
    table = torch.zeros(len(seq_lens), max(pages_needed) + 1, dtype=torch.int32)  # a spare column
    i = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = perm[i : i + n].int()
        i += n
    num_slots = (int(perm.max()) + 1) * page_size
    k_cache, v_cache = (torch.randn(num_slots, hk, d, generator=g) for _ in range(2))
    if kv_dtype == torch.int8:
        k_cache, v_cache = quantize_rows(k_cache), quantize_rows(v_cache)
    else:
        k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    slots = []
    for b, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(sl - ql, sl)
        slots.append(table[b, pos // page_size].long() * page_size + pos % page_size)
    meta = AttentionMetadata(list(query_lens), list(seq_lens), torch.cat(slots), table.long(), page_size)
    q = torch.randn(sum(query_lens), hq, d, generator=g).to(q_dtype)
    return q, k_cache, v_cache, meta, d**-0.5


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _loose(q, k_cache, out_dtype) -> bool:
    return bf16 in (q.dtype, k_cache.dtype, out_dtype)


DECODE_CASES = [
    # (seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype, num_splits)
    ([1, 9, 17], 4, 4, 1, 16, torch.float32, torch.float32, None, None),  # group 4
    ([5, 40], 1, 2, 2, 16, torch.float32, torch.float32, None, 3),  # page size 1, group 1, 3 splits
    ([33, 2, 0], 16, 8, 2, 32, bf16, bf16, None, 4),  # bf16, a zero-length (padding) row, empty splits
    ([20, 7], 16, 4, 1, 32, torch.int8, torch.float32, None, 2),  # int8 rows, one scale per 32
    ([12, 3], 4, 4, 4, 24, torch.int8, bf16, torch.float32, None),  # head_dim 24: groups of 8, padded
    ([18], 16, 3, 1, 16, torch.float16, torch.float32, bf16, 2),  # group of 3 (padded), fp16 cache
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"decode{i}" for i in range(len(DECODE_CASES))])
def test_decode_attention(case) -> None:
    seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype, num_splits = case
    ref_lens = [max(s, 1) for s in seq_lens]  # the reference has no zero-length rows
    q, k_cache, v_cache, meta, scale = _attention_inputs([1] * len(seq_lens), ref_lens, page_size, hq, hk, d,
                                                          kv_dtype, q_dtype)
    want = reference.paged_attention.reference(q, k_cache, v_cache, meta, scale, out_dtype)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table.int())
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = ta.decode_attention(qd, kd, vd, table, lens, page_size, scale, out_dtype, num_splits)
    assert got is not DECLINE
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert (got[b] == 0).all()
        else:
            _close(got[b].cpu(), want[b], _loose(q, k_cache, out_dtype))


def test_decode_grid_is_fixed_by_shapes() -> None:
    """Splits come from the block table's capacity, not from the lengths."""
    assert ta.default_num_splits(1, 2, 16 * 4096) == ta.default_num_splits(1, 2, 16 * 4096)
    assert ta.default_num_splits(1, 1, 100) == 1
    assert 1 < ta.default_num_splits(1, 2, 8192) <= ta.MAX_SPLITS
    assert ta.default_num_splits(512, 8, 1 << 20) == 1  # a big batch fills the device already


PREFILL_CASES = [
    # (query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype)
    ([12], [12], 4, 4, 1, 16, torch.float32, torch.float32, None),  # fresh prefill, group 4
    ([5, 1, 3], [13, 7, 3], 1, 2, 2, 16, torch.float32, torch.float32, None),  # chunk on a prefix, page 1
    ([9, 2], [30, 2], 16, 8, 2, 32, bf16, bf16, None),  # bf16, pages of 16
    ([4, 1], [21, 9], 16, 4, 1, 32, torch.int8, torch.float32, bf16),  # int8 rows
    ([3], [10], 4, 3, 1, 24, torch.int8, bf16, None),  # group of 3, head_dim 24
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"prefill{i}" for i in range(len(PREFILL_CASES))])
def test_prefill_attention(case) -> None:
    query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype = case
    q, k_cache, v_cache, meta, scale = _attention_inputs(query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype)
    want = reference.paged_attention.reference(q, k_cache, v_cache, meta, scale, out_dtype)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    starts = torch.tensor(meta.query_starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE)
    got = ta.prefill_attention(qd, kd, vd, table, starts, lens, page_size, scale, out_dtype,
                               max_query_len=max(query_lens))
    assert got is not DECLINE
    _close(got.cpu(), want, _loose(q, k_cache, out_dtype))


def test_prefill_without_causal_mask_sees_every_key() -> None:
    q, k_cache, v_cache, meta, scale = _attention_inputs([3, 2], [7, 5], page_size=4, hq=2, hk=1)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    starts = torch.tensor(meta.query_starts, device=DEVICE)
    lens = torch.tensor(meta.seq_lens, device=DEVICE)
    got = ta.prefill_attention(qd, kd, vd, table, starts, lens, 4, scale, causal=False).cpu()
    for b, (start, qlen) in enumerate(zip(meta.query_starts, meta.query_lens)):
        keys = k_cache[meta.context_slots[b]].transpose(0, 1).repeat_interleave(2, 0)  # [Hq, S, D]
        vals = v_cache[meta.context_slots[b]].transpose(0, 1).repeat_interleave(2, 0)
        qb = q[start : start + qlen].transpose(0, 1)
        want = torch.softmax(qb @ keys.transpose(1, 2) * scale, -1) @ vals
        _close(got[start : start + qlen], want.transpose(0, 1), False)


def test_attention_declines_what_it_does_not_handle() -> None:
    q, k_cache, v_cache, meta, scale = _attention_inputs([1], [5], hq=3, hk=2)  # 3 heads over 2 kv heads
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    lens = torch.tensor([5], device=DEVICE)
    assert ta.decode_attention(qd, kd, vd, table, lens, 4, scale) is DECLINE
    q, k_cache, v_cache, meta, scale = _attention_inputs([1], [5])
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    assert ta.decode_attention(qd.to(torch.int32), kd, vd, table, lens, 4, scale) is DECLINE
    assert ta.decode_attention(qd, kd, vd.to(bf16), table, lens, 4, scale) is DECLINE
