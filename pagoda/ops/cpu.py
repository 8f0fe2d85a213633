"""CPU kernels: pagoda's C kernels (pagoda/ops/csrc) first, then torch's fused native ops.

Each kernel declines (returns DECLINE) inputs it does not cover, including everything
when the C library could not be built here; the next tier, and at last the reference,
serves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from pagoda.ops import huge_pages, native
from pagoda.ops.quant import Int4Weight, Int8Weight, dequantize_int8, unpack_nibbles
from pagoda.ops.registry import DECLINE, register_kernel
from pagoda.ops.sdpa import attend_per_sequence


_BF16 = {torch.float32: 0, torch.bfloat16: 1}  # the C kernels' dtype flag per tensor
KV_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # a KV cache's form (kv_kind in kernels.h)


def _rows(*tensors: torch.Tensor) -> bool:
    """float32/bfloat16 with contiguous last-dimension rows (the row stride may be anything)."""
    return all(t.dtype in _BF16 and t.stride(-1) == 1 for t in tensors)


@register_kernel("rms_norm", "cpu", priority=20)
def rms_norm_c(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama", out_dtype=None):
    lib = native.library()
    out_dtype = out_dtype or x.dtype
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or out_dtype not in _BF16 \
            or not x.is_contiguous():
        return DECLINE
    out = torch.empty(x.shape, dtype=out_dtype)
    cols = x.shape[-1]
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), _BF16[out_dtype], x.numel() // cols, cols, eps,
                 variant == "jiutian", torch.get_num_threads())
    return out


@register_kernel("add_rms_norm", "cpu", priority=20)
def add_rms_norm_c(x, residual, weight, eps: float, variant: str = "llama", out_dtype=None):
    """x (a layer's output, float32 or bfloat16) joins the float32 residual stream."""
    lib = native.library()
    out_dtype = out_dtype or residual.dtype
    if (
        lib is None or not _rows(x) or residual.dtype != torch.float32 or weight.dtype != torch.float32
        or out_dtype not in _BF16 or not (x.is_contiguous() and residual.is_contiguous())
    ):
        return DECLINE
    out, summed = torch.empty(x.shape, dtype=out_dtype), torch.empty_like(residual)
    cols = x.shape[-1]
    lib.add_rms_norm(x.data_ptr(), _BF16[x.dtype], residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                     _BF16[out_dtype], summed.data_ptr(), x.numel() // cols, cols, eps, variant == "jiutian",
                     torch.get_num_threads())
    return out, summed


def _heads_packed(x: torch.Tensor) -> bool:
    """[T, H, D] with each token's heads side by side (a single head's stride is moot)."""
    return x.shape[1] == 1 or x.stride(1) == x.shape[2]


@register_kernel("rotary_store_kv", "cpu", priority=20)
def rotary_store_kv_c(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out_dtype=None):
    """One call per layer: reads q/k/v straight out of the fused QKV output (strided rows)."""
    lib = native.library()
    t, hq, d = q.shape
    out_dtype = out_dtype or q.dtype
    if (
        lib is None or not _rows(q) or k.dtype != q.dtype or v.dtype != q.dtype or out_dtype not in _BF16
        or (t > 1 and not q.stride(0) == k.stride(0) == v.stride(0)) or not all(_heads_packed(x) for x in (q, k, v))
        or k_cache.dtype not in KV_KIND or v_cache.dtype != k_cache.dtype
        or not (k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous())
        or not (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous())
    ):
        return DECLINE
    out = torch.empty(q.shape, dtype=out_dtype)
    lib.rotary_store_kv(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _BF16[q.dtype], q.stride(0), cos.data_ptr(), sin.data_ptr(),
        out.data_ptr(), _BF16[out_dtype], k_cache.data_ptr(), v_cache.data_ptr(), KV_KIND[k_cache.dtype],
        slot_mapping.data_ptr(), t, hq, k.shape[1], d, torch.get_num_threads(),
    )
    return out


@register_kernel("silu_and_mul", "cpu", priority=20)
def silu_and_mul_c(x: torch.Tensor):
    lib = native.library()
    if lib is None or x.dtype not in _BF16 or not x.is_contiguous():
        return DECLINE
    n = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    flag = _BF16[x.dtype]
    lib.silu_and_mul(x.data_ptr(), flag, out.data_ptr(), flag, x.numel() // (2 * n), n, torch.get_num_threads())
    return out


@register_kernel("argmax_rows", "cpu", priority=20)
def argmax_rows_c(x: torch.Tensor):
    lib = native.library()
    if lib is None or x.dim() != 2 or x.dtype not in _BF16 or not x.is_contiguous() or x.shape[1] == 0:
        return DECLINE
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), _BF16[x.dtype], x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


@register_kernel("rms_norm", "cpu", priority=10)
def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama", out_dtype=None):
    """torch.rms_norm is the Llama form; Jiutian's eps-outside-the-root form is declined."""
    if variant != "llama" or x.dtype != torch.float32 or out_dtype not in (None, x.dtype):
        return DECLINE
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@register_kernel("add_rms_norm", "cpu", priority=10)
def add_rms_norm_native(x, residual, weight, eps: float, variant: str = "llama", out_dtype=None):
    if variant != "llama" or x.dtype != torch.float32 or residual.dtype != x.dtype or out_dtype not in (None, x.dtype):
        return DECLINE
    summed = x + residual
    return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed


@dataclass(frozen=True)
class QuantTiles:
    """A layout of the C quantized matmuls (see csrc/quant_matmul.c): the tensors, and which
    C function reads them. Their data pointers are taken once, for the ~120 calls a step;
    the tensors sit on huge pages (ops/huge_pages.py), as every step streams them whole."""

    matmul: ClassVar[str]
    pointers: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tensors = (getattr(self, f.name) for f in fields(self) if f.init)
        object.__setattr__(self, "pointers", tuple(t.data_ptr() for t in tensors))


@dataclass(frozen=True)
class Int4Tiles(QuantTiles):
    """Nibble pairs per 16-output tile, and float16 scales and mins per tile and group (the
    canonical values, unchanged)."""

    matmul = "int4_matmul"
    nibbles: torch.Tensor  # [N/16, K/32, 16, 16] uint8
    scales: torch.Tensor  # [N/16, K/32, 16] float16
    mins: torch.Tensor


class TorchInt4(NamedTuple):
    """torch's int4 layout: packed weights, and bfloat16 scale and zero (w = (q - 8) * scale + zero)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor  # [K/g, N, 2] bfloat16


@register_kernel("int4_prepack", "cpu", priority=20)
def int4_prepack_c(w: Int4Weight):
    """The C kernel's tiles: exact Q4_1 values, and faster than torch's kernel at every
    batch size it was measured at (1-64 rows); frees the canonical copy."""
    if not _fits_c_tiles(w):
        return DECLINE
    n, k = w.out_features, w.in_features
    nibbles = huge_pages.empty((n // 16, k // 32, 16, 16), torch.uint8)
    for row0 in range(0, n, 4096):  # row blocks: one byte per weight unpacked at a time, not the whole head
        q = unpack_nibbles(w.qweight[row0 : row0 + 4096]).view(-1, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)
        nibbles[row0 // 16 : (row0 + q.shape[0] * 16) // 16] = q[..., 0] | (q[..., 1] << 4)
    w.packed = Int4Tiles(nibbles, _tiled_groups(w.scales), _tiled_groups(w.mins))
    w.qweight, w.scales, w.mins = None, None, None
    return w


@register_kernel("int4_linear", "cpu", priority=20)
@register_kernel("int8_linear", "cpu", priority=20)
def quant_linear_c(x: torch.Tensor, w: Int4Weight | Int8Weight, bias: torch.Tensor | None = None):
    """int4 and int8 alike: the tiles name the C matmul that reads them."""
    if not isinstance(w.packed, QuantTiles) or x.dtype not in _BF16:
        return DECLINE
    return _quant_matmul(getattr(native.library(), w.packed.matmul), w.packed.pointers, x, w, bias)


@dataclass(frozen=True)
class Int8Tiles(QuantTiles):
    """[N/16, K/32, 32 inputs, 16 outputs] int8 and float16 scales [N/16, K/32, 16]."""

    matmul = "int8_matmul"
    values: torch.Tensor
    scales: torch.Tensor


@register_kernel("int8_prepack", "cpu", priority=20)
def int8_prepack_c(w: Int8Weight):
    if not _fits_c_tiles(w):
        return DECLINE
    n, k = w.out_features, w.in_features
    values = huge_pages.copy(w.qweight.view(n // 16, 16, k // 32, 32).permute(0, 2, 3, 1))
    w.packed, w.qweight, w.scales = Int8Tiles(values, _tiled_groups(w.scales)), None, None
    return w


def _fits_c_tiles(w: Int4Weight | Int8Weight) -> bool:
    """Canonical weights the C quantized matmuls take: 16-output tiles, groups of 32, AVX-512."""
    lib = native.library()
    return (
        lib is not None and bool(lib.quant_matmul_available()) and w.qweight is not None
        and w.out_features % 16 == 0 and w.group_size == 32 and w.in_features % 32 == 0
    )


def _tiled_groups(per_group: torch.Tensor) -> torch.Tensor:
    """[N, K/32] per-group numbers as [N/16, K/32, 16]: a tile's sixteen outputs side by side."""
    n, groups = per_group.shape
    return huge_pages.copy(per_group.view(n // 16, 16, groups).permute(0, 2, 1))


def _quant_matmul(c_fn, pointers: tuple[int, ...], x: torch.Tensor, w, bias: torch.Tensor | None):
    """y = x W^T (+ bias) through a C quantized matmul, in x's dtype and leading shape. Kept
    lean: it runs ~120 times per decode step, and the C call itself takes ~2 us."""
    flat = x.dim() != 2 or not x.is_contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous() if flat else x
    y = torch.empty(x2.shape[0], w.out_features, dtype=x.dtype)
    flag = _BF16[x.dtype]
    c_fn(*pointers, x2.data_ptr(), flag, y.data_ptr(), flag, x2.shape[0], w.out_features, w.in_features,
         torch.get_num_threads())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.out_features) if flat else y


class DenseBF16(NamedTuple):
    """An int8 weight dequantized once to bfloat16, for CPUs the C kernel does not serve."""

    weight: torch.Tensor  # [N, K] bfloat16
    packed: Any  # its oneDNN layout, or None


@register_kernel("int8_prepack", "cpu", priority=10)
def int8_prepack_dense(w: Int8Weight):
    """Where the C kernel declines: bfloat16 once (2 bytes per weight, as a bf16 head), rather
    than the reference's dequantization on every call; one row block of float32 at a time."""
    if w.qweight is None:
        return DECLINE
    dense = torch.empty(w.out_features, w.in_features, dtype=torch.bfloat16)
    for row0 in range(0, w.out_features, 4096):
        rows = slice(row0, row0 + 4096)
        block = Int8Weight(dense[rows].shape[0], w.in_features, w.group_size, w.qweight[rows], w.scales[rows])
        dense[rows] = dequantize_int8(block)
    packed = linear_prepack_onednn(dense)
    w.packed, w.qweight, w.scales = DenseBF16(dense, None if packed is DECLINE else packed), None, None
    return w


@register_kernel("int8_linear", "cpu", priority=10)
def int8_linear_dense(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None):
    if not isinstance(w.packed, DenseBF16):
        return DECLINE
    if w.packed.packed is not None:
        return packed_linear_onednn(x, w.packed.weight, w.packed.packed, bias)
    return F.linear(x.to(torch.bfloat16), w.packed.weight, None if bias is None else bias.bfloat16()).to(x.dtype)


@register_kernel("int4_prepack", "cpu", priority=10)
def int4_prepack_cpu(w: Int4Weight):
    """torch's AVX512 int4 layout; frees the canonical copy (35B-class models need the RAM)."""
    if w.out_features % 16 or w.group_size not in (32, 64, 128, 256) or w.qweight is None:
        return DECLINE
    # Row blocks convert independently: unpacking a vocabulary-sized head to int32 at once
    # would take 4 bytes per weight (5 GB for a 152K x 7K head).
    packed = torch.empty_like(w.qweight)
    for row0 in range(0, w.out_features, 4096):
        rows = slice(row0, row0 + 4096)
        q = unpack_nibbles(w.qweight[rows]).to(torch.int32)
        packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale = w.scales.float()
    zero = w.mins.float() + 8 * scale
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    w.packed, w.qweight, w.scales, w.mins = TorchInt4(packed, scales_zeros), None, None, None  # no second copy
    return w


@register_kernel("int4_linear", "cpu", priority=10)
def int4_linear_cpu(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None):
    if not isinstance(w.packed, TorchInt4):
        return DECLINE
    packed, scales_zeros = w.packed
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16_rows(x), packed, w.group_size, scales_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return _like_input(y, x)


@register_kernel("linear_prepack", "cpu", priority=10)
def linear_prepack_onednn(weight: torch.Tensor):
    """oneDNN's blocked layout for bfloat16 weights: 1.7-2.5x faster than F.linear here."""
    if weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return DECLINE
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


@register_kernel("packed_linear", "cpu", priority=10)
def packed_linear_onednn(x: torch.Tensor, weight: torch.Tensor, packed, bias: torch.Tensor | None = None):
    if packed is None:
        return DECLINE
    b = None if bias is None else bias.to(torch.bfloat16)
    y = torch.ops.mkldnn._linear_pointwise(_bf16_rows(x), packed, b, "none", [], "")
    return _like_input(y, x)


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x as 2-D bfloat16 rows; models with quantized linears already pass exactly that, and
    then this costs no op at all (this runs ~120 times per decode step)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A linear's 2-D bfloat16 output in the input's leading shape and dtype."""
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


@register_kernel("paged_attention", "cpu", priority=20)
def paged_attention_cpu(q, k_cache, v_cache, meta, scale, out_dtype=None):
    """Decode tokens read their context from the pages in place (C kernel); prefill chunks,
    which are compute-bound, go to torch's flash SDPA one sequence at a time, in bfloat16
    when the cache is bfloat16 or int8 and the CPU has AMX (2.7x float32's speed there)."""
    lib = native.library()
    rows = meta.decode_rows
    out_dtype = out_dtype or q.dtype
    decode_in_c = (
        lib is not None and len(rows) > 0 and q.dtype == torch.float32 and k_cache.dtype in KV_KIND
        and out_dtype in _BF16 and q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    )
    compute = torch.bfloat16 if k_cache.dtype in (torch.bfloat16, torch.int8) and HAS_AMX else q.dtype
    if not decode_in_c and compute == q.dtype:
        return DECLINE  # exactly what the portable SDPA kernel does
    out = torch.empty(q.shape, dtype=out_dtype)
    seqs = meta.multi_token_seqs if decode_in_c else range(meta.batch_size)
    if decode_in_c:
        _, hq, d = q.shape
        block_table = meta.block_table
        lib.paged_decode_attention(
            q.data_ptr(), hq * d, k_cache.data_ptr(), v_cache.data_ptr(), KV_KIND[k_cache.dtype],
            block_table.data_ptr(), block_table.stride(0), rows.data_ptr(), len(rows), out.data_ptr(),
            _BF16[out_dtype], hq * d, hq, k_cache.shape[1], d, meta.page_size, scale, meta.decode_max_len,
            torch.get_num_threads(),
        )
    if seqs:
        attend_per_sequence(q, k_cache, v_cache, meta, scale, out, seqs, compute)
    return out


HAS_AMX = "amx_bf16" in native.cpu_flags().split()  # the C kernels' AMX paths apply

