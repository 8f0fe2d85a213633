"""Jiutian has no class in transformers: check pagoda against an independent,
from-the-formula reference of shared/JIUTIAN.md, and check its norm really differs."""

from __future__ import annotations

import torch

from pagoda import ops
from pagoda.models.config import ModelConfig
from pagoda.models.llama import LlamaForCausalLM
from tests.model_utils import incremental_logits, make_runner, prefill_logits

CFG = {
    "architectures": ["JiutianForCausalLM"], "model_type": "jiutian", "vocab_size": 100, "hidden_size": 48,
    "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
    "qkv_bias": True, "tie_word_embeddings": False, "eos_token_id": 99,
}


def _weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    w = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "lm_head.weight": torch.randn(v, h, generator=g) * 0.1,
         "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,), "self_attn.k_proj.weight": (kv, h),
                  "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
                  "mlp.down_proj.weight": (h, i)}
        for name, shape in shapes.items():
            w[p + name] = torch.randn(*shape, generator=g) * 0.1
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return w


def _jiutian_reference(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Straight from JIUTIAN.md: pre-norm block, rms + eps outside the root, rotate-half rope."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, t = h // nh, cfg["rms_norm_eps"], len(ids)

    def norm(x, weight):
        rms = x.norm(dim=-1, keepdim=True) / (x.shape[-1] ** 0.5)
        return weight * (x / (rms + eps))

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2).double() / d))
    ang = torch.outer(torch.arange(t).double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):  # [heads, t, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = norm(x, w[p + "input_layernorm.weight"])
        q = (a @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(t, nh, d).transpose(0, 1)
        k = (a @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(t, nkv, d).transpose(0, 1)
        v = (a @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(t, nkv, d).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        s = (q @ k.transpose(1, 2)) * d**-0.5 + torch.triu(torch.full((t, t), float("-inf")), 1)
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(t, h)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _model(cfg: dict, w: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(cfg), torch.float32, torch.device("cpu"))
    model.load_weights(w.items())
    return model


def test_jiutian_config_flags() -> None:
    mc = ModelConfig.from_hf_dict({**CFG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert mc.norm_variant == "jiutian" and mc.qkv_bias and not mc.tie_word_embeddings
    assert mc.rope_scaling is None  # Jiutian's configuration class forces it off


def test_jiutian_matches_independent_reference() -> None:
    w = _weights(CFG)
    runner = make_runner(_model(CFG, w))
    ids = [5, 17, 42, 3, 99, 0, 64, 31, 8, 77, 12]
    ref = _jiutian_reference(CFG, w, ids)
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
