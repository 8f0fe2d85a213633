"""Weight loaders on tiny checkpoints built here: HF safetensors dirs and llama.cpp-style GGUFs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pagoda.errors import ModelLoadError
from pagoda.models.config import ModelConfig
from pagoda.weights.checkpoint import Checkpoint, load_checkpoint
from pagoda.weights.gguf import GGUFCheckpoint, hf_tensor_name, unpermute_qk
from pagoda.weights.safetensors import SafetensorsCheckpoint

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 64, 4, 2, 128, 2, 96
HEAD_DIM = HIDDEN // HEADS

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def hf_state_dict(seed: int = 0, bias: bool = False, tied: bool = True) -> dict[str, torch.Tensor]:
    """Random float32 tensors under HF llama names and shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (HIDDEN,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


# ---------------------------------------------------------------- safetensors


def write_hf_dir(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(HF_CONFIG))
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(root / file))
        weight_map |= dict.fromkeys(part, file)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def mixed_dtype_tensors() -> dict[str, torch.Tensor]:
    sd = hf_state_dict(tied=False)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].to(torch.bfloat16)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float16)
    return sd


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_round_trip(tmp_path: Path, shards: int) -> None:
    sd = mixed_dtype_tensors()
    ckpt = load_checkpoint(write_hf_dir(tmp_path / "m", sd, shards))
    assert isinstance(ckpt, SafetensorsCheckpoint) and isinstance(ckpt, Checkpoint)
    assert ckpt.hf_config == HF_CONFIG
    assert sorted(ckpt.tensor_names()) == sorted(sd)
    stream = ckpt.tensors()
    assert inspect.isgenerator(stream)  # streamed, not a dict of everything
    got = list(stream)
    assert [n for n, _ in got] == ckpt.tensor_names()
    for name, t in got:
        assert t.dtype == sd[name].dtype, name  # stored dtype kept
        assert t.device.type == "cpu"
        assert torch.equal(t, sd[name]), name


def test_path_as_string(tmp_path: Path) -> None:
    root = write_hf_dir(tmp_path / "m", hf_state_dict())
    assert load_checkpoint(str(root)).path == root


# ---------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to llama q/k rows (weights and biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.<weight|bias>
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


Q8 = gguf.GGMLQuantizationType.Q8_0
QUANTIZED = ("k_proj.weight", "gate_proj.weight", "down_proj.weight", "lm_head.weight")


