"""ForwardBatch: one engine step as the model and its kernels see it.

The model runner fills one per step from the scheduler's chunks; every layer reads it.
Sequence b contributes ``query_lens[b]`` new tokens (a prefill chunk, or 1 for a decode)
at the end of a context of ``seq_lens[b]`` tokens whose keys/values live in the pages
listed in ``block_table[b]``; layer l's cache is ``kv_caches[l]``.

It holds plain data only: tensors (ids, positions, slot mapping, block table, context
lengths) and host lists of the same facts, so a captured graph can keep static copies of
the tensors and a tensor-parallel rank can receive it as one message. Views that only some
kernel wants (the C kernels' row tables, SDPA's padded slots) are not fields: the kernel
builds them with ``batch.view(fn)``, once per step.

A batch whose tensors are a captured graph's static buffers is ``static``: its host lists
describe the step being captured, not the steps the graph will replay, so nothing under
capture may shape its work by them (kernels that would, decline).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


class ForwardMode(enum.Enum):
    DECODE = "decode"  # every sequence brings one token (a one-token prompt tail attends as a decode)
    EXTEND = "extend"  # every sequence brings a chunk of several tokens
    MIXED = "mixed"  # both

    @classmethod
    def of(cls, query_lens: Sequence[int]) -> "ForwardMode":
        decodes = sum(q == 1 for q in query_lens)
        return cls.DECODE if decodes == len(query_lens) else cls.EXTEND if decodes == 0 else cls.MIXED


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor  # [T] int64: pool slot for each new token's k/v
    block_table: torch.Tensor  # [batch, max_pages] int64: page ids per sequence
    context_lens: torch.Tensor  # [batch] int32: seq_lens on the device
    page_size: int
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()  # per layer: (k cache, v cache)
    all_logits: tuple[int, ...] = ()  # sequences that want logits for every token, not just the last
    static: bool = False  # the tensors are a captured graph's buffers (see above)
    lora_ids: torch.Tensor | None = None  # [T] int64: each token's LoRA pool slot, -1 for none; None: no adapter
    _views: dict[Callable[..., Any], Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], page_size: int, device: torch.device,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), all_logits: Sequence[int] = (),
        lora_slots: Sequence[int] | None = None,
    ) -> "ForwardBatch":
        """From each sequence's (new token ids, position of the first, page table), and optionally
        each sequence's LoRA pool slot (-1: the base model)."""
        ids, positions, slots = [], [], []
        max_pages = max(len(pages) for _, _, pages in seqs)
        block_table = torch.zeros(len(seqs), max_pages, dtype=torch.long)
        for b, (token_ids, start, pages) in enumerate(seqs):
            table = torch.tensor(pages, dtype=torch.long)
            block_table[b, : len(pages)] = table
            pos = torch.arange(start, start + len(token_ids), dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
            ids.extend(token_ids)
        seq_lens = [start + len(token_ids) for token_ids, start, _ in seqs]
        lora_ids = None
        if lora_slots is not None and any(s >= 0 for s in lora_slots):
            lens = torch.tensor([len(token_ids) for token_ids, _, _ in seqs])
            lora_ids = torch.tensor(list(lora_slots), dtype=torch.long).repeat_interleave(lens).to(device)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.cat(positions).to(device),
            query_lens=[len(token_ids) for token_ids, _, _ in seqs],
            seq_lens=seq_lens,
            slot_mapping=torch.cat(slots).to(device),
            block_table=block_table.to(device),
            context_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            page_size=page_size,
            kv_caches=kv_caches,
            all_logits=tuple(all_logits),
            lora_ids=lora_ids,
        )

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @cached_property
    def mode(self) -> ForwardMode:
        return ForwardMode.of(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.mode is ForwardMode.DECODE

    def kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_id`'s (k cache, v cache): [slots, kv_heads, row width] each."""
        return self.kv_caches[layer_id]

    def view(self, build: Callable[["ForwardBatch"], T]) -> T:
        """`build(self)`, computed once per batch: the per-step views kernels derive from it."""
        try:
            return self._views[build]
        except KeyError:
            value = self._views[build] = build(self)
            return value

    @cached_property
    def query_starts(self) -> list[int]:
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        return starts

    @cached_property
    def multi_token_seqs(self) -> list[int]:
        """Batch indices of sequences with more than one new token (prefill chunks)."""
        return [b for b, q in enumerate(self.query_lens) if q > 1]

    @cached_property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, the pool slots of its whole context in order."""
        ps = self.page_size
        offsets = torch.arange(ps, device=self.block_table.device)
        out = []
        for b, length in enumerate(self.seq_lens):
            pages = self.block_table[b, : (length + ps - 1) // ps]
            out.append((pages[:, None] * ps + offsets).reshape(-1)[:length])
        return out
