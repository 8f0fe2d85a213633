"""--quantization auto (the default): a quantized GGUF on CPU keeps its own level (int4 for 4-bit
files, int8 for 5-8-bit ones), and nothing else changes (float32 parity stays one flag away)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pagoda.config import EngineConfig
from pagoda.errors import ConfigError
from pagoda.models.loader import resolve_quantization
from pagoda.platforms import get_platform

Q4_GGUF = SimpleNamespace(quant_types={"model.embed_tokens.weight": "Q8_0", "model.layers.0.mlp.up_proj.weight": "Q4_1"})
F16_GGUF = SimpleNamespace(quant_types={"model.embed_tokens.weight": "F16", "model.norm.weight": "F32"})
SAFETENSORS = SimpleNamespace()


def _resolve(checkpoint, **opts) -> str | None:
    return resolve_quantization(EngineConfig(**opts), checkpoint, get_platform("cpu"))


def test_quantized_gguf_keeps_its_own_level() -> None:
    assert EngineConfig().quantization == "auto"
    assert _resolve(Q4_GGUF) == "int4"  # Q4_1 layers beside a Q8_0 embedding
    q8 = SimpleNamespace(quant_types={"model.embed_tokens.weight": "Q8_0", "model.layers.0.mlp.up_proj.weight": "Q8_0"})
    assert _resolve(q8) == "int8"
    k_mix = {f"model.layers.{i}.mlp.up_proj.weight": "Q4_K" for i in range(4)} | {"lm_head.weight": "Q6_K"}
    assert _resolve(SimpleNamespace(quant_types=k_mix)) == "int4"
    assert _resolve(SimpleNamespace(quant_types={"a": "Q6_K", "b": "Q5_K", "c": "Q6_K"})) == "int8"
    assert _resolve(SimpleNamespace(quant_types={"a": "IQ3_XXS"})) == "int4"


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
