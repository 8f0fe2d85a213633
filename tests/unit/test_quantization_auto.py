"""--quantization auto (the default): bf16 linears for a quantized GGUF on CPU, int4 when bf16
would not fit, and nothing else changes (float32 parity stays one flag away)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagoda.config import EngineConfig
from pagoda.errors import ConfigError
from pagoda.models.config import ModelConfig
from pagoda.models.loader import resolve_quantization
from pagoda.platforms import get_platform
from tests.conftest import TINY_LLAMA

Q4_GGUF = SimpleNamespace(quant_types={"model.embed_tokens.weight": "Q8_0", "model.layers.0.mlp.up_proj.weight": "Q4_1"})
F16_GGUF = SimpleNamespace(quant_types={"model.embed_tokens.weight": "F16", "model.norm.weight": "F32"})
SAFETENSORS = SimpleNamespace()


def _resolve(checkpoint, free_bytes: int = 1 << 40, **opts) -> str | None:
    platform = get_platform("cpu")
    platform.free_memory = lambda: free_bytes  # instance attribute: this test's platform only
    try:
        cfg = ModelConfig.from_hf_dict(TINY_LLAMA)
        return resolve_quantization(EngineConfig(**opts), checkpoint, cfg, torch.float32, platform)
    finally:
        del platform.free_memory


def test_quantized_gguf_gets_bf16_linears() -> None:
    assert EngineConfig().quantization == "auto"
    assert _resolve(Q4_GGUF) == "bf16"


def test_int4_when_bf16_would_not_fit() -> None:
    assert _resolve(Q4_GGUF, free_bytes=1 << 30) == "int4"  # the 1 GiB headroom alone eats it


def test_float_checkpoints_explicit_dtypes_and_explicit_choices_are_kept() -> None:
    assert _resolve(F16_GGUF) is None
    assert _resolve(SAFETENSORS) is None
    assert _resolve(Q4_GGUF, dtype="float32") is None  # an explicit dtype means exactly that dtype
    assert _resolve(Q4_GGUF, quantization="none") is None
    assert _resolve(Q4_GGUF, quantization=None) is None
    assert _resolve(SAFETENSORS, quantization="int4") == "int4"


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ConfigError, match="quantization must be one of auto, none, bf16, int8, int4"):
        EngineConfig(quantization="int3")
