"""Triton elementwise and row kernels for CUDA and MUSA: RMSNorm (plain and fused with the
residual add), rotary embedding with the KV store, SiLU-and-mul, and the sampler's two
row reductions (greedy argmax, exponential-race sampling). Their signatures are the ops'
own: the CUDA and MUSA platforms register them as the ops' kernels.

Each launcher computes what its reference in pagoda/ops/reference.py or
pagoda/ops/sampling.py computes, in float32, rounding once to the output's dtype; it takes
explicit tensors, and returns DECLINE for inputs it does not handle
(dtypes outside float32/float16/bfloat16, shapes off the reference's, rotary inputs or
caches whose last dimension is not contiguous (the row kernels copy such rows instead), or
a device Triton cannot run on: compiled kernels need accelerator tensors, the interpreter
host ones). The sampling kernels return device tensors and never synchronise: a step's
sampled ids come back to the host in one copy.
"""

from __future__ import annotations

import torch

from pagoda.ops.cuda.triton_common import (
    AVAILABLE, CACHE_DTYPES, FLOAT_DTYPES, interpreted, next_pow2, runnable, tl, triton,
)
from pagoda.ops.kv_quant import cache_row_width, group_size
from pagoda.ops.registry import DECLINE, kernel

_MAX_BLOCK = 4096  # elements of a row one loop step handles


def _runnable(*tensors: torch.Tensor) -> bool:
    return AVAILABLE and runnable(_silu_and_mul_kernel, *tensors)


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter."""
    return AVAILABLE and interpreted(_silu_and_mul_kernel)  # (no kernels are defined without triton)






def _warps(block: int) -> int:
    """Warps for a kernel that holds `block` elements of a row: 8 per thread, 1 to 16 warps."""
    return max(1, min(16, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, last] with a unit last stride (a view where possible), or None."""
    if x.dim() == 0:
        return None
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()
    return x2


