"""Reference implementations in plain PyTorch: the specification of every hot op.

They run on any device torch supports. Faster kernels registered in the platform
modules must produce the same results (tests/unit/test_ops.py checks each one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.ops.decoder_stack import DecoderStackSpec
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.kv_quant import gather_rows, store_rows
from pagoda.ops.lora import LoRAStack, lora_segments
from pagoda.ops.registry import DECLINE, reference


@reference("rms_norm")
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama", out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """RMSNorm in float32. "llama": x*rsqrt(mean(x^2)+eps); "jiutian": x/(sqrt(mean(x^2))+eps).

    The result is in out_dtype (default x's): quantized linears take bfloat16 inputs, so
    the norm before them rounds once instead of the linear converting."""
    xf = x.float()
    ms = xf.pow(2).mean(dim=-1, keepdim=True)
    if variant == "jiutian":
        y = xf / (ms.sqrt() + eps)
    else:
        y = xf * torch.rsqrt(ms + eps)
    return (weight.float() * y).to(out_dtype or x.dtype)


@reference("add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add then RMSNorm: returns (norm(x + residual), x + residual); the sum
    takes the wider dtype of the two (the residual stream stays float32)."""
    summed = x + residual
    return rms_norm.reference(summed, weight, eps, variant, out_dtype), summed


@reference("rotary_store_kv")
def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rotate-half rotary embedding of q and k, then k and v into their pool slots; returns q.

    q: [T, Hq, D], k, v: [T, Hk, D]; cos, sin: [T, D] for each token's position (each half
    repeated, already multiplied by any attention scaling factor), float32; caches
    [num_slots, Hk, D]. Rotation is computed in float32; q is returned in out_dtype
    (default q's), k and v are rounded once, to the cache's form (pagoda/ops/kv_quant.py).
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    store_rows(k_cache, slot_mapping, _rotate(k, cos, sin, torch.float32))
    store_rows(v_cache, slot_mapping, v)
    return _rotate(q, cos, sin, out_dtype or q.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype)


@reference("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused [gate | up] projection: silu(gate) * up, computed in
    float32 and returned in x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@reference("paged_attention")
def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention of a ragged batch over its paged context.

    q: [T, Hq, D] for the batch's new tokens (already stored in the cache). Query i of
    sequence b sits at position seq_len - query_len + i and sees keys 0..that position.
    Returns [T, Hq, D] in out_dtype (default q's: the output projection's input dtype).
    """
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_heads // num_kv_heads
    for b, (qlen, klen) in enumerate(zip(batch.query_lens, batch.seq_lens)):
        start = batch.query_starts[b]
        slots = batch.context_slots[b]
        qb = q[start : start + qlen].float().transpose(0, 1)  # [Hq, qlen, D]
        kb = gather_rows(k_cache, slots, torch.float32).transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, klen, D]
        vb = gather_rows(v_cache, slots, torch.float32).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qb, kb.transpose(1, 2)) * scale
        qpos = torch.arange(klen - qlen, klen, device=q.device)[:, None]
        kpos = torch.arange(klen, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + qlen] = torch.matmul(probs, vb).transpose(0, 1).to(out.dtype)
    return out


@reference("linear_prepack")
def linear_prepack(weight: torch.Tensor):
    """A kernel's own layout of a dense weight (made once after loading); None: no kernel wants one."""
    return None


@reference("packed_linear")
def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) computed in the weight's dtype, returned in x's dtype; `packed` is a
    kernel's prepacked copy of `weight` (the reference ignores it)."""
    y = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return y.to(x.dtype)


@reference("decoder_stack")
def decoder_stack(spec: DecoderStackSpec, x: torch.Tensor, batch: ForwardBatch):
    """x through every decoder layer in one call: (the last layer's output, the residual
    stream), or DECLINE where no kernel takes this stack, and the model then runs its layers
    op by op. That per-op path is the definition a kernel must match: a platform registers a
    kernel here to run a step's whole stack natively (pagoda/ops/cpu/decoder_stack.py)."""
    return DECLINE


@reference("lora_apply")
def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch, stack: LoRAStack) -> torch.Tensor:
    """Add each row's adapter to a linear's base output, in place: for every run of rows
    using pool slot s (``lora_segments``), y += scaling[s] * (x A[s]^T) B[s]^T, computed in
    float32 (two segment matmuls per adapter, as Punica's and SGLang's segment kernels
    group them); rows without an adapter are untouched. Returns y."""
    for slot, lo, hi in batch.view(lora_segments):
        w = stack.width[slot]
        if w == 0:
            continue
        xa = x[lo:hi].float() @ stack.a[slot, :w].t()
        if y.dtype == torch.float32:
            y[lo:hi].addmm_(xa, stack.bt[slot, :w], alpha=stack.scaling[slot])
        else:
            y[lo:hi] += (torch.mm(xa, stack.bt[slot, :w]) * stack.scaling[slot]).to(y.dtype)
    return y
