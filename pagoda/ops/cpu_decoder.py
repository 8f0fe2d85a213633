"""CPU kernel of decoder_layers: a step's whole layer stack in one C call
(csrc/decode_stack.c), for models whose linears all sit in the C quantized tiles.

The C side calls the very kernels the per-op path dispatches to, in the same order, so
for decode tokens the two agree bit for bit; what goes away is ~270 returns to Python per
step, which at one sequence cost about as much as the arithmetic (and slow the kernels
after them). Short prompt chunks ride along (mixed steps are the rule under load), their
attention computed by the decode kernel row by row in float32 rather than by SDPA; long
chunks, and models it does not cover, take the per-op path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from pagoda.ops import native
from pagoda.ops.attention_metadata import AttentionMetadata
from pagoda.ops.cpu import KV_KIND, Int4Tiles, Int8Tiles
from pagoda.ops.registry import DECLINE, register_kernel

LAYER_SLOTS = 17  # addresses per layer in the C table (decode_stack.c)
# Prompt chunks up to this long ride along in the C stack (their attention as rows of the
# decode kernel); longer ones take the per-op path, whose flash SDPA is faster on them.
MAX_CHUNK = 256
_BITS = {Int4Tiles: 4, Int8Tiles: 8}


@dataclass(frozen=True)
class StackPlan:
    """What the C call needs of a model and its KV cache, gathered once."""

    table: torch.Tensor  # [layers * LAYER_SLOTS] int64 addresses
    bits: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    jiutian: bool
    scale: float
    kv_kind: int


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layers -> (kv pool, plan or None)


def _packed(linear) -> object:
    """A linear's kernel layout (None for unquantized linears)."""
    return getattr(getattr(linear, "qweight", None), "packed", None)


def _make_plan(layers, kv) -> StackPlan | None:
    """The plan, or None when some layer is outside what the C stack runs."""
    first = layers[0]
    attn, norm = first.self_attn, first.input_layernorm
    kind = type(_packed(attn.qkv_proj))
    if kind not in _BITS:
        return None
    rows: list[int] = []
    for i, layer in enumerate(layers):
        a, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if (
            any(type(_packed(lin)) is not kind for lin in linears)
            or a.dtype != torch.float32 or a.out_dtype is not None
            or any(n.out_dtype is not None or n.weight.dtype != torch.float32 for n in norms)
            or any((n.eps, n.variant) != (norm.eps, norm.variant) for n in norms)
            or (a.num_heads, a.num_kv_heads, a.head_dim, a.scale) != (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
            or any(lin.bias is not None for lin in linears[1:])
            or (a.qkv_proj.bias is not None and a.qkv_proj.bias.dtype != torch.float32)
            or kv.k[i].dtype not in KV_KIND
        ):
            return None
        for lin in linears:
            pointers = _packed(lin).pointers
            rows += [*pointers, *[0] * (3 - len(pointers))]
        bias = a.qkv_proj.bias
        rows += [norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                 kv.k[i].data_ptr(), kv.v[i].data_ptr()]
    return StackPlan(
        torch.tensor(rows, dtype=torch.int64), _BITS[kind], first.mlp.down_proj.out_features,
        first.mlp.down_proj.in_features, attn.num_heads, attn.num_kv_heads, attn.head_dim, norm.eps,
        norm.variant == "jiutian", attn.scale, KV_KIND[kv.k[0].dtype],
    )


def _plan(layers, kv) -> StackPlan | None:
    cached = _PLANS.get(layers)
    if cached is None or cached[0] is not kv:
        cached = (kv, _make_plan(layers, kv) if len(layers) else None)
        _PLANS[layers] = cached
    return cached[1]


@register_kernel("decoder_layers", "cpu", priority=20)
def decoder_layers_c(layers, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, kv):
    lib = native.library()
    cos, sin = rope
    if (
        lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous()
        or not (cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous())
    ):
        return DECLINE
    plan = _plan(layers, kv)
    if plan is None or max(meta.query_lens) > MAX_CHUNK:
        return DECLINE
    out, residual = x.clone(), torch.empty_like(x)
    rows, block_table = meta.token_rows, meta.block_table
    lib.decode_stack(
        plan.table.data_ptr(), len(layers), plan.bits, out.data_ptr(), residual.data_ptr(), x.shape[0], plan.hidden,
        plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.intermediate, plan.eps, plan.jiutian, cos.data_ptr(),
        sin.data_ptr(), plan.kv_kind, meta.slot_mapping.data_ptr(), block_table.data_ptr(), block_table.stride(0),
        rows.data_ptr(), meta.page_size, plan.scale, max(meta.seq_lens), torch.get_num_threads(),
    )
    return out, residual
