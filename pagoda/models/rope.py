"""Rotary position embedding tables, with the scaling schemes HF configs name.

The cos|sin table is computed once for every position the engine may see; the
rotary op gathers rows by position, so prefill chunks and decodes share one path.
Dynamic NTK is applied statically for the extended length (as vLLM does), because a
table that changed with the batch would invalidate keys already in the KV cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pagoda.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    return kind


def inv_freq_and_scale(
    dim: int, base: float, max_position: int, scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float, int]:
    """Returns (inv_freq [dim/2], attention scaling factor, number of positions to tabulate)."""
    kind = rope_type(scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "default":
        return inv_freq.float(), 1.0, max_position
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0, int(max_position * factor)
    if kind == "dynamic":
        max_len = int(max_position * factor)
        scaled_base = base * ((factor * max_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
        return (1.0 / (scaled_base**exponents)).float(), 1.0, max_len
    if kind == "llama3":
        return _llama3(inv_freq, factor, scaling).float(), 1.0, max_position
    return _yarn(dim, base, max_position, factor, scaling)


def _llama3(inv_freq: torch.Tensor, factor: float, scaling: dict[str, Any]) -> torch.Tensor:
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    dim: int, base: float, max_position: int, factor: float, scaling: dict[str, Any]
) -> tuple[torch.Tensor, float, int]:
    original = int(scaling.get("original_max_position_embeddings") or max_position)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.float(), float(attention_factor), int(original * factor)


def cos_sin_cache(
    dim: int, base: float, max_position: int, scaling: dict[str, Any] | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[num_positions, dim] table: cos in the first half, sin in the second."""
    inv_freq, scale, positions = inv_freq_and_scale(dim, base, max_position, scaling)
    t = torch.arange(max(positions, max_position), dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * scale).to(dtype=dtype, device=device)
