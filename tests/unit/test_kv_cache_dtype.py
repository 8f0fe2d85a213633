"""--kv-cache-dtype: bfloat16 pages halve what decode attention reads, at a small, bounded cost."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM
from pagoda.errors import ConfigError
from tests.model_utils import incremental_logits, prefill_logits


def _llm(tiny_config_path, **opts) -> LLM:
    return LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01, **opts)


def test_auto_is_bf16_with_quantization_and_the_compute_dtype_without(tiny_config_path) -> None:
    assert _llm(tiny_config_path).engine.kv_pool.k[0].dtype == torch.float32
    assert _llm(tiny_config_path, quantization="bf16").engine.kv_pool.k[0].dtype == torch.bfloat16
    assert _llm(tiny_config_path, quantization="bf16", kv_cache_dtype="float32").engine.kv_pool.k[0].dtype == torch.float32


def test_bf16_cache_decodes_close_to_float32(tiny_config_path) -> None:
    dense = _llm(tiny_config_path)
    narrow = _llm(tiny_config_path, kv_cache_dtype="bfloat16")
    ids = list(range(5, 45))
    exact = prefill_logits(dense.engine.runner, ids)
    # one token at a time: every position after the first reads bf16 keys/values from the pages
    got = incremental_logits(narrow.engine.runner, ids, chunk=1)
    assert not torch.equal(got, exact)  # the cache really is narrower
    assert torch.nn.functional.cosine_similarity(got, exact, dim=-1).min() > 0.999
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_unknown_kv_cache_dtype_is_refused(tiny_config_path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        _llm(tiny_config_path, kv_cache_dtype="fp8")
