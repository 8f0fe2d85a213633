"""The default model's GGUF: its config and its dequantized, un-permuted weights against transformers."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import pytest
import torch

from pagoda.errors import ModelLoadError
from pagoda.models.config import ModelConfig
from pagoda.weights.checkpoint import load_checkpoint
from pagoda.weights.default_model import default_model_path
from pagoda.weights.gguf import GGUFCheckpoint


@pytest.fixture(scope="module")
def ckpt() -> GGUFCheckpoint:
    try:
        path = default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    loaded = load_checkpoint(path)
    assert isinstance(loaded, GGUFCheckpoint)
    return loaded


def test_smollm2_config(ckpt: GGUFCheckpoint) -> None:
    cfg = ckpt.hf_config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg.get(k) for k in expected} == expected
    mc = ModelConfig.from_hf_dict(cfg)
    assert mc.num_parameters() == 134_515_008  # SmolLM2-135M, embeddings counted once (tied)


def test_smollm2_tensor_inventory(ckpt: GGUFCheckpoint) -> None:
    names = ckpt.tensor_names()
    assert len(names) == 2 + 9 * 30  # embed + final norm + 9 per layer; no lm_head (tied)
    assert "lm_head.weight" not in names
    assert ckpt.quant_types["model.embed_tokens.weight"] == "Q8_0"
    assert ckpt.quant_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert ckpt.quant_types["model.norm.weight"] == "F32"


@pytest.fixture(scope="module")
def hf_state_dict(ckpt: GGUFCheckpoint) -> Iterator[dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt.path.parent, gguf_file=ckpt.path.name, dtype=torch.float32
    )
    yield model.state_dict()
    del model


@pytest.mark.slow
def test_smollm2_weights_match_transformers(ckpt: GGUFCheckpoint, hf_state_dict: dict[str, torch.Tensor]) -> None:
    assert set(hf_state_dict) - set(ckpt.tensor_names()) == {"lm_head.weight"}  # tied to embed_tokens
    checked = 0
    for name, got in ckpt.tensors():
        want = hf_state_dict[name]
        assert got.shape == want.shape and got.dtype == torch.float32, name
        diff = (got - want).abs().max().item()  # torch.testing.assert_close is ~100x slower here
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"
        checked += 1
    assert checked == len(ckpt.tensor_names())
    # The comparison is not vacuous: the raw GGUF row order differs from what both loaders produce.
    raw = next(t for t in ckpt.reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
    assert not torch.allclose(stored, hf_state_dict["model.layers.0.self_attn.q_proj.weight"])


def test_lazy_parts_equal_slices_of_the_whole_tensor() -> None:
    """A tensor-parallel rank reads rows, or columns on block boundaries, of a GGUF tensor:
    the same values as cutting the whole dequantized (and Q/K un-permuted) tensor."""
    from pagoda.weights.checkpoint import load_checkpoint
    from pagoda.weights.default_model import default_model_path

    ckpt = load_checkpoint(default_model_path())
    wanted = {
        "model.layers.0.self_attn.q_proj.weight": (slice(192, 384), slice(None)),  # heads 3-5 of 9
        "model.layers.0.self_attn.k_proj.weight": (slice(64, 128), slice(None)),  # KV head 1 of 3
        "model.layers.0.mlp.down_proj.weight": (slice(None), slice(512, 1024)),  # Q4_1 blocks 16-31
        "model.layers.0.self_attn.o_proj.weight": (slice(None), slice(200, 300)),  # not on blocks
        "model.embed_tokens.weight": (slice(16384, 32768), slice(None)),  # Q8_0 rows
        "model.layers.0.input_layernorm.weight": (slice(0, 576), slice(None)),
    }
    lazy = dict(ckpt.tensors(lazy=True))
    full = {name: t for name, t in ckpt.tensors() if name in wanted}
    for name, (rows, cols) in wanted.items():
        part = lazy[name]
        assert part.get_shape() == list(full[name].shape)
        got = part[rows] if full[name].dim() == 1 else part[rows, cols]
        expected = full[name][rows] if full[name].dim() == 1 else full[name][rows, cols]
        assert torch.equal(got, expected), name
