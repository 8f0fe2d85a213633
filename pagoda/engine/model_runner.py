"""ModelRunner: turns one scheduled step (ragged chunks of sequences) into logits.

It owns the model and the KV pool; it fills the step's ForwardBatch from the scheduler's
chunks, runs one forward over prefill chunks and decodes together (no padding), and
returns the logits the sampler needs. Where the platform captures graphs, decode-only
steps replay a captured graph instead (graph_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.engine.graph_runner import DecodeGraphRunner, DeviceGraph
from pagoda.engine.scheduler import ScheduledChunk
from pagoda.ops.forward_batch import ForwardBatch


@dataclass
class StepOutput:
    last_logits: torch.Tensor  # [num_chunks, vocab] float32: logits after each chunk's last token
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> [len, vocab]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> [len, hidden] float32


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, device: torch.device, channel=None) -> None:
        """``channel``: on rank 0 of a tensor-parallel group, the StepChannel each batch is
        broadcast on before the forward (the other ranks run the same forward on it)."""
        self.model, self.kv, self.device, self.channel = model, kv_pool, device, channel
        self.page_size = kv_pool.page_size
        self.graphs: DecodeGraphRunner | None = None

    def capture_graphs(self, max_batch: int, max_pages: int, new_graph: Callable[[], DeviceGraph]) -> None:
        """Capture decode steps of up to max_batch sequences of up to max_pages pages each."""
        graphs = DecodeGraphRunner(self._logits_of_every_token, self.kv.layers, self.page_size, max_pages, max_batch,
                                   self.device, new_graph)
        with torch.inference_mode():
            graphs.capture()
        self.graphs = graphs

    def run(self, chunks: Sequence[ScheduledChunk]) -> StepOutput:
        """The step's forward; outputs are indexed by chunk. With LoRA adapters the sequences go in
        adapter-slot order, so each adapter's rows are one contiguous segment (ops.lora_apply: two
        matmuls per adapter per linear), and the outputs come back in the chunks' order."""
        slots = [c.request.lora_slot for c in chunks]
        adapters = max(slots, default=-1) >= 0
        order = sorted(range(len(chunks)), key=slots.__getitem__) if adapters else list(range(len(chunks)))
        seqs = [(chunks[i].token_ids, chunks[i].start, chunks[i].request.pages) for i in order]
        all_logits = [j for j, i in enumerate(order) if chunks[i].wants_all_logits]
        hidden_of = [j for j, i in enumerate(order) if chunks[i].request.pooling is not None]
        verify = [j for j, i in enumerate(order) if chunks[i].draft]
        batch = self.prepare(seqs, all_logits, [slots[i] for i in order] if adapters else None, verify)
        out = self.forward(batch, hidden_of)
        if order != sorted(order):
            inverse = [0] * len(order)
            for j, i in enumerate(order):
                inverse[i] = j
            out.last_logits = out.last_logits[torch.tensor(inverse, device=out.last_logits.device)]
            out.all_logits = {order[j]: logits for j, logits in out.all_logits.items()}
            out.hidden = {order[j]: h for j, h in out.hidden.items()}
        return out

    def prepare(
        self, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], all_logits: Sequence[int] = (),
        lora_slots: Sequence[int] | None = None, verify_seqs: Sequence[int] = (),
    ) -> ForwardBatch:
        """The batch of sequences given as (new token ids, position of the first, page table),
        each one's LoRA pool slot (-1: the base model), and those verifying a proposal."""
        return ForwardBatch.build(seqs, self.page_size, self.device, self.kv.layers, all_logits, lora_slots,
                                  verify_seqs)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, hidden_of: Sequence[int] = ()) -> StepOutput:
        """Logits after each sequence's last token (every token's for `batch.all_logits`), and the
        final hidden states of the sequences `hidden_of` (embedding requests, which a decode graph,
        returning logits only, never serves)."""
        if self.channel is None:
            return self._forward(batch, hidden_of)
        try:
            self.channel.send_step(batch)
            return self._forward(batch, hidden_of)
        except RuntimeError as e:  # a collective failed: a rank is gone (gloo: connection closed)
            from pagoda.distributed.launch import fatal

            fatal(f"tensor-parallel step failed, a rank is gone: {str(e).splitlines()[0] if str(e) else e!r}")
            raise

    def _forward(self, batch: ForwardBatch, hidden_of: Sequence[int] = ()) -> StepOutput:
        if self.graphs is not None and not hidden_of and self.graphs.serves(batch):
            return StepOutput(last_logits=self.graphs.run(batch))
        hidden = self.model(batch)
        out = self._logits(batch, hidden)
        for b in hidden_of:
            out.hidden[b] = hidden[batch.query_starts[b] : batch.query_starts[b + 1]].float()
        return out

    def _logits(self, batch: ForwardBatch, hidden: torch.Tensor) -> StepOutput:
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

    def _logits_of_every_token(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(batch))
