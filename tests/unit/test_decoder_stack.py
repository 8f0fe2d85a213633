"""decoder_stack: the CPU kernel (a step's layer stack in one C call, reading the model's
DecoderStackSpec) against the model's own per-op path: bit for bit on decode tokens,
including what each leaves in the KV cache."""

from __future__ import annotations

import pytest
import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.models.config import ModelConfig
from pagoda.models.layers import LinearFormat
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import _fill_dummy
from pagoda.ops import ForwardBatch
from pagoda.ops.cpu.decoder_stack import MAX_CHUNK, _plan, decoder_stack_c
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
    pages = max(64, sum(length // PAGE + 1 for length in context_lens) + 4)  # page 0 stays the pool's null page
    kv = KVPool(cfg.num_hidden_layers, pages, PAGE, cfg.num_key_value_heads, cfg.head_dim, kv_dtype,
                torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for cache in kv.k + kv.v:
        rows = torch.randn(cache.shape[0] - PAGE, cfg.num_key_value_heads, cfg.head_dim, generator=g)
        cache[PAGE:].copy_(quantize_rows(rows) if kv_dtype == torch.int8 else rows)
    seqs, next_page = [], pages - 4
    ids = torch.randint(0, cfg.vocab_size, (len(context_lens),), generator=g).tolist()
    for token, length in zip(ids, context_lens):  # pages from the top down, not in order
        own = [next_page - i for i in range(length // PAGE + 1)]
        next_page -= len(own)
        seqs.append(([token], length, own))
    return _inputs(model, seqs, kv)


def _inputs(model: LlamaForCausalLM, seqs, kv: KVPool):
    """The embeddings of the new tokens, the step's batch over `kv`, and a twin batch over a
    copy of `kv` for the reference path."""
    batch = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), kv.layers)
    kv_ref = _clone_kv(kv)
    twin = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), kv_ref.layers)
    return model.embed_tokens[batch.input_ids], batch, kv, twin, kv_ref


def _clone_kv(kv: KVPool) -> KVPool:
    copy = object.__new__(KVPool)
    k, v = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    copy.__dict__.update(kv.__dict__, k=k, v=v, layers=tuple(zip(k, v)))
    return copy


@needs_c_quant
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "JiutianForCausalLM"])
@pytest.mark.parametrize("quantization", ["int4", "int8"])
# 20 sequences (43 of the pool's 60 free pages): past 16 rows the matmuls take the rounded AMX
# form, where gate/up and silu are one pass
@pytest.mark.parametrize("context_lens", [[5], [0, 13, 7, 30, 2, 9, 21, 16, 3], [1 + (5 * i) % 11 for i in range(20)]])
def test_stack_matches_the_per_op_path_bit_for_bit(arch, quantization, context_lens):
    model = _model(arch, quantization)
    x, batch, kv, twin, kv_ref = _decode_inputs(model, context_lens)
    got = decoder_stack_c(model.stack_spec, x, batch)
    assert got is not DECLINE
    want = model.run_layers(x, twin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        assert torch.equal(a, b)  # same keys and values stored, in the same slots


@needs_c_quant
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_stack_serves_float32_and_int8_caches_and_leaves_its_input_alone(kv_dtype):
    model = _model("LlamaForCausalLM", "int4")
    x, batch, kv, twin, kv_ref = _decode_inputs(model, [3, 11], kv_dtype=kv_dtype)
    before = x.clone()
    got = decoder_stack_c(model.stack_spec, x, batch)
    want = model.run_layers(x, twin)
    assert torch.equal(x, before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        assert torch.equal(a, b)


def test_stack_declines_long_prompt_chunks_and_unquantized_models():
    """Past MAX_CHUNK tokens where the chunk kernel does not attend for them (head_dim 16 here:
    each token would be a decode-kernel row), and unquantized models."""
    model = _model("LlamaForCausalLM", "int4")
    assert not _plan(model.stack_spec, _decode_inputs(model, [3])[2].layers).long_chunks
    x, batch, kv, _, _ = _decode_inputs(model, [3, 11])
    n = MAX_CHUNK + 1
    long_chunk = ForwardBatch.build([([t % 90 for t in range(n)], 0, list(range(1, n // PAGE + 2)))], PAGE,
                                    torch.device("cpu"), kv.layers)
    assert decoder_stack_c(model.stack_spec, model.embed_tokens[long_chunk.input_ids], long_chunk) is DECLINE
    dense = _model("LlamaForCausalLM", None)
    assert decoder_stack_c(dense.stack_spec, x, batch) is DECLINE


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
    seqs, next_page = [], 1
    ids = torch.randint(0, cfg.vocab_size, (sum(query_lens),), generator=g).tolist()
    for start, q in zip(starts, query_lens):
        own = list(range(next_page, next_page + (start + q) // PAGE + 1))
        next_page += len(own)
        seqs.append((ids[:q], start, own))
        ids = ids[q:]
    return _inputs(model, seqs, kv)


@needs_c_quant
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_short_prompt_chunks_ride_along(quantization):
    """Decodes beside a fresh prompt and a later chunk of another: the chunks' attention is the
    decode kernel's, row by row, so this matches the per-op path (SDPA) to float32 rounding."""
    model = _model("Qwen2ForCausalLM", quantization)
    x, batch, kv, twin, kv_ref = _mixed_inputs(model, [7, 30], [(0, 19), (12, 9)])
    got = decoder_stack_c(model.stack_spec, x, batch)
    assert got is not DECLINE
    want = model.run_layers(x, twin)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _with_adapters(model: LlamaForCausalLM, ranks: list[int]) -> None:
    """Random adapters in pool slots 0.. (every projection; fused A and block-diagonal B)."""
    model.enable_lora(len(ranks), max(ranks))
    g = torch.Generator().manual_seed(3)
    for slot, rank in enumerate(ranks):
        weights = {}
        for path, parts in (("self_attn.qkv_proj", 3), ("self_attn.o_proj", 1), ("mlp.gate_up_proj", 2),
                            ("mlp.down_proj", 1)):
            for i, layer in enumerate(model.layers):
                linear = layer.get_submodule(path)
                w = parts * rank
                weights[f"layers.{i}.{path}"] = (torch.randn(w, linear.in_features, generator=g) * 0.3,
                                                 torch.randn(linear.out_features, w, generator=g) * 0.3)
        model.set_lora(slot, weights, 0.5)


@needs_c_quant
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_stack_with_lora_adapters_matches_the_per_op_path(quantization):
    """Decodes of three adapters and the base model in one step: the stack adds each linear's
    adapters as the per-op path's lora_apply does, bit for bit; the adapters change the result."""
    model = _model("Qwen2ForCausalLM", quantization)
    _with_adapters(model, [2, 8, 4])
    cfg = model.config
    kv = KVPool(cfg.num_hidden_layers, 64, PAGE, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16,
                torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for cache in kv.k + kv.v:
        cache.copy_(torch.randn(cache.shape, generator=g))
    lens, slots = [5, 13, 7, 30, 2, 9], [0, 0, -1, 2, 1, 1]
    seqs = [([i + 3], n, list(range(1 + 9 * i, 10 + 9 * i))) for i, n in enumerate(lens)]
    batch = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), kv.layers, lora_slots=slots)
    kv_ref = _clone_kv(kv)
    twin = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), kv_ref.layers, lora_slots=slots)
    x = model.embed_tokens[batch.input_ids]
    got = decoder_stack_c(model.stack_spec, x, batch)
    assert got is not DECLINE
    want = model.run_layers(x, twin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    plain = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), _clone_kv(kv).layers)
    base = decoder_stack_c(model.stack_spec, x, plain)
    assert torch.equal(base[0][2], got[0][2]) and not torch.equal(base[0][0], got[0][0])
