"""Logit parity with Hugging Face transformers on tiny random-weight models (float32).

Tolerance: max |pagoda - transformers| <= 2e-5 on logits of magnitude ~1, i.e. float32
rounding of a few reordered reductions (the fused QKV matmul, SDPA vs explicit softmax).
"""

from __future__ import annotations

import pytest
import torch

from pagoda.models.config import ModelConfig
from pagoda.models.llama import LlamaForCausalLM
from tests.model_utils import DEVICE, TINY, incremental_logits, make_runner, prefill_logits

transformers = pytest.importorskip("transformers")

ATOL = 2e-5

CASES = {
    "llama": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(TINY, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(TINY, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
}


def _pair(name: str, page_size: int = 4):
    cls, kwargs = CASES[name]
    torch.manual_seed(0)
    hf_cfg = cls(**kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases, so a dropped weight cannot hide
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("weight") else 0.0))
    ours = LlamaForCausalLM(ModelConfig.from_hf_dict(hf_cfg.to_dict()), torch.float32, DEVICE)
    ours.load_weights(hf.state_dict().items())
    return hf, make_runner(ours, page_size=page_size)


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("length", [1, 7, 33])
def test_prefill_matches_transformers(name: str, length: int) -> None:
    hf, runner = _pair(name)
    ids = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    ref = _hf_logits(hf, ids)
    got = prefill_logits(runner, ids)
    assert (got - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk,page_size", [(1, 1), (1, 4), (5, 4), (16, 16)])
def test_cached_decode_matches_transformers(name: str, chunk: int, page_size: int) -> None:
    hf, runner = _pair(name, page_size)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = _hf_logits(hf, ids)
    got = incremental_logits(runner, ids, chunk)
    assert (got - ref).abs().max().item() <= ATOL


def test_batch_of_mixed_prefill_and_decode_matches_single_runs() -> None:
    hf, runner = _pair("qwen2")
    a = list(range(3, 30))
    b = list(range(50, 60))
    ref_a, ref_b = _hf_logits(hf, a), _hf_logits(hf, b)
    # b's first 9 tokens are cached in pages 20.., then b decodes while a prefills.
    runner.forward(runner.prepare([(b[:9], 0, [20, 21, 22])]))
    out = runner.forward(runner.prepare([(a, 0, [1, 2, 3, 4, 5, 6, 7]), (b[9:], 9, [20, 21, 22])]))
    got = out.last_logits.cpu()
    assert (got[0] - ref_a[-1]).abs().max().item() <= ATOL
    assert (got[1] - ref_b[-1]).abs().max().item() <= ATOL


def test_config_mismatch_is_a_clear_error() -> None:
    from pagoda.errors import ModelLoadError

    hf, _ = _pair("llama")
    cfg = ModelConfig.from_hf_dict(dict(TINY, architectures=["LlamaForCausalLM"], intermediate_size=80))
    ours = LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not match"):
        ours.load_weights(hf.state_dict().items())
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    ours = LlamaForCausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()), torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="lack .*layers.1.mlp.up_proj"):
        ours.load_weights(state.items())
