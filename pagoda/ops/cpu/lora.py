"""CPU kernel of lora_apply: the adapters' segment matmuls in one C call (csrc/lora.c).

torch's route is two small matmuls and an in-place add per adapter per linear, each a
separate dispatch (and a parallel region) for a few microseconds of arithmetic; with four
adapters that is ~1,000 ops a step on a 30-layer model. One C call per linear does all the
segments. float32 activations only (the int4/int8 models' per-op path and the C stack's);
others decline to the reference.
"""

from __future__ import annotations

import torch

from pagoda.ops.cpu import native
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.lora import LoRAStack, lora_segment_table
from pagoda.ops.registry import DECLINE, kernel


MAX_WIDTH = 1024  # LORA_MAX_WIDTH in csrc/lora.c: A rows of one linear (parts x rank)


@kernel("lora_apply", priority=20)
def lora_apply_c(y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch, stack: LoRAStack):
    lib = native.library()
    if (
        lib is None or y.dtype != torch.float32 or x.dtype != torch.float32 or y.dim() != 2 or x.dim() != 2
        or y.stride(1) != 1 or x.stride(1) != 1 or stack.a.dtype != torch.float32 or stack.max_width > MAX_WIDTH
    ):
        return DECLINE
    segments = batch.view(lora_segment_table)
    lib.lora_apply(
        y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), segments.data_ptr(), segments.shape[0],
        stack.a.data_ptr(), stack.bt.data_ptr(), stack.cols_t.data_ptr(), stack.width_t.data_ptr(), stack.scaling_t.data_ptr(),
        stack.max_width, x.shape[1], y.shape[1], torch.get_num_threads(),
    )
    return y
