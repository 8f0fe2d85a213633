"""The model-to-kernel contract for running a step's whole decoder stack in one call.

A model that wants a fused stack kernel describes its layers here, in plain data it builds
itself (weights in their kernel formats, norms, shapes, rotary tables); a kernel reads this
description and never a model's attribute names. Each layer is the pre-norm Llama block:
x + o(attn(rope(qkv(norm1(x))))), then h + down(silu(gate(h')) * up(h')) with h' = norm2(h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class DecoderLayerSpec:
    """One layer's weights. A linear's weight is what its kernels read: a dense tensor or a
    quantized weight of pagoda.ops.quant (whose `packed` is the kernel's own layout)."""

    qkv: Any
    qkv_bias: torch.Tensor | None
    o: Any
    gate_up: Any
    down: Any
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    # The LoRA stacks of qkv, o, gate_up and down (pagoda/ops/lora.py), when adapters are
    # enabled: a step whose batch names adapters adds them after each linear, as the per-op
    # path does (Linear's hook).
    lora: tuple[Any, Any, Any, Any] | None = None


@dataclass(frozen=True, eq=False)
class DecoderStackSpec:
    layers: tuple[DecoderLayerSpec, ...]
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    norm_variant: str  # "llama" or "jiutian" (pagoda/ops/reference.py: rms_norm)
    attn_scale: float
    dtype: torch.dtype  # the residual stream's and the norms' dtype
    activation_dtype: torch.dtype | None  # what the linears compute on, None: dtype
    rope_cos: torch.Tensor  # [positions, head_dim] float32, each half repeated
    rope_sin: torch.Tensor

    @property
    def device(self) -> torch.device:  # op dispatch keys on it
        return self.rope_cos.device