if AVAILABLE:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_out, stride_sum, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, JIUTIAN: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        if ONE_BLOCK:  # the whole row in registers: one read of x (and the residual)
            mask = cols < n_cols
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x = x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
                s = x.to(sum_ptr.dtype.element_ty)
                tl.store(sum_ptr + row * stride_sum + cols, s, mask=mask)
                x = s.to(tl.float32)  # the norm reads the sum as stored
            ms = tl.sum(x * x, axis=0) / n_cols
            if JIUTIAN:
                y = x / (tl.sqrt(ms) + eps)
            else:
                y = x * (1.0 / tl.sqrt(ms + eps))
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)
        else:  # long rows: sum of squares in one pass (storing the sum), normalise in a second
            acc = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, n_cols, BLOCK):
                mask = c0 + cols < n_cols
                x = tl.load(x_ptr + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    x = x + tl.load(r_ptr + row * stride_r + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                    s = x.to(sum_ptr.dtype.element_ty)
                    tl.store(sum_ptr + row * stride_sum + c0 + cols, s, mask=mask)
                    x = s.to(tl.float32)
                acc += x * x
            ms = tl.sum(acc, axis=0) / n_cols
            if JIUTIAN:
                inv = 1.0 / (tl.sqrt(ms) + eps)
            else:
                inv = 1.0 / tl.sqrt(ms + eps)
            for c0 in range(0, n_cols, BLOCK):
                mask = c0 + cols < n_cols
                if HAS_RESIDUAL:
                    x = tl.load(sum_ptr + row * stride_sum + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(x_ptr + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + row * stride_out + c0 + cols, (w * (x * inv)).to(out_ptr.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _round_half_even(y):
        f = tl.floor(y)
        frac = y - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, tl.where(odd, f + 1.0, f)))

    @triton.jit
    def _store_row(cache_ptr, scale_ptr, row_off, x, d, mask, HEAD_DIM: tl.constexpr, INT8: tl.constexpr):
        """One head's values x [NG, G] (float32) into its cache row, int8 per kv_quant's format."""
        if INT8:
            amax = tl.max(tl.abs(x), axis=1)
            scale = tl.minimum(amax * (1.0 / 127.0), 65504.0).to(tl.float16)
            s = scale.to(tl.float32)
            inv = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
            q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), -127.0), 127.0)
            tl.store(cache_ptr + row_off + d, q.to(tl.int8), mask=mask)
            g = tl.arange(0, x.shape[0])
            tl.store(scale_ptr + (row_off + HEAD_DIM) // 2 + g, scale, mask=g * x.shape[1] < HEAD_DIM)
        else:
            tl.store(cache_ptr + row_off + d, x.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_store_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
        stride_ot, stride_oh, stride_kcs, stride_kch, stride_vcs, stride_vch, num_q_heads, num_kv_heads,
        HEAD_DIM: tl.constexpr, NG_PAD: tl.constexpr, G: tl.constexpr, INT8: tl.constexpr,
    ):
        """Program (t, h): h < Hq rotates query head h; then the Hk key heads (rotated and
        stored), then the Hk value heads (stored). A head is a [groups, G] tile so an int8
        row's scales come from one reduction; rotate-half reads each value's partner."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, NG_PAD)[:, None] * G + tl.arange(0, G)[None, :]
        mask = d < HEAD_DIM
        half: tl.constexpr = HEAD_DIM // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        if h < num_q_heads:
            base = q_ptr + t * stride_qt + h * stride_qh
            x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + t * stride_cos + d, mask=mask, other=0.0)
            sin = tl.load(sin_ptr + t * stride_sin + d, mask=mask, other=0.0)
            y = x * cos + (sign * xp) * sin
            tl.store(qo_ptr + t * stride_ot + h * stride_oh + d, y.to(qo_ptr.dtype.element_ty), mask=mask)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if h < num_q_heads + num_kv_heads:
                kh = h - num_q_heads
                base = k_ptr + t * stride_kt + kh * stride_kh
                x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
                xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
                cos = tl.load(cos_ptr + t * stride_cos + d, mask=mask, other=0.0)
                sin = tl.load(sin_ptr + t * stride_sin + d, mask=mask, other=0.0)
                y = x * cos + (sign * xp) * sin
                _store_row(kc_ptr, ks_ptr, slot * stride_kcs + kh * stride_kch, y, d, mask, HEAD_DIM, INT8)
            else:
                vh = h - num_q_heads - num_kv_heads
                x = tl.load(v_ptr + t * stride_vt + vh * stride_vh + d, mask=mask, other=0.0).to(tl.float32)
                _store_row(vc_ptr, vs_ptr, slot * stride_vcs + vh * stride_vch, x, d, mask, HEAD_DIM, INT8)

    @triton.jit
    def _argmax_kernel(x_ptr, noise_ptr, out_ptr, stride_x, stride_noise, n_cols, HAS_NOISE: tl.constexpr,
                       BLOCK: tl.constexpr):
        """Index of the row's maximum of x (or of x / noise), the first one on ties."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK], 2147483647, tl.int32)
        for c0 in range(0, n_cols, BLOCK):  # per lane: its largest value, first index kept on ties
            mask = c0 + cols < n_cols
            x = tl.load(x_ptr + row * stride_x + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_NOISE:
                e = tl.load(noise_ptr + row * stride_noise + c0 + cols, mask=mask, other=1.0).to(tl.float32)
                x = tl.math.div_rn(x, e)  # correctly rounded, as torch's quotient: the same winner
            take = mask & ((x > best) | (best_idx == 2147483647))
            best = tl.where(take, x, best)
            best_idx = tl.where(take, c0 + cols, best_idx)
        top = tl.max(best, axis=0)
        idx = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
        tl.store(out_ptr + row, tl.where(idx == 2147483647, 0, idx).to(tl.int64))


@kernel("rms_norm", priority=20)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama",
             out_dtype: torch.dtype | None = None):
    """reference.rms_norm: weight * norm(x) over the last dimension, in out_dtype (x's)."""
    return _norm(x, None, weight, eps, variant, out_dtype)


@kernel("add_rms_norm", priority=20)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       variant: str = "llama", out_dtype: torch.dtype | None = None):
    """reference.add_rms_norm: (norm(x + residual), x + residual), the sum in the wider of the
    two dtypes (rounded once, and normed as rounded), the norm in out_dtype (default x's)."""
    return _norm(x, residual, weight, eps, variant, out_dtype)


def _norm(x, residual, weight, eps, variant, out_dtype):
    out_dtype = out_dtype or x.dtype
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if variant not in ("llama", "jiutian") or not _runnable(*tensors) or x.dim() == 0:
        return DECLINE
    if any(t.dtype not in FLOAT_DTYPES for t in tensors) or out_dtype not in FLOAT_DTYPES:
        return DECLINE
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,) or (residual is not None and residual.shape != x.shape) or n_cols == 0:
        return DECLINE
    weight = weight.contiguous()
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    out2 = out.view(-1, n_cols)
    if residual is None:
        r2, sum2, summed = x2, out2, None
    else:
        r2 = _rows(residual)
        summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        sum2 = summed.view(-1, n_cols)
    rows = x2.shape[0]
    if rows:
        block = min(next_pow2(n_cols), _MAX_BLOCK)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, sum2, x2.stride(0), r2.stride(0), out2.stride(0), sum2.stride(0), n_cols, float(eps),
            HAS_RESIDUAL=residual is not None, JIUTIAN=variant == "jiutian", BLOCK=block, ONE_BLOCK=block >= n_cols,
            num_warps=_warps(block),
        )
    return out if residual is None else (out, summed)


