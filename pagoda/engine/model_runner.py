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
        seqs = [(c.token_ids, c.start, c.request.pages) for c in chunks]
        return self.forward(self.prepare(seqs, [i for i, c in enumerate(chunks) if c.wants_all_logits]))

    def prepare(self, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], all_logits: Sequence[int] = ()) -> ForwardBatch:
        """The batch of sequences given as (new token ids, position of the first, page table)."""
        return ForwardBatch.build(seqs, self.page_size, self.device, self.kv.layers, all_logits)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> StepOutput:
        hidden = self.model(batch)
        starts = batch.query_starts
        if not batch.all_logits:
            ends = torch.tensor([s - 1 for s in starts[1:]], device=self.device)
            return StepOutput(last_logits=self.model.compute_logits(hidden[ends]))
        # one output-head pass for every row wanted (the head's weights are read once, not per sequence)
        rows: list[int] = []
        last: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        wanted = set(batch.all_logits)
        for b in range(batch.batch_size):
            lo, hi = starts[b], starts[b + 1]
            if b in wanted:
                spans[b] = (len(rows), len(rows) + hi - lo)
                rows.extend(range(lo, hi))
            else:
                rows.append(hi - 1)
            last.append(len(rows) - 1)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        out = StepOutput(last_logits=logits[torch.tensor(last, device=self.device)])
        for b, (lo, hi) in spans.items():
            out.all_logits[b] = logits[lo:hi]
        return out
