"""CPU kernels: torch's fused native ops where they match the reference exactly enough.

Each kernel declines (returns DECLINE) inputs it does not cover; the reference serves them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.ops.attention_metadata import AttentionMetadata
from pagoda.ops.registry import DECLINE, register_kernel


@register_kernel("rms_norm", "cpu", priority=10)
def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama"):
    """torch.rms_norm is the Llama form; Jiutian's eps-outside-the-root form is declined."""
    if variant != "llama" or x.dtype != torch.float32:
        return DECLINE
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@register_kernel("add_rms_norm", "cpu", priority=10)
def add_rms_norm_native(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama"):
    if variant != "llama" or x.dtype != torch.float32:
        return DECLINE
    summed = x + residual
    return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed


@register_kernel("paged_attention", "cpu", priority=10)
def paged_attention_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode-only batches: one padded, masked SDPA call over all sequences.

    Mixed or prefill batches: one SDPA call per sequence (causal, offset by its cached
    prefix). Grouped-query heads are handled by SDPA without repeating KV.
    """
    if meta.is_decode_only:
        slots, valid = meta.padded_context_slots  # [B, L]
        k = k_cache[slots].transpose(1, 2)  # [B, Hk, L, D]
        v = v_cache[slots].transpose(1, 2)
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[:, :, 0, :]
    out = torch.empty_like(q)
    for b, (qlen, klen) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        start = meta.query_starts[b]
        slots = meta.context_slots[b]
        qb = q[start : start + qlen].transpose(0, 1)[None]
        kb = k_cache[slots].transpose(0, 1)[None]
        vb = v_cache[slots].transpose(0, 1)[None]
        if qlen == klen:
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(klen - qlen, klen, device=q.device)[:, None]
            mask = torch.arange(klen, device=q.device)[None, :] <= qpos
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + qlen] = ob[0].transpose(0, 1)
    return out
