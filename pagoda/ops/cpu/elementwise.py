"""CPU elementwise kernels: pagoda's C kernels first (csrc/elementwise.c, csrc/sampling.c),
then torch's fused native RMSNorm. Each declines what it does not cover, including
everything when the C library could not be built here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.ops.cpu import native
from pagoda.ops.cpu.native import DTYPE_FLAG, KV_KIND
from pagoda.ops.registry import DECLINE, kernel


def _rows(*tensors: torch.Tensor) -> bool:
    """float32/bfloat16 with contiguous last-dimension rows (the row stride may be anything)."""
    return all(t.dtype in DTYPE_FLAG and t.stride(-1) == 1 for t in tensors)


@kernel("rms_norm", priority=20)
def rms_norm_c(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama", out_dtype=None):
    lib = native.library()
    out_dtype = out_dtype or x.dtype
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or out_dtype not in DTYPE_FLAG \
            or not x.is_contiguous():
        return DECLINE
    out = torch.empty(x.shape, dtype=out_dtype)
    cols = x.shape[-1]
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), DTYPE_FLAG[out_dtype], x.numel() // cols, cols, eps,
                 variant == "jiutian", torch.get_num_threads())
    return out


@kernel("add_rms_norm", priority=20)
def add_rms_norm_c(x, residual, weight, eps: float, variant: str = "llama", out_dtype=None):
    """x (a layer's output, float32 or bfloat16) joins the float32 residual stream."""
    lib = native.library()
    out_dtype = out_dtype or residual.dtype
    if (
        lib is None or not _rows(x) or residual.dtype != torch.float32 or weight.dtype != torch.float32
        or out_dtype not in DTYPE_FLAG or not (x.is_contiguous() and residual.is_contiguous())
    ):
        return DECLINE
    out, summed = torch.empty(x.shape, dtype=out_dtype), torch.empty_like(residual)
    cols = x.shape[-1]
    lib.add_rms_norm(x.data_ptr(), DTYPE_FLAG[x.dtype], residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                     DTYPE_FLAG[out_dtype], summed.data_ptr(), x.numel() // cols, cols, eps, variant == "jiutian",
                     torch.get_num_threads())
    return out, summed


def _heads_packed(x: torch.Tensor) -> bool:
    """[T, H, D] with each token's heads side by side (a single head's stride is moot)."""
    return x.shape[1] == 1 or x.stride(1) == x.shape[2]


@kernel("rotary_store_kv", priority=20)
def rotary_store_kv_c(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out_dtype=None):
    """One call per layer: reads q/k/v straight out of the fused QKV output (strided rows)."""
    lib = native.library()
    t, hq, d = q.shape
    out_dtype = out_dtype or q.dtype
    if (
        lib is None or not _rows(q) or k.dtype != q.dtype or v.dtype != q.dtype or out_dtype not in DTYPE_FLAG
        or (t > 1 and not q.stride(0) == k.stride(0) == v.stride(0)) or not all(_heads_packed(x) for x in (q, k, v))
        or k_cache.dtype not in KV_KIND or v_cache.dtype != k_cache.dtype
        or not (k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous())
        or not (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous())
    ):
        return DECLINE
    out = torch.empty(q.shape, dtype=out_dtype)
    lib.rotary_store_kv(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), DTYPE_FLAG[q.dtype], q.stride(0), cos.data_ptr(), sin.data_ptr(),
        out.data_ptr(), DTYPE_FLAG[out_dtype], k_cache.data_ptr(), v_cache.data_ptr(), KV_KIND[k_cache.dtype],
        slot_mapping.data_ptr(), t, hq, k.shape[1], d, torch.get_num_threads(),
    )
    return out


@kernel("silu_and_mul", priority=20)
def silu_and_mul_c(x: torch.Tensor):
    lib = native.library()
    if lib is None or x.dtype not in DTYPE_FLAG or not x.is_contiguous():
        return DECLINE
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    flag = DTYPE_FLAG[x.dtype]
    lib.silu_and_mul(x.data_ptr(), flag, out.data_ptr(), flag, x.numel() // (2 * n), n, torch.get_num_threads())
    return out


@kernel("argmax_rows", priority=20)
def argmax_rows_c(x: torch.Tensor):
    lib = native.library()
    if lib is None or x.dim() != 2 or x.dtype not in DTYPE_FLAG or not x.is_contiguous() or x.shape[1] == 0:
        return DECLINE
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), DTYPE_FLAG[x.dtype], x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


@kernel("rms_norm", priority=10)
def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama", out_dtype=None):
    """torch.rms_norm is the Llama form; Jiutian's eps-outside-the-root form is declined."""
    if variant != "llama" or x.dtype != torch.float32 or out_dtype not in (None, x.dtype):
        return DECLINE
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@kernel("add_rms_norm", priority=10)
def add_rms_norm_native(x, residual, weight, eps: float, variant: str = "llama", out_dtype=None):
    if variant != "llama" or x.dtype != torch.float32 or residual.dtype != x.dtype or out_dtype not in (None, x.dtype):
        return DECLINE
    summed = x + residual
    return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed
