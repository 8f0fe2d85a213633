"""CPU kernel of decoder_stack: a step's whole layer stack in one C call
(csrc/decode_stack.c), for models whose linears all sit in the C quantized tiles.

The C side calls the very kernels the per-op path dispatches to, in the same order, so
for decode tokens the two agree bit for bit; what goes away is ~270 returns to Python per
step, which at one sequence cost about as much as the arithmetic (and slow the kernels
after them). Short prompt chunks ride along (mixed steps are the rule under load), their
attention the AMX chunk kernel's where it serves, as on the per-op path; speculative
verification chunks are rows of the decode kernel, exact as decoding. Long chunks, and models
it does not cover, are declined (the model runs them op by op). It reads
the model only through its DecoderStackSpec (pagoda/ops/decoder_stack.py). Steps with LoRA
adapters stay in it: each linear's adapters are added right after its matmul by the C
kernel the per-op path's lora_apply calls (csrc/lora.c), so the two paths agree as before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from pagoda.ops.cpu import native
from pagoda.ops.cpu.attention import chunk_rows, decode_rows, token_rows
from pagoda.ops.cpu.linear import Int4Tiles, Int8Tiles
from pagoda.ops.cpu.lora import MAX_WIDTH as LORA_MAX_WIDTH
from pagoda.ops.cpu.native import KV_KIND, STACK_LAYER_SLOTS, STACK_LORA_SLOTS
from pagoda.ops.decoder_stack import DecoderStackSpec
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.lora import lora_segment_table
from pagoda.ops.registry import DECLINE, kernel

# Prompt chunks up to this long ride along in the C stack where each of their tokens would be a
# decode-kernel row; longer ones take the per-op path. Where the chunk kernel attends for them,
# chunks of any length do (StackPlan.long_chunks).
MAX_CHUNK = 256
_BITS = {Int4Tiles: 4, Int8Tiles: 8}


@dataclass(frozen=True)
class StackPlan:
    """What the C call needs of a stack and its KV caches, gathered once: per layer,
    STACK_LAYER_SLOTS addresses (the four linears' tiles, 3 slots each; two norms; the QKV
    bias; k and v)."""

    table: torch.Tensor  # [layers * STACK_LAYER_SLOTS] int64 addresses
    bits: int
    kv_kind: int
    long_chunks: bool  # the C chunk kernel attends for prompt chunks (chunk_attention_fits): any length rides along


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # spec -> (kv caches, plan or None)


def _packed(weight) -> object:
    """A quantized weight's kernel layout (None for dense weights)."""
    return getattr(weight, "packed", None)


def _make_plan(spec: DecoderStackSpec, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StackPlan | None:
    """The plan, or None when the stack is outside what the C stack runs."""
    kind = type(_packed(spec.layers[0].qkv))
    if kind not in _BITS or spec.dtype != torch.float32 or spec.activation_dtype is not None:
        return None
    rows: list[int] = []
    for layer, (k, v) in zip(spec.layers, kv_caches, strict=True):
        linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
        norms = (layer.input_norm, layer.post_attention_norm)
        if (
            any(type(_packed(w)) is not kind for w in linears) or any(n.dtype != torch.float32 for n in norms)
            or (layer.qkv_bias is not None and layer.qkv_bias.dtype != torch.float32)
            or k.dtype not in KV_KIND or v.dtype != k.dtype
        ):
            return None
        for w in linears:
            pointers = _packed(w).pointers
            rows += [*pointers, *[0] * (3 - len(pointers))]
        bias = layer.qkv_bias
        rows += [norms[0].data_ptr(), norms[1].data_ptr(), 0 if bias is None else bias.data_ptr(), k.data_ptr(),
                 v.data_ptr()]
    assert len(rows) == len(spec.layers) * STACK_LAYER_SLOTS
    kv_kind = KV_KIND[kv_caches[0][0].dtype]
    fits = native.library().chunk_attention_fits(kv_kind, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    return StackPlan(torch.tensor(rows, dtype=torch.int64), _BITS[kind], kv_kind, bool(fits))


def _plan(spec: DecoderStackSpec, kv_caches) -> StackPlan | None:
    cached = _PLANS.get(spec)
    if cached is None or cached[0] is not kv_caches:
        cached = (kv_caches, _make_plan(spec, kv_caches) if spec.layers else None)
        _PLANS[spec] = cached
    return cached[1]


@kernel("decoder_stack", priority=20)
def decoder_stack_c(spec: DecoderStackSpec, x: torch.Tensor, batch: ForwardBatch):
    lib = native.library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return DECLINE
    plan = _plan(spec, batch.kv_caches)
    if plan is None or (max(batch.query_lens) > MAX_CHUNK and not plan.long_chunks):
        return DECLINE
    lora_table, segments = None, None
    if batch.lora_ids is not None:  # adapters in the step: added after each linear, as the per-op path does
        lora_table = _lora_table(spec)
        if lora_table is None:
            return DECLINE
        segments = batch.view(lora_segment_table)
    cos, sin = spec.rope_cos[batch.positions], spec.rope_sin[batch.positions]
    out, residual = x.clone(), torch.empty_like(x)
    rows, block_table = batch.view(token_rows), batch.block_table
    chunks, decodes = batch.view(chunk_rows), batch.view(decode_rows)
    lib.decode_stack(
        plan.table.data_ptr(), len(spec.layers), plan.bits, out.data_ptr(), residual.data_ptr(), x.shape[0],
        spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size, spec.norm_eps,
        spec.norm_variant == "jiutian", cos.data_ptr(), sin.data_ptr(), plan.kv_kind, batch.slot_mapping.data_ptr(),
        block_table.data_ptr(), block_table.stride(0), rows.data_ptr(), chunks.data_ptr(), len(chunks),
        decodes.data_ptr(), len(decodes), batch.page_size, spec.attn_scale,
        max(batch.seq_lens), 0 if lora_table is None else lora_table.data_ptr(),
        0 if segments is None else segments.data_ptr(), 0 if segments is None else segments.shape[0],
        torch.get_num_threads(),
    )
    return out, residual


_LORA_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # spec -> LoRA table or None


def _lora_table(spec: DecoderStackSpec) -> torch.Tensor | None:
    """Per layer, the LoRA stacks of its four linears as STACK_LORA_SLOTS entries (A, B^T,
    column ranges, width and scaling addresses, max width), or None when a layer has none the C kernel takes."""
    if spec in _LORA_TABLES:
        return _LORA_TABLES[spec]
    entries: list[int] | None = []
    for layer in spec.layers:
        stacks = layer.lora
        if stacks is None or any(
            s is None or s.a.dtype != torch.float32 or s.max_width > LORA_MAX_WIDTH for s in stacks
        ):
            entries = None
            break
        for s in stacks:
            entries += [s.a.data_ptr(), s.bt.data_ptr(), s.cols_t.data_ptr(), s.width_t.data_ptr(), s.scaling_t.data_ptr(),
                        s.max_width]
    table = None if entries is None else torch.tensor(entries, dtype=torch.int64)
    assert table is None or table.numel() == len(spec.layers) * STACK_LORA_SLOTS
    _LORA_TABLES[spec] = table
    return table
