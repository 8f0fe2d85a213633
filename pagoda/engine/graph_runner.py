"""Decode steps replayed from captured graphs, one graph per batch-size bucket.

On a GPU a decode step of a small batch is thousands of kernel launches whose host time
dwarfs the device's work; a captured graph (CUDA graphs; MUSA graphs)
replays them all with one launch. Decode-only steps are captured at start-up for batch
buckets 1, 2, 4, 8, then every 8 up to 64 and every 16 beyond, up to the largest batch the
engine runs (capped by `--graph-max-batch-size`); a step pads to its bucket and replays.
Prefill and mixed steps, and steps that want every token's logits, run eagerly.

Each graph reads static buffers (ids, positions, slot mapping, block table, context
lengths) that a step fills before replaying; padding rows decode token 0 at position 0
into the null page's slot 0 (never read: every real context masks it out) with a context
of one token. The platform captures (`Platform.new_graph`); this file never names a device.
`EagerGraph` stands in where there are no graphs (tests on a CPU): replaying runs the
captured function again over the same static buffers, so the bucket, padding and buffer
logic is exercised and must give the eager step's outputs.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Protocol

import torch

from pagoda.ops.forward_batch import ForwardBatch

log = logging.getLogger("pagoda.graphs")


class DeviceGraph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor], pool: object = None) -> torch.Tensor: ...
    def replay(self) -> None: ...
    def pool(self) -> object: ...


class EagerGraph:
    """A graph stand-in: `replay` reruns the function and writes its result into the tensor
    `capture` returned, as a real graph's replay refills its output buffer."""

    def capture(self, fn: Callable[[], torch.Tensor], pool: object = None) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())

    def pool(self) -> object:
        return None


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then +8 up to 64, then +16, the last one max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    b = 16
    while b < max_batch:
        sizes.append(b)
        b += 8 if b < 64 else 16
    return sizes + [max_batch]


class DecodeGraphRunner:
    def __init__(
        self, forward: Callable[[ForwardBatch], torch.Tensor], kv_caches, page_size: int, max_pages: int,
        max_batch: int, device: torch.device, new_graph: Callable[[], DeviceGraph],
    ) -> None:
        """`forward(batch)` -> logits [batch, vocab] of each sequence's token; max_pages: the
        longest page table a sequence can have (the context length's)."""
        self.forward, self.kv_caches, self.page_size, self.new_graph = forward, kv_caches, page_size, new_graph
        self.buckets = graph_buckets(max_batch)
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.block_table = torch.zeros(n, max_pages, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.seq_lens = [1] * n  # host copy, for kernels outside a real graph (EagerGraph)
        self.graphs: dict[int, tuple[DeviceGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first (the others share its memory pool)."""
        start, pool = time.perf_counter(), None
        for bs in reversed(self.buckets):
            graph = self.new_graph()
            out = graph.capture(lambda bs=bs: self.forward(self._static_batch(bs)), pool)
            pool = pool if pool is not None else graph.pool()
            self.graphs[bs] = (graph, out)
        log.info("captured %d decode graphs (batch %d..%d) in %.1f s", len(self.buckets), self.buckets[0],
                 self.max_batch, time.perf_counter() - start)

    def serves(self, batch: ForwardBatch) -> bool:
        return (
            bool(self.graphs) and batch.is_decode_only and batch.batch_size <= self.max_batch and not batch.all_logits
            and batch.lora_ids is None
            and batch.block_table.shape[1] <= self.block_table.shape[1]
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch, vocab] of a decode step that `serves` accepted."""
        bs = batch.batch_size
        bucket = self.buckets[bisect.bisect_left(self.buckets, bs)]
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.slot_mapping[:bs].copy_(batch.slot_mapping)
        width = batch.block_table.shape[1]
        self.block_table[:bs, :width].copy_(batch.block_table)
        self.block_table[:bs, width:].zero_()
        self.context_lens[:bs].copy_(batch.context_lens)
        pad = slice(bs, bucket)  # rows of an earlier, larger step: make them padding again
        self.input_ids[pad].zero_()
        self.positions[pad].zero_()
        self.slot_mapping[pad].zero_()
        self.block_table[pad].zero_()
        self.context_lens[pad].fill_(1)
        self.seq_lens[:bucket] = batch.seq_lens + [1] * (bucket - bs)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:bs]

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], query_lens=[1] * bs,
            seq_lens=self.seq_lens[:bs], slot_mapping=self.slot_mapping[:bs], block_table=self.block_table[:bs],
            context_lens=self.context_lens[:bs], page_size=self.page_size, kv_caches=self.kv_caches, static=True,
        )