def write_gguf(
    path: Path,
    sd: dict[str, torch.Tensor],
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
    tokens: bool = False,
    rope_scaling: bool = False,
    eot: int | None = None,
) -> Path:
    """A GGUF the way llama.cpp writes one: permuted q/k (llama only), some tensors Q8_0."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    if tokens:
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
    else:
        w.add_vocab_size(VOCAB)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if eot is not None:
        w.add_eot_token_id(eot)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
    for hf, t in sd.items():
        a = t.numpy()
        if arch == "llama" and ".q_proj." in hf:
            a = llama_cpp_permute(a, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            a = llama_cpp_permute(a, KV_HEADS)
        if hf.endswith(QUANTIZED):
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(a, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(gguf_name(hf), np.ascontiguousarray(a))
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q8_tolerance(t: torch.Tensor) -> float:
    """Q8_0 rounds to amax/127 steps per 32-value block: half a step, plus float16 scale error."""
    return float(t.abs().max()) / 127 * 0.6


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_llama_round_trip(tmp_path: Path, tied: bool) -> None:
    sd = hf_state_dict(tied=tied)
    ckpt = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", sd))
    assert isinstance(ckpt, GGUFCheckpoint) and isinstance(ckpt, Checkpoint)
    assert sorted(ckpt.tensor_names()) == sorted(sd)
    assert ("lm_head.weight" in ckpt.tensor_names()) is not tied
    seen = set()
    for name, t in ckpt.tensors():
        seen.add(name)
        assert t.dtype == torch.float32 and t.shape == sd[name].shape, name
        if name.endswith(QUANTIZED):
            assert ckpt.quant_types[name] == "Q8_0"
            torch.testing.assert_close(t, sd[name], rtol=0, atol=q8_tolerance(sd[name]))
        else:
            assert ckpt.quant_types[name] == "F32"
            assert torch.equal(t, sd[name]), name  # exact: q_proj un-permuted bit for bit
    assert seen == set(sd)

    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is tied
    mc = ModelConfig.from_hf_dict(cfg)
    assert (mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    heads = (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, mc.vocab_size)
    assert heads == (HEADS, KV_HEADS, HEAD_DIM, VOCAB)
    assert (mc.rope_theta, mc.rms_norm_eps, mc.max_position_embeddings) == (500000.0, 1e-5, 4096)
    assert (mc.bos_token_id, mc.eos_token_id, mc.qkv_bias, mc.rope_scaling) == (1, [2], False, None)


def test_gguf_quantized_k_is_unpermuted(tmp_path: Path) -> None:
    """The Q8_0 k_proj must be un-permuted too: without it the error is O(1), far above Q8_0 noise."""
    sd = hf_state_dict()
    ckpt = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", sd))
    got = dict(ckpt.tensors())["model.layers.1.self_attn.k_proj.weight"]
    want = sd["model.layers.1.self_attn.k_proj.weight"]
    assert (got - want).abs().max() < q8_tolerance(want)
    assert (got - torch.from_numpy(llama_cpp_permute(want.numpy(), KV_HEADS))).abs().max() > 10 * q8_tolerance(want)


def test_gguf_qwen2_keeps_rows_and_maps_biases(tmp_path: Path) -> None:
    sd = hf_state_dict(bias=True)
    ckpt = load_checkpoint(write_gguf(tmp_path / "qwen.gguf", sd, arch="qwen2"))
    assert ckpt.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert ModelConfig.from_hf_dict(ckpt.hf_config).qkv_bias
    got = dict(ckpt.tensors())
    assert sorted(got) == sorted(sd)
    names = ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.bias", "layers.1.self_attn.k_proj.bias")
    for name in (f"model.{n}" for n in names):
        assert torch.equal(got[name], sd[name]), name  # qwen2 is stored unpermuted


def test_gguf_llama_biases_are_unpermuted(tmp_path: Path) -> None:
    sd = hf_state_dict(bias=True)
    ckpt = load_checkpoint(write_gguf(tmp_path / "b.gguf", sd))
    got = dict(ckpt.tensors())
    assert ckpt.hf_config["attention_bias"] is True
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"):
        assert torch.equal(got[name], sd[name]), name


def test_gguf_vocab_from_tokens_and_rope_scaling(tmp_path: Path) -> None:
    ckpt = load_checkpoint(write_gguf(tmp_path / "t.gguf", hf_state_dict(), tokens=True, rope_scaling=True))
    assert ckpt.hf_config["vocab_size"] == VOCAB
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert ModelConfig.from_hf_dict(ckpt.hf_config).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_gguf_end_of_turn_tokens_join_eos(tmp_path: Path) -> None:
    ckpt = load_checkpoint(write_gguf(tmp_path / "e.gguf", hf_state_dict(), eot=7))
    assert ckpt.hf_config["eos_token_id"] == [2, 7]
    assert ModelConfig.from_hf_dict(ckpt.hf_config).eos_token_id == [2, 7]


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    b = np.arange(32, dtype=np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(b, 2), 2), b)


def test_hf_tensor_name() -> None:
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.ffn_gate_exps.weight") is None


# ---------------------------------------------------------------- errors


def expect_error(path: Path | str, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_missing_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "does not exist", "nope")


def test_dir_without_config(tmp_path: Path) -> None:
    expect_error(tmp_path, "no config.json")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    expect_error(tmp_path, "no config.json", "m.gguf")


def test_dir_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    expect_error(tmp_path, "no *.safetensors")


def test_invalid_config_json(tmp_path: Path) -> None:
    root = write_hf_dir(tmp_path / "m", hf_state_dict())
    (root / "config.json").write_text("{not json")
    expect_error(root, "config.json", "not valid JSON")


def test_index_names_missing_shard(tmp_path: Path) -> None:
    root = write_hf_dir(tmp_path / "m", hf_state_dict(), shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    expect_error(root, "model-00002-of-00002.safetensors", "missing")


def test_corrupt_safetensors(tmp_path: Path) -> None:
    root = write_hf_dir(tmp_path / "m", hf_state_dict())
    (root / "model.safetensors").write_bytes(b"\x00" * 16)
    expect_error(root, "model.safetensors", "not a readable safetensors file")


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    expect_error(bogus, "model.gguf", "not a GGUF file")


def test_truncated_gguf(tmp_path: Path) -> None:
    full = write_gguf(tmp_path / "full.gguf", hf_state_dict()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:200])
    expect_error(cut, "cut.gguf", "damaged GGUF")


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    expect_error(write_gguf(tmp_path / "g.gguf", hf_state_dict(), arch="gpt2"), "'gpt2'", "not supported")


def test_unsupported_gguf_tensor_type(tmp_path: Path) -> None:
    sd = hf_state_dict()
    sd.pop("model.norm.weight")
    path = write_gguf(tmp_path / "i.gguf", sd, extra={"output_norm.weight": np.ones(HIDDEN, dtype=np.int32)})
    expect_error(path, "output_norm.weight", "I32", "cannot dequantize")


def test_unknown_gguf_tensor(tmp_path: Path) -> None:
    rope_freqs = {"rope_freqs.weight": np.ones(HEAD_DIM // 2, dtype=np.float32)}
    path = write_gguf(tmp_path / "r.gguf", hf_state_dict(), extra=rope_freqs)
    expect_error(path, "rope_freqs.weight", "not supported")
