"""Building blocks of the Llama-family model; each hot computation goes through pagoda.ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import ops
from pagoda.errors import ConfigError
from pagoda.models.rope import cos_sin_cache


@dataclass(frozen=True)
class LinearFormat:
    """How linear-layer weights are stored: "bf16", "int4" or "int8" (with a group size)."""

    kind: str
    group_size: int = 32  # GGUF Q4_1 / Q8_0 blocks are 32 wide, so 32 re-quantizes them exactly

    @property
    def activation_dtype(self) -> torch.dtype | None:
        """What these linears compute on (inputs arriving in it need no conversion); None:
        the model's own dtype. bf16 matmuls take bfloat16; the int4/int8 kernels take
        float32 or bfloat16 alike (they round to bfloat16 themselves), so the layers around
        them keep the model's dtype."""
        return torch.bfloat16 if self.kind == "bf16" else None

    def for_output_head(self) -> "LinearFormat":
        """The output head is the matmul most sensitive to rounding (a 4-bit head costs 35x
        the KL divergence on SmolLM2): 8-bit beside int4 or int8 layers (GGUF files keep
        their own head at Q8_0 or better), bfloat16 beside bfloat16."""
        return LinearFormat("bf16") if self.kind == "bf16" else LinearFormat("int8")


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: weights come from a checkpoint or the dummy initialiser, layer by layer.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). Fused projections are several HF weights stacked along rows.

    LoRA hook: a linear adapters may target holds `lora` (an ops.LoRAStack, set by
    `enable_lora`); when the step's batch names adapters, their low-rank products are added
    to the base output (ops.lora_apply), whatever the base weights' format."""

    lora: ops.LoRAStack | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    @property
    def kernel_weight(self):
        """The weight as kernels read it (a fused stack's description hands them this)."""
        return self.weight

    def load_rows(self, row0: int, w: torch.Tensor) -> None:
        self.weight.data[row0 : row0 + w.shape[0]].copy_(w)

    def finalize(self) -> None:
        """Called once after all weights are loaded (quantized layers repack here)."""

    def forward(self, x: torch.Tensor, batch: ops.ForwardBatch | None = None) -> torch.Tensor:
        y = self.matmul_base(x)
        if self.lora is not None and batch is not None and batch.lora_ids is not None:
            y = ops.lora_apply(y, x, batch, self.lora)
        return y

    def matmul_base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantizedLinear(Linear):
    """Weight-only quantized linear: canonical weights (ops.quant) fill in row by row as they
    load, then a kernel repacks them once; activations stay in the model's dtype."""

    kind = ""
    weight_type: type = object
    matmul = prepack = None  # the ops

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device,
        group_size: int = 32,
    ):
        nn.Module.__init__(self)
        if in_features % group_size:
            raise ConfigError(f"{self.kind} group size {group_size} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features = in_features, out_features
        self.qweight = self.weight_type.empty(out_features, in_features, group_size, device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    @property
    def kernel_weight(self):
        return self.qweight

    def load_rows(self, row0: int, w: torch.Tensor) -> None:
        self.qweight.load_rows(row0, w)

    def finalize(self) -> None:
        self.qweight = self.prepack(self.qweight)

    def matmul_base(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.qweight, self.bias)


class Int4Linear(QuantizedLinear):
    """Asymmetric 4-bit, per group of inputs (GGUF Q4_1's form)."""

    kind, weight_type, matmul, prepack = "int4", ops.Int4Weight, ops.int4_linear, ops.int4_prepack


class Int8Linear(QuantizedLinear):
    """Symmetric 8-bit, per group of 32 inputs (GGUF Q8_0's form)."""

    kind, weight_type, matmul, prepack = "int8", ops.Int8Weight, ops.int8_linear, ops.int8_prepack


class BF16Linear(Linear):
    """bfloat16 weights and matmuls (oneDNN-prepacked on CPU); the model around it keeps its dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__(in_features, out_features, bias, torch.bfloat16, device)
        self.packed = None

    def finalize(self) -> None:
        self.packed = ops.linear_prepack(self.weight)

    def matmul_base(self, x: torch.Tensor) -> torch.Tensor:
        return ops.packed_linear(x, self.weight, self.packed, self.bias)


def make_linear(
    in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device,
    fmt: LinearFormat | None = None,
) -> Linear:
    if fmt is None:
        return Linear(in_features, out_features, bias, dtype, device)
    if fmt.kind == "bf16":
        return BF16Linear(in_features, out_features, bias, dtype, device)
    if fmt.kind == "int4":
        return Int4Linear(in_features, out_features, bias, dtype, device, fmt.group_size)
    if fmt.kind == "int8":
        return Int8Linear(in_features, out_features, bias, dtype, device, fmt.group_size)
    raise ConfigError(f"unknown linear format {fmt.kind!r}")


class RMSNorm(nn.Module):
    """RMSNorm whose output is in `out_dtype` (what the next linear consumes: bfloat16 for
    quantized linears) while its weight and the residual stream keep the model dtype."""

    def __init__(
        self, size: int, eps: float, variant: str, dtype: torch.dtype, device: torch.device,
        out_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.eps, self.variant = eps, variant
        self.out_dtype = None if out_dtype == dtype else out_dtype
        self.weight = _param(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, self.variant, self.out_dtype)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.variant, self.out_dtype)


class Rotary(nn.Module):
    """The rotary tables ([positions, head_dim] float32, each half repeated) and their rows
    for a step's positions, gathered once per step for all layers."""

    def __init__(self, head_dim: int, theta: float, max_position: int, scaling: dict | None, device: torch.device):
        super().__init__()
        cos, sin = cos_sin_cache(head_dim, theta, max_position, scaling, torch.float32, device).chunk(2, dim=-1)
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((sin, sin), dim=-1), persistent=False)

    def forward(self, batch: ops.ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.view(self._rows)

    def _rows(self, batch: ops.ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[batch.positions], self.sin[batch.positions]
