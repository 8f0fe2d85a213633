"""decoder_layers: the CPU kernel (a step's layer stack in one C call) against the model's
own per-op path: bit for bit on decode tokens, including what each leaves in the KV cache."""

from __future__ import annotations

import pytest
import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.models.config import ModelConfig
from pagoda.models.layers import LinearFormat
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import _fill_dummy
from pagoda.ops import OPS, AttentionMetadata
from pagoda.ops.cpu_decoder import MAX_CHUNK, decoder_layers_c
from pagoda.ops.kv_quant import quantize_rows
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
        rows = torch.randn(cache.shape[0] - PAGE, cfg.num_key_value_heads, cfg.head_dim, generator=g)
        cache[PAGE:].copy_(quantize_rows(rows) if kv_dtype == torch.int8 else rows)
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
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_stack_serves_float32_and_int8_caches_and_leaves_its_input_alone(kv_dtype):
    model = _model("LlamaForCausalLM", "int4")
    x, rope, meta, kv = _decode_inputs(model, [3, 11], kv_dtype=kv_dtype)
    before = x.clone()
    kv_ref = _clone_kv(kv)
    got = decoder_layers_c(model.layers, x, rope, meta, kv)
    want = OPS["decoder_layers"].reference(model.layers, x, rope, meta, kv_ref)
    assert torch.equal(x, before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        assert torch.equal(a, b)


def test_stack_declines_long_prompt_chunks_and_unquantized_models():
    model = _model("LlamaForCausalLM", "int4")
    x, rope, meta, kv = _decode_inputs(model, [3, 11])
    n = MAX_CHUNK + 1
    long_chunk = AttentionMetadata([n], [n], torch.arange(PAGE, PAGE + n), torch.arange(1, n // PAGE + 2)[None], PAGE)
    pos = torch.arange(n)
    long_rope = (model.rope_cos[pos], model.rope_sin[pos])
    assert decoder_layers_c(model.layers, model.embed_tokens[pos % 90], long_rope, long_chunk, kv) is DECLINE
    dense = _model("LlamaForCausalLM", None)
    assert decoder_layers_c(dense.layers, x, rope, meta, kv) is DECLINE


def _mixed_inputs(model: LlamaForCausalLM, decode_lens: list[int], chunks: list[tuple[int, int]]):
    """Decode tokens plus prompt chunks (start, length), each sequence in its own pages; the
    float32 cache keeps the per-op path's prefill attention in float32 too."""
    cfg = model.config
    kv = KVPool(cfg.num_hidden_layers, 128, PAGE, cfg.num_key_value_heads, cfg.head_dim, torch.float32,
                torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for cache in kv.k + kv.v:
        cache[PAGE:].copy_(torch.randn(cache[PAGE:].shape, generator=g))
    query_lens = [1] * len(decode_lens) + [n for _, n in chunks]
    starts = decode_lens + [s for s, _ in chunks]
    pages, slots, positions, next_page = [], [], [], 1
    for start, q in zip(starts, query_lens):
        own = list(range(next_page, next_page + (start + q) // PAGE + 1))
        next_page += len(own)
        pages.append(own)
        for pos in range(start, start + q):
            slots.append(own[pos // PAGE] * PAGE + pos % PAGE)
            positions.append(pos)
    table = torch.zeros(len(pages), max(map(len, pages)), dtype=torch.long)
    for b, own in enumerate(pages):
        table[b, : len(own)] = torch.tensor(own)
    seq_lens = [s + q for s, q in zip(starts, query_lens)]
    meta = AttentionMetadata(query_lens, seq_lens, torch.tensor(slots), table, PAGE)
    pos = torch.tensor(positions)
    x = model.embed_tokens[torch.randint(0, cfg.vocab_size, (len(positions),), generator=g)]
    return x, (model.rope_cos[pos], model.rope_sin[pos]), meta, kv


@needs_c_quant
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_short_prompt_chunks_ride_along(quantization):
    """Decodes beside a fresh prompt and a later chunk of another: the chunks' attention is the
    decode kernel's, row by row, so this matches the per-op path (SDPA) to float32 rounding."""
    model = _model("Qwen2ForCausalLM", quantization)
    x, rope, meta, kv = _mixed_inputs(model, [7, 30], [(0, 19), (12, 9)])
    kv_ref = _clone_kv(kv)
    got = decoder_layers_c(model.layers, x, rope, meta, kv)
    assert got is not DECLINE
    want = OPS["decoder_layers"].reference(model.layers, x, rope, meta, kv_ref)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
