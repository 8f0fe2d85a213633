"""Weight-only int4 and int8 quantization: canonical formats, reference matmuls, prepack.

Canonical format (any device): per output row, groups of `group_size` input weights;
``q`` in 0..15 packed two per byte (low nibble = even column) into ``qweight``
[N, K/2] uint8, and w = q * scale + min with ``scales`` / ``mins`` [N, K/g] in
float16: GGUF Q4_1's own form (w = d*q + m, d and m float16), so its blocks load
exactly. Activations are rounded to bfloat16, as the fast kernels take them (products of
bf16 activations and 4/8-bit weights are then exact in float32).

int8 (``--quantization int8``, and output heads beside int4 layers) is GGUF Q8_0's form:
w = q * scale with q in -127..127 int8 [N, K] and ``scales`` [N, K/g] float16.

``int4_prepack`` / ``int8_prepack`` turn canonical weights into a platform kernel's
layout once, after loading; the reference tier keeps them canonical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pagoda.ops.registry import reference


@dataclass
class Int4Weight:
    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor | None  # [N, K/2] uint8, canonical (None once a kernel packed it)
    scales: torch.Tensor | None  # [N, K/g] float16 (None once packed)
    mins: torch.Tensor | None  # [N, K/g] float16 (None once packed)
    packed: Any = None  # a platform kernel's own layout, set by int4_prepack
    device: torch.device = torch.device("cpu")

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, device: torch.device) -> "Int4Weight":
        groups = in_features // group_size
        return cls(
            out_features, in_features, group_size,
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
            torch.zeros(out_features, groups, dtype=torch.float16, device=device),
            torch.zeros(out_features, groups, dtype=torch.float16, device=device),
            device=device,
        )

    def nbytes(self) -> int:
        """Nibbles plus two 16-bit numbers per group (scale and min, in every layout)."""
        return self.out_features * self.in_features // 2 + 4 * self.out_features * (self.in_features // self.group_size)

    def load_rows(self, row0: int, w: torch.Tensor) -> None:
        """Quantize float rows w [n, K] into rows row0.. (rows are independent, so fused
        projections load their parts one HF tensor at a time)."""
        q, scales, mins = quantize_int4(w, self.group_size)
        rows = slice(row0, row0 + w.shape[0])
        self.qweight[rows] = pack_nibbles(q)
        self.scales[rows] = scales
        self.mins[rows] = mins


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per group, as GGUF's Q4_1 does (so its dequantized
    blocks come back exactly): returns q [N, K] uint8, scales, mins [N, K/g] float16."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale, low = ((hi - lo) / 15).half(), lo.half()
    step = scale.float()[..., None]  # q against the rounded scale and min: what is stored is what counts
    q = torch.where(step > 0, (g - low.float()[..., None]) / step.clamp(min=2.0**-24), 0)
    return q.round().clamp(0, 15).to(torch.uint8).reshape(n, k), scale, low


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    q = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    q[:, 0::2] = packed & 0xF
    q[:, 1::2] = packed >> 4
    return q


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    """The float32 weight [N, K] the canonical format stands for."""
    q = unpack_nibbles(w.qweight).float().reshape(w.out_features, -1, w.group_size)
    deq = q * w.scales.float()[..., None] + w.mins.float()[..., None]
    return deq.reshape(w.out_features, w.in_features)


@reference("int4_linear")
def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = bf16(x) @ dequant(w)^T (+ bias), accumulated in float32, returned in x's dtype."""
    return _dequantized_linear(x, w, dequantize_int4, bias)


def _dequantized_linear(x: torch.Tensor, w: Any, dequantize, bias: torch.Tensor | None) -> torch.Tensor:
    if w.qweight is None:
        raise RuntimeError("quantized weight was packed for a kernel that declined this input")
    y = F.linear(x.to(torch.bfloat16).float(), dequantize(w))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@reference("int4_prepack")
def int4_prepack(w: Int4Weight) -> Int4Weight:
    """Convert canonical weights to the fastest kernel's layout; the reference keeps them."""
    return w


@dataclass
class Int8Weight:
    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor | None  # [N, K] int8, canonical (None once a kernel packed it)
    scales: torch.Tensor | None  # [N, K/g] float16 (None once packed)
    packed: Any = None  # a platform kernel's own layout, set by int8_prepack
    device: torch.device = torch.device("cpu")

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, device: torch.device) -> "Int8Weight":
        return cls(
            out_features, in_features, group_size,
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            torch.zeros(out_features, in_features // group_size, dtype=torch.float16, device=device),
            device=device,
        )

    def nbytes(self) -> int:
        return self.out_features * self.in_features + 2 * self.out_features * (self.in_features // self.group_size)

    def load_rows(self, row0: int, w: torch.Tensor) -> None:
        q, scales = quantize_int8(w, self.group_size)
        self.qweight[row0 : row0 + w.shape[0]] = q
        self.scales[row0 : row0 + w.shape[0]] = scales


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization per group, as GGUF's Q8_0 does (its dequantized blocks
    come back exactly): returns q [N, K] int8 and scales [N, K/g] float16."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    scale = (g.abs().amax(-1) / 127).half()
    step = scale.float()[..., None]
    q = torch.where(step > 0, g / step.clamp(min=2.0**-24), 0)
    return q.round().clamp(-127, 127).to(torch.int8).reshape(n, k), scale


def dequantize_int8(w: Int8Weight) -> torch.Tensor:
    q = w.qweight.float().reshape(w.out_features, -1, w.group_size)
    return (q * w.scales.float()[..., None]).reshape(w.out_features, w.in_features)


@reference("int8_linear")
def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = bf16(x) @ dequant(w)^T (+ bias), accumulated in float32, returned in x's dtype."""
    return _dequantized_linear(x, w, dequantize_int8, bias)


@reference("int8_prepack")
def int8_prepack(w: Int8Weight) -> Int8Weight:
    return w
