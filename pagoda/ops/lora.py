"""LoRA: how resident adapters' weights sit beside one linear, and a step's adapter segments.

A linear that adapters may target holds one ``LoRAStack``: for each slot of the adapter pool,
A and B such that the slot's rows get ``y += scaling * (x A^T) B^T`` on top of the base matmul
(computed once for all rows, in whatever format the base weights are). A fused projection
(qkv, gate_up) stacks its targeted parts: A's rows part after part ([parts * rank, in]), B
block-diagonal ([out, parts * rank]), so one pair of matmuls serves the whole projection.
``width[slot]`` is how many of A's rows the slot uses (0: no adapter there or it leaves this
linear alone); the rest stays zero.

Which adapter each token uses travels in the step's ForwardBatch (``lora_ids``: a pool slot
per token, -1 for none); ``lora_segments`` is its host view as runs of equal slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.ops.forward_batch import ForwardBatch


@dataclass(eq=False)
class LoRAStack:
    a: torch.Tensor  # [slots, max_width, in] float32
    bt: torch.Tensor  # [slots, max_width, out] float32: B transposed
    width: list[int] = field(default_factory=list)  # per slot: rows of a (columns of b) in use
    scaling: list[float] = field(default_factory=list)  # per slot: alpha / rank (or alpha / sqrt(rank))
    width_t: torch.Tensor | None = None  # the same two lists as tensors, for kernels ([slots] int32 / float32)
    scaling_t: torch.Tensor | None = None
    # [slots, max_width, 2] int32: the outputs each row of bt touches (first, end): a fused
    # projection's B is block-diagonal, so a kernel skips the zeros beside each part's block
    cols_t: torch.Tensor | None = None

    @classmethod
    def empty(cls, slots: int, max_width: int, in_features: int, out_features: int, device: torch.device) -> "LoRAStack":
        return cls(
            torch.zeros(slots, max_width, in_features, device=device),
            torch.zeros(slots, max_width, out_features, device=device),
            [0] * slots, [0.0] * slots,
            torch.zeros(slots, dtype=torch.int32, device=device), torch.zeros(slots, device=device),
            torch.zeros(slots, max_width, 2, dtype=torch.int32, device=device),
        )

    @property
    def max_width(self) -> int:
        return self.a.shape[1]

    def set(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put an adapter's fused A [w, in] and B [out, w] in a slot."""
        w = a.shape[0]
        if w > self.a.shape[1] or b.shape != (self.bt.shape[2], w) or a.shape[1] != self.a.shape[2]:
            raise ValueError(f"LoRA weights of shape {tuple(a.shape)}, {tuple(b.shape)} do not fit this stack")
        self.clear(slot)
        self.a[slot, :w].copy_(a)
        self.bt[slot, :w].copy_(b.t())
        nonzero = self.bt[slot, :w] != 0
        any_ = nonzero.any(dim=1)
        first = nonzero.int().argmax(dim=1)
        last = nonzero.shape[1] - nonzero.flip(1).int().argmax(dim=1)
        self.cols_t[slot, :w, 0] = torch.where(any_, first, 0)
        self.cols_t[slot, :w, 1] = torch.where(any_, last, 0)
        self._note(slot, w, float(scaling))

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.cols_t[slot].zero_()
        self._note(slot, 0, 0.0)

    def _note(self, slot: int, width: int, scaling: float) -> None:
        self.width[slot], self.scaling[slot] = width, scaling
        self.width_t[slot], self.scaling_t[slot] = width, scaling


def lora_segments(batch: ForwardBatch) -> list[tuple[int, int, int]]:
    """(slot, first row, end row) for each run of consecutive tokens using one adapter (rows
    without an adapter are left out). The model runner orders sequences by adapter, so a
    step has one run per adapter."""
    if batch.lora_ids is None:
        return []
    ids = batch.lora_ids.tolist()
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            if ids[start] >= 0:
                runs.append((ids[start], start, i))
            start = i
    return runs


def lora_segment_table(batch: ForwardBatch) -> torch.Tensor:
    """``lora_segments`` as an int64 tensor [runs, 3] on the host (for C kernels)."""
    return torch.tensor(batch.view(lora_segments), dtype=torch.int64).reshape(-1, 3)
