"""decoder_layers: the CPU kernel (a decode step's layer stack in one C call) against the
model's own per-op path, bit for bit, including what each leaves in the KV cache."""

from __future__ import annotations

import pytest
import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.models.config import ModelConfig
from pagoda.models.layers import LinearFormat
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import _fill_dummy
from pagoda.ops import OPS, AttentionMetadata
from pagoda.ops.cpu_decoder import decoder_layers_c
from pagoda.ops.registry import DECLINE
from tests.unit.test_quant import needs_c_quant

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
)
PAGE = 4


def _model(arch: str, quantization: str | None) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf_dict(dict(BASE, architectures=[arch]))
    model = LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"), quantization=quantization and LinearFormat(quantization))
    _fill_dummy(model, seed=1)
    if arch == "JiutianForCausalLM":  # random norms and biases, so neither can be skipped unseen
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.data.uniform_(0.5, 1.5)
            layer.self_attn.qkv_proj.bias.data.normal_(0, 0.5)
    return model.eval()


def _decode_inputs(model: LlamaForCausalLM, context_lens: list[int], kv_dtype=torch.bfloat16):
    """One decode token per sequence, each after a context already in its (scattered) pages."""
    cfg = model.config
    kv = KVPool(cfg.num_hidden_layers, 64, PAGE, cfg.num_key_value_heads, cfg.head_dim, kv_dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for cache in kv.k + kv.v:
        cache[PAGE:].copy_(torch.randn(cache[PAGE:].shape, generator=g))
    pages, slots, next_page = [], [], 60
    for length in context_lens:  # pages from the top down, not in order
        own = [next_page - i for i in range(length // PAGE + 1)]
        next_page -= len(own)
        pages.append(own)
        slots.append(own[length // PAGE] * PAGE + length % PAGE)
    table = torch.zeros(len(pages), max(map(len, pages)), dtype=torch.long)
    for b, own in enumerate(pages):
        table[b, : len(own)] = torch.tensor(own)
    meta = AttentionMetadata([1] * len(context_lens), [n + 1 for n in context_lens], torch.tensor(slots), table, PAGE)
    positions = torch.tensor(context_lens)
    x = model.embed_tokens[torch.randint(0, cfg.vocab_size, (len(context_lens),), generator=g)]
    return x, (model.rope_cos[positions], model.rope_sin[positions]), meta, kv


def _clone_kv(kv: KVPool) -> KVPool:
    copy = object.__new__(KVPool)
    copy.__dict__.update(kv.__dict__, k=[t.clone() for t in kv.k], v=[t.clone() for t in kv.v])
    return copy


@needs_c_quant
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "JiutianForCausalLM"])
@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("context_lens", [[5], [0, 13, 7, 30, 2, 9, 21, 16, 3]])
def test_stack_matches_the_per_op_path_bit_for_bit(arch, quantization, context_lens):
    model = _model(arch, quantization)
    x, rope, meta, kv = _decode_inputs(model, context_lens)
    kv_ref = _clone_kv(kv)
    got = decoder_layers_c(model.layers, x, rope, meta, kv)
    assert got is not DECLINE
    want = OPS["decoder_layers"].reference(model.layers, x, rope, meta, kv_ref)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        assert torch.equal(a, b)  # same keys and values stored, in the same slots


@needs_c_quant
def test_stack_serves_float32_caches_and_leaves_its_input_alone():
    model = _model("LlamaForCausalLM", "int4")
    x, rope, meta, kv = _decode_inputs(model, [3, 11], kv_dtype=torch.float32)
    before = x.clone()
    kv_ref = _clone_kv(kv)
    got = decoder_layers_c(model.layers, x, rope, meta, kv)
    want = OPS["decoder_layers"].reference(model.layers, x, rope, meta, kv_ref)
    assert torch.equal(x, before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_stack_declines_prefill_and_unquantized_models():
    model = _model("LlamaForCausalLM", "int4")
    x, rope, meta, kv = _decode_inputs(model, [3, 11])
    prefill = AttentionMetadata([2], [2], torch.tensor([4, 5]), torch.tensor([[1]]), PAGE)
    assert decoder_layers_c(model.layers, torch.cat([x, x]), rope, prefill, kv) is DECLINE
    dense = _model("LlamaForCausalLM", None)
    assert decoder_layers_c(dense.layers, x, rope, meta, kv) is DECLINE
