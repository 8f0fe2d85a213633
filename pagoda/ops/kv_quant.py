"""The int8 KV-cache format, and reading any cache's rows in a compute dtype.

Decode attention reads every cached key and value once per step, from DRAM once the
contexts outgrow the caches, so its time follows the cache's bytes. An int8 cache stores
each token's head as ``head_dim`` signed bytes followed by one float32 scale (the bytes of
the cache tensor's last dimension, ``head_dim + 4``): value = q * scale, scale = max|x| / 127
per token and head. That is 0.53x the bytes of a bfloat16 cache at head_dim 64. The C
kernels (pagoda/ops/csrc) read and write the same rows and round the same way.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # a float32 scale after each head's bytes


def cache_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of the cache's last dimension for one head."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] floats -> [..., D + 4] int8 rows: round(x * (1 / max|x|) * 127), ties to even,
    then the scale max|x| * float32(1 / 127); an all-zero row gets scale 0. Written as products
    and a reciprocal, which torch and the C kernels compute identically (torch turns a
    division by a scalar into a product, so a quotient would differ in the last bit)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, amax.reciprocal() * 127.0, torch.zeros_like(amax))
    q = torch.round(xf * inv).clamp(-127, 127).to(torch.int8)
    scale = (amax * (1.0 / 127.0)).contiguous().view(torch.int8)  # the float32's 4 bytes
    return torch.cat((q, scale), dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 4] int8 rows -> [..., D] in dtype."""
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)


def store_rows(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Write x [T, H, D] into cache slots, in the cache's form (rounded once from x)."""
    cache.index_copy_(0, slots, quantize_rows(x) if cache.dtype == torch.int8 else x.to(cache.dtype))


def gather_rows(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] in dtype, for slots of any shape (index_select: ~3.5x faster than advanced
    indexing for whole rows)."""
    rows = cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
    return dequantize_rows(rows, dtype) if cache.dtype == torch.int8 else rows.to(dtype)
