"""pagoda's operator library: reference ops, the data formats kernels share, and the
kernel wings each platform registers (cpu/, cuda/; sdpa.py is portable).

Call ops through this module (``ops.rms_norm(...)``); dispatch picks the best kernel
registered for the tensors' device type and falls back to the reference.
"""

from pagoda.ops.decoder_stack import DecoderLayerSpec, DecoderStackSpec
from pagoda.ops.forward_batch import ForwardBatch, ForwardMode
from pagoda.ops.lora import LoRAStack, lora_segments
from pagoda.ops.reference import (
    add_rms_norm,
    decoder_stack,
    linear_prepack,
    lora_apply,
    packed_linear,
    paged_attention,
    rms_norm,
    rotary_store_kv,
    silu_and_mul,
)
from pagoda.ops.quant import Int4Weight, Int8Weight, int4_linear, int4_prepack, int8_linear, int8_prepack
from pagoda.ops.registry import DECLINE, OPS, kernel, register_kernel
from pagoda.ops.sampling import (
    apply_penalties,
    apply_token_bias,
    apply_top_k_top_p_min_p,
    argmax_rows,
    sample_from_probs,
    token_bin_counts,
)

__all__ = [
    "DECLINE",
    "DecoderLayerSpec",
    "DecoderStackSpec",
    "ForwardBatch",
    "ForwardMode",
    "Int4Weight",
    "Int8Weight",
    "OPS",
    "add_rms_norm",
    "apply_penalties",
    "apply_token_bias",
    "apply_top_k_top_p_min_p",
    "argmax_rows",
    "decoder_stack",
    "int4_linear",
    "int4_prepack",
    "int8_linear",
    "int8_prepack",
    "kernel",
    "LoRAStack",
    "linear_prepack",
    "lora_apply",
    "lora_segments",
    "packed_linear",
    "paged_attention",
    "register_kernel",
    "rms_norm",
    "rotary_store_kv",
    "sample_from_probs",
    "silu_and_mul",
    "token_bin_counts",
]
