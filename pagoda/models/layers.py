"""Building blocks of the Llama-family model; each hot computation goes through pagoda.ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import ops


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: weights come from a checkpoint or the dummy initialiser, layer by layer.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). Fused projections are several HF weights stacked along rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, variant: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps, self.variant = eps, variant
        self.weight = _param(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, self.variant)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.variant)
