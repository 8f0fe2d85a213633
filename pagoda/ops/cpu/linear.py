"""CPU linear kernels: the C quantized matmuls over their tiles (csrc/quant_matmul.c), torch's
int4 kernel below them, and oneDNN's prepacked bf16 matmul. A prepack kernel turns the
canonical weights (pagoda/ops/quant.py) into its own layout once after loading; the matmul
kernel of that layout declines every other one."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from pagoda.ops.cpu import huge_pages, native
from pagoda.ops.cpu.native import DTYPE_FLAG
from pagoda.ops.quant import Int4Weight, Int8Weight, dequantize_int8, unpack_nibbles
from pagoda.ops.registry import DECLINE, kernel



@dataclass(frozen=True)
class QuantTiles:
    """A layout of the C quantized matmuls (see csrc/quant_matmul.c): the tensors, and which
    C function reads them. Their data pointers are taken once, for the ~120 calls a step;
    the tensors sit on huge pages (huge_pages.py), as every step streams them whole."""

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


@kernel("int4_prepack", priority=20)
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


@kernel("int4_linear", priority=20)
@kernel("int8_linear", priority=20)
def quant_linear_c(x: torch.Tensor, w: Int4Weight | Int8Weight, bias: torch.Tensor | None = None):
    """int4 and int8 alike: the tiles name the C matmul that reads them."""
    if not isinstance(w.packed, QuantTiles) or x.dtype not in DTYPE_FLAG:
        return DECLINE
    return _quant_matmul(getattr(native.library(), w.packed.matmul), w.packed.pointers, x, w, bias)


@dataclass(frozen=True)
class Int8Tiles(QuantTiles):
    """[N/16, K/32, 32 inputs, 16 outputs] int8 and float16 scales [N/16, K/32, 16]."""

    matmul = "int8_matmul"
    values: torch.Tensor
    scales: torch.Tensor


@kernel("int8_prepack", priority=20)
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
    flag = DTYPE_FLAG[x.dtype]
    c_fn(*pointers, x2.data_ptr(), flag, y.data_ptr(), flag, x2.shape[0], w.out_features, w.in_features,
         torch.get_num_threads())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.out_features) if flat else y


class DenseBF16(NamedTuple):
    """An int8 weight dequantized once to bfloat16, for CPUs the C kernel does not serve."""

    weight: torch.Tensor  # [N, K] bfloat16
    packed: Any  # its oneDNN layout, or None


@kernel("int8_prepack", priority=10)
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


@kernel("int8_linear", priority=10)
def int8_linear_dense(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None):
    if not isinstance(w.packed, DenseBF16):
        return DECLINE
    if w.packed.packed is not None:
        return packed_linear_onednn(x, w.packed.weight, w.packed.packed, bias)
    return F.linear(x.to(torch.bfloat16), w.packed.weight, None if bias is None else bias.bfloat16()).to(x.dtype)


@kernel("int4_prepack", priority=10)
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


@kernel("int4_linear", priority=10)
def int4_linear_cpu(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None):
    if not isinstance(w.packed, TorchInt4):
        return DECLINE
    packed, scales_zeros = w.packed
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16_rows(x), packed, w.group_size, scales_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return _like_input(y, x)


@kernel("linear_prepack", priority=10)
def linear_prepack_onednn(weight: torch.Tensor):
    """oneDNN's blocked layout for bfloat16 weights: 1.7-2.5x faster than F.linear here."""
    if weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return DECLINE
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


@kernel("packed_linear", priority=10)
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
