"""Paged attention on torch's scaled_dot_product_attention: portable across device types.

Every platform registers it for its device type (Platform.portable_kernel_modules), so no
device ever falls back to the reference's explicit score matrix; vendor kernels
(FlashAttention/MATE, pagoda's C kernels) rank above it.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.kv_quant import gather_rows
from pagoda.ops.registry import kernel


def padded_context_slots(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] slots (padding repeats slot 0) and a [batch, max_len] validity mask."""
    max_len = max(batch.seq_lens)
    ps = batch.page_size
    pages = batch.block_table[:, : (max_len + ps - 1) // ps]
    offsets = torch.arange(ps, device=pages.device)
    slots = (pages[:, :, None] * ps + offsets).reshape(batch.batch_size, -1)[:, :max_len]
    lens = torch.tensor(batch.seq_lens, device=pages.device)
    valid = torch.arange(max_len, device=pages.device)[None, :] < lens[:, None]
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


@kernel("paged_attention", priority=10)
def paged_attention_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode-only batches: one padded, masked SDPA call over all sequences.

    Mixed or prefill batches: one SDPA call per sequence (causal, offset by its cached
    prefix). Grouped-query heads are handled by SDPA without repeating KV.
    """
    if batch.is_decode_only:
        slots, valid = batch.view(padded_context_slots)  # [B, L]
        k = gather_rows(k_cache, slots, q.dtype).transpose(1, 2)  # [B, Hk, L, D]
        v = gather_rows(v_cache, slots, q.dtype).transpose(1, 2)
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[:, :, 0, :].to(out_dtype or q.dtype)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    attend_per_sequence(q, k_cache, v_cache, batch, scale, out, range(batch.batch_size))
    return out


def attend_per_sequence(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    out: torch.Tensor, seqs: Iterable[int], compute_dtype: torch.dtype | None = None,
) -> None:
    """Write the attention of sequences `seqs` into out, one causal SDPA call each, computed
    in compute_dtype (default q's)."""
    dtype = compute_dtype or q.dtype
    for b in seqs:
        qlen, klen, start = batch.query_lens[b], batch.seq_lens[b], batch.query_starts[b]
        slots = batch.context_slots[b]
        qb = q[start : start + qlen].transpose(0, 1)[None].to(dtype)
        kb = gather_rows(k_cache, slots, dtype).transpose(0, 1)[None]
        vb = gather_rows(v_cache, slots, dtype).transpose(0, 1)[None]
        if qlen == klen:
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(klen - qlen, klen, device=q.device)[:, None]
            mask = torch.arange(klen, device=q.device)[None, :] <= qpos
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + qlen] = ob[0].transpose(0, 1)  # in out's dtype
