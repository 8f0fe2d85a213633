"""ModelRunner: turns one scheduled step (ragged chunks of sequences) into logits.

It owns the model and the KV pool; it fills the step's ForwardBatch from the scheduler's
chunks, runs one forward over prefill chunks and decodes together (no padding), and
returns the logits the sampler needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.engine.scheduler import ScheduledChunk
from pagoda.ops.forward_batch import ForwardBatch


@dataclass
class StepOutput:
    last_logits: torch.Tensor  # [num_chunks, vocab] float32: logits after each chunk's last token
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> [len, vocab]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv_pool, device
        self.page_size = kv_pool.page_size

    def run(self, chunks: Sequence[ScheduledChunk]) -> StepOutput:
        slots = [c.request.lora_slot for c in chunks]
        if max(slots, default=-1) >= 0:
            return self._run_with_adapters(chunks, slots)
        seqs = [(c.request.all_ids[c.start : c.start + c.num_tokens], c.start, c.request.pages) for c in chunks]
        return self.forward(self.prepare(seqs, [i for i, c in enumerate(chunks) if c.wants_all_logits]))

    def _run_with_adapters(self, chunks: Sequence[ScheduledChunk], slots: list[int]) -> StepOutput:
        """A step with LoRA adapters: sequences ordered by adapter slot, so each adapter's rows
        are one contiguous segment (ops.lora_apply: two matmuls per adapter per linear);
        logits come back in the chunks' order."""
        order = sorted(range(len(chunks)), key=slots.__getitem__)
        seqs = []
        for i in order:
            c = chunks[i]
            seqs.append((c.request.all_ids[c.start : c.start + c.num_tokens], c.start, c.request.pages))
        all_logits = [j for j, i in enumerate(order) if chunks[i].wants_all_logits]
        out = self.forward(self.prepare(seqs, all_logits, [slots[i] for i in order]))
        inverse = [0] * len(order)
        for j, i in enumerate(order):
            inverse[i] = j
        if order != sorted(order):
            out.last_logits = out.last_logits[torch.tensor(inverse, device=out.last_logits.device)]
        out.all_logits = {order[j]: logits for j, logits in out.all_logits.items()}
        return out

    def prepare(
        self, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], all_logits: Sequence[int] = (),
        lora_slots: Sequence[int] | None = None,
    ) -> ForwardBatch:
        """The batch of sequences given as (new token ids, position of the first, page table),
        and each one's LoRA pool slot (-1: the base model)."""
        return ForwardBatch.build(seqs, self.page_size, self.device, self.kv.layers, all_logits, lora_slots)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> StepOutput:
        hidden = self.model(batch)
        ends = torch.tensor([s - 1 for s in batch.query_starts[1:]], device=self.device)
        out = StepOutput(last_logits=self.model.compute_logits(hidden[ends]))
        for b in batch.all_logits:
            lo, hi = batch.query_starts[b], batch.query_starts[b + 1]
            out.all_logits[b] = self.model.compute_logits(hidden[lo:hi])
        return out
