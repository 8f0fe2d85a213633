"""ModelRunner: turns one scheduled step (ragged chunks of sequences) into logits.

It owns the model and the KV pool; it builds the flat input tensors and the
AttentionMetadata once per step, runs one forward over prefill chunks and decodes
together (no padding), and returns the logits the sampler needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.ops.attention_metadata import AttentionMetadata


@dataclass
class SequenceChunk:
    """One sequence's share of a step: `token_ids` at positions start.., stored in `pages`."""

    token_ids: list[int]
    start: int
    pages: list[int]
    all_logits: bool = False  # logits for every token (prompt logprobs), not just the last


@dataclass
class StepOutput:
    last_logits: torch.Tensor  # [num_chunks, vocab] float32: logits after each chunk's last token
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> [len, vocab]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv_pool, device
        self.page_size = kv_pool.page_size

    def build(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ps = self.page_size
        ids, positions, slots = [], [], []
        max_pages = max(len(c.pages) for c in chunks)
        block_table = torch.zeros(len(chunks), max_pages, dtype=torch.long)
        for b, c in enumerate(chunks):
            pages = torch.tensor(c.pages, dtype=torch.long)
            block_table[b, : len(c.pages)] = pages
            pos = torch.arange(c.start, c.start + len(c.token_ids), dtype=torch.long)
            positions.append(pos)
            slots.append(pages[pos // ps] * ps + pos % ps)
            ids.extend(c.token_ids)
        meta = AttentionMetadata(
            query_lens=[len(c.token_ids) for c in chunks],
            seq_lens=[c.start + len(c.token_ids) for c in chunks],
            slot_mapping=torch.cat(slots).to(self.device),
            block_table=block_table.to(self.device),
            page_size=ps,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return input_ids, torch.cat(positions).to(self.device), meta

    @torch.inference_mode()
    def run(self, chunks: list[SequenceChunk]) -> StepOutput:
        input_ids, positions, meta = self.build(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv)
        ends = torch.tensor([s - 1 for s in meta.query_starts[1:]], device=self.device)
        out = StepOutput(last_logits=self.model.compute_logits(hidden[ends]))
        for b, c in enumerate(chunks):
            if c.all_logits:
                lo, hi = meta.query_starts[b], meta.query_starts[b + 1]
                out.all_logits[b] = self.model.compute_logits(hidden[lo:hi])
        return out