@kernel("silu_and_mul", priority=20)
def silu_and_mul(x: torch.Tensor):
    """reference.silu_and_mul: silu(gate) * up of a fused [..., 2I] projection, in x's dtype."""
    if not _runnable(x) or x.dtype not in FLOAT_DTYPES or x.dim() == 0 or x.shape[-1] % 2:
        return DECLINE
    n_cols = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], n_cols), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n_cols)
    if x2.shape[0] and n_cols:
        block = min(next_pow2(n_cols), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n_cols, block))](
            x2, out2, x2.stride(0), out2.stride(0), n_cols, BLOCK=block)
    return out


@kernel("rotary_store_kv", priority=20)
def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    out_dtype: torch.dtype | None = None):
    """reference.rotary_store_kv: rotate-half of q and k over the whole head_dim (float32),
    k and v written to their slots in the cache's form (int8: kv_quant's rows, scales per
    group of group_size(head_dim)); returns the rotated q in out_dtype (default q's).

    q: [T, Hq, D], k, v: [T, Hk, D] (views into a fused projection are fine); cos, sin:
    [T, D] float32; caches [num_slots, Hk, W]; slot_mapping: [T] integer slots."""
    out_dtype = out_dtype or q.dtype
    if not _runnable(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
        return DECLINE
    if any(t.dtype not in FLOAT_DTYPES for t in (q, k, v)) or out_dtype not in FLOAT_DTYPES:
        return DECLINE
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or slot_mapping.dtype.is_floating_point:
        return DECLINE
    if k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        return DECLINE
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        return DECLINE
    tokens, hq, head_dim = q.shape
    hk = k.shape[1]
    if head_dim % 2 or k.shape[::2] != (tokens, head_dim) or k_cache.shape[1] != hk:
        return DECLINE
    if cos.shape != (tokens, head_dim) or sin.shape != (tokens, head_dim) or slot_mapping.shape != (tokens,):
        return DECLINE
    int8 = k_cache.dtype == torch.int8
    g = group_size(head_dim)
    if k_cache.shape[2] != cache_row_width(head_dim, k_cache.dtype):
        return DECLINE
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        return DECLINE
    if int8 and any(s % 2 for s in (*k_cache.stride()[:2], *v_cache.stride()[:2], k_cache.data_ptr(),
                                    v_cache.data_ptr())):
        return DECLINE  # the float16 scales are written through a float16 view
    q_out = torch.empty((tokens, hq, head_dim), dtype=out_dtype, device=q.device)
    if tokens == 0:
        return q_out
    ks = k_cache.view(torch.float16) if int8 else k_cache
    vs = v_cache.view(torch.float16) if int8 else v_cache
    _rotary_store_kernel[(tokens, hq + 2 * hk)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, ks, vs, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        hq, hk, HEAD_DIM=head_dim, NG_PAD=next_pow2(head_dim // g), G=g, INT8=int8,
    )
    return q_out


@kernel("argmax_rows", priority=20)
def argmax_rows(x: torch.Tensor):
    """sampling.argmax_rows: [B, V] -> [B] int64, the first maximum of each row (greedy)."""
    return _argmax(x, None)


@kernel("sample_from_probs", priority=20)
def sample_from_probs(probs: torch.Tensor, exp_noise: torch.Tensor):
    """sampling.sample_from_probs: argmax(probs / exp_noise) per row (the exponential race),
    one pass over the vocabulary, no [B, V] quotient; [B] int64 on the device."""
    if exp_noise.shape != probs.shape:
        return DECLINE
    return _argmax(probs, exp_noise)


def _argmax(x, noise):
    tensors = (x,) if noise is None else (x, noise)
    if not _runnable(*tensors) or any(t.dim() != 2 or t.dtype not in FLOAT_DTYPES for t in tensors):
        return DECLINE
    if x.shape[1] == 0 or x.shape[1] >= 2**31 - 1 or any(t.stride(-1) != 1 for t in tensors):
        return DECLINE
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0]:
        block = min(next_pow2(x.shape[1]), 1024)
        _argmax_kernel[(x.shape[0],)](
            x, x if noise is None else noise, out, x.stride(0), 0 if noise is None else noise.stride(0), x.shape[1],
            HAS_NOISE=noise is not None, BLOCK=block, num_warps=_warps(block),
        )
    return out


__all__ = ["AVAILABLE", "argmax_rows", "fused_add_rms_norm", "interpreting", "rms_norm", "rotary_store_kv",
           "sample_from_probs", "silu_and_mul"]
