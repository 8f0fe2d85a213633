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
    plain = _llm(tiny_config_path).engine  # the compute dtype: float32 on CPU, bfloat16 on GPUs
    assert plain.kv_pool.k[0].dtype == plain.loaded.dtype
    assert _llm(tiny_config_path, quantization="bf16").engine.kv_pool.k[0].dtype == torch.bfloat16
    assert _llm(tiny_config_path, quantization="bf16", kv_cache_dtype="float32").engine.kv_pool.k[0].dtype == torch.float32


def test_bf16_cache_decodes_close_to_float32(tiny_config_path) -> None:
    dense = _llm(tiny_config_path, dtype="float32")  # float32 pages on every device (a GPU's default is bf16)
    narrow = _llm(tiny_config_path, dtype="float32", kv_cache_dtype="bfloat16")
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
    with pytest.raises(ConfigError, match="int8"):  # the message lists it
        _llm(tiny_config_path, kv_cache_dtype="int4")


def test_int8_cache_stores_a_scale_per_group_and_decodes_close(tiny_config_path) -> None:
    from pagoda.cache.kv_pool import KVPool

    dense = _llm(tiny_config_path)
    narrow = _llm(tiny_config_path, kv_cache_dtype="int8")
    k = narrow.engine.kv_pool.k[0]
    assert k.dtype == torch.int8 and k.shape[1:] == (2, 16 + 2)  # head_dim bytes, then a float16 scale
    assert KVPool.bytes_per_token(2, 2, 64, torch.int8) == 2 * 2 * 2 * (64 + 4)  # a scale per 32 values
    ids = list(range(5, 45))
    exact = prefill_logits(dense.engine.runner, ids)
    for got in (incremental_logits(narrow.engine.runner, ids, chunk=1), prefill_logits(narrow.engine.runner, ids)):
        assert not torch.equal(got, exact)
        assert torch.nn.functional.cosine_similarity(got, exact, dim=-1).min() > 0.999
        assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_int8_cache_serves_a_batch_and_frees_its_pages(tiny_config_path) -> None:
    from pagoda import SamplingParams

    llm = _llm(tiny_config_path, kv_cache_dtype="int8", quantization="int4")
    free = llm.engine.stats().kv_pages_free
    outs = llm.generate([[7] * n for n in (3, 40, 17)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24, 24, 24]
    alone = llm.generate([[7] * 40], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # batching changes nothing
    stats = llm.engine.stats()  # every page is free again or held only by the prefix cache
    assert stats.kv_pages_free + stats.kv_pages_cached == free
