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
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, device: torch.device, channel=None) -> None:
        """``channel``: on rank 0 of a tensor-parallel group, the StepChannel each batch is
        broadcast on before the forward (the other ranks run the same forward on it)."""
        self.model, self.kv, self.device, self.channel = model, kv_pool, device, channel
        self.page_size = kv_pool.page_size

    def run(self, chunks: Sequence[ScheduledChunk]) -> StepOutput:
        seqs = [(c.request.all_ids[c.start : c.start + c.num_tokens], c.start, c.request.pages) for c in chunks]
        return self.forward(self.prepare(seqs, [i for i, c in enumerate(chunks) if c.wants_all_logits]))

    def prepare(self, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], all_logits: Sequence[int] = ()) -> ForwardBatch:
        """The batch of sequences given as (new token ids, position of the first, page table)."""
        return ForwardBatch.build(seqs, self.page_size, self.device, self.kv.layers, all_logits)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> StepOutput:
        if self.channel is None:
            return self._forward(batch)
        try:
            self.channel.send_step(batch)
            return self._forward(batch)
        except RuntimeError as e:  # a collective failed: a rank is gone (gloo: connection closed)
            from pagoda.distributed.launch import fatal

            fatal(f"tensor-parallel step failed, a rank is gone: {str(e).splitlines()[0] if str(e) else e!r}")
            raise

    def _forward(self, batch: ForwardBatch) -> StepOutput:
        hidden = self.model(batch)
        ends = torch.tensor([s - 1 for s in batch.query_starts[1:]], device=self.device)
        out = StepOutput(last_logits=self.model.compute_logits(hidden[ends]))
        for b in batch.all_logits:
            lo, hi = batch.query_starts[b], batch.query_starts[b + 1]
            out.all_logits[b] = self.model.compute_logits(hidden[lo:hi])
        return out
