"""Jiutian has no class in transformers: check pagoda against an independent,
from-the-formula reference of shared/JIUTIAN.md, and check its norm really differs."""

from __future__ import annotations

import torch

from pagoda import ops
from pagoda.models.config import ModelConfig
from pagoda.models.llama import LlamaForCausalLM
from tests.jiutian_utils import jiutian_reference, jiutian_weights
from tests.model_utils import DEVICE, incremental_logits, make_runner, prefill_logits

CFG = {
    "architectures": ["JiutianForCausalLM"], "model_type": "jiutian", "vocab_size": 100, "hidden_size": 48,
    "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
    "qkv_bias": True, "tie_word_embeddings": False, "eos_token_id": 99,
}


def _model(cfg: dict, w: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(cfg), torch.float32, DEVICE)
    model.load_weights(w.items())
    return model


def test_jiutian_config_flags() -> None:
    mc = ModelConfig.from_hf_dict({**CFG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert mc.norm_variant == "jiutian" and mc.qkv_bias and not mc.tie_word_embeddings
    assert mc.rope_scaling is None  # Jiutian's configuration class forces it off


def test_jiutian_matches_independent_reference() -> None:
    w = jiutian_weights(CFG)
    runner = make_runner(_model(CFG, w))
    ids = [5, 17, 42, 3, 99, 0, 64, 31, 8, 77, 12]
    ref = jiutian_reference(CFG, w, ids)
    assert (prefill_logits(runner, ids) - ref).abs().max().item() <= 1e-4
    assert (incremental_logits(runner, ids, 1) - ref).abs().max().item() <= 1e-4


def test_jiutian_norm_differs_from_llama_for_tiny_activations() -> None:
    x = torch.full((1, 64), 1e-3)
    w = torch.ones(64)
    llama = ops.rms_norm(x, w, 1e-6, "llama")
    jiutian = ops.rms_norm(x, w, 1e-6, "jiutian")
    assert torch.allclose(llama, x / (1e-6 + 1e-6) ** 0.5, rtol=1e-5)
    assert torch.allclose(jiutian, x / (1e-3 + 1e-6), rtol=1e-5)
    assert (llama - jiutian).abs().max() > 1e-3
    big = torch.randn(1, 64) * 10  # for ordinary activations the two agree closely
    assert torch.allclose(ops.rms_norm(big, w, 1e-6, "llama"), ops.rms_norm(big, w, 1e-6, "jiutian"), atol=1e-5)
