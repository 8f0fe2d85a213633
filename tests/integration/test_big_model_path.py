"""The layer-by-layer int4 path that lets a 35B-class model start in 24 GiB, on a smaller model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pagoda.config import EngineConfig
from pagoda.errors import ConfigError
from pagoda.models.config import ModelConfig
from pagoda.models.layers import LinearFormat
from pagoda.models.loader import estimate_weight_bytes, load_model
from pagoda.platforms import get_platform

JIUTIAN_35B = {
    "architectures": ["JiutianForCausalLM"], "model_type": "jiutian", "vocab_size": 152064, "hidden_size": 7168,
    "intermediate_size": 21504, "num_hidden_layers": 56, "num_attention_heads": 56, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "qkv_bias": True,
    "tie_word_embeddings": False, "eos_token_id": 151645,
}
# ~700M parameters of the same family: ~2.8 GB in float32, ~0.55 GB as int4 + bf16 embeddings.
MEDIUM = {**JIUTIAN_35B, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4}


def test_35b_estimate_matches_the_shared_sizing() -> None:
    cfg = ModelConfig.from_hf_dict(JIUTIAN_35B)
    assert cfg.num_parameters() == pytest.approx(34.7e9, rel=0.01)
    bf16 = estimate_weight_bytes(cfg, torch.bfloat16, None)
    int4 = estimate_weight_bytes(cfg, torch.bfloat16, LinearFormat("int4", 128))
    assert bf16 == pytest.approx(69.4e9, rel=0.01)
    assert int4 < 21e9  # fits 24 GiB with a KV cache


def test_a_model_that_cannot_fit_fails_fast_with_numbers(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(JIUTIAN_35B))
    config = EngineConfig(model_config=str(path), load_format="dummy", dtype="float32")
    with pytest.raises(ConfigError, match=r"need 1\d\d\.\d GiB \(float32\) but only .* GiB of memory is free"):
        load_model(config, get_platform("cpu"))


@pytest.mark.slow
def test_int4_dummy_model_is_built_without_a_float_copy(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MEDIUM))
    code = f"""
import resource, torch
from pagoda import LLM, SamplingParams
llm = LLM(model_config={str(path)!r}, load_format="dummy", quantization="int4", int4_group_size=128,
          dtype="bfloat16", kv_cache_memory=0.05)
out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 4
print(llm.engine.loaded.weight_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights, peak = map(int, proc.stdout.split()[-2:])
    cfg = ModelConfig.from_hf_dict(MEDIUM)
    float32 = cfg.num_parameters() * 4
    assert weights == pytest.approx(estimate_weight_bytes(cfg, torch.bfloat16, LinearFormat("int4", 128)), rel=0.02)
    assert peak < 0.6 * float32  # never the whole model in a wider dtype (process baseline included)
