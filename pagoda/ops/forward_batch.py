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
    # Sequences verifying a speculative proposal: each of their tokens must be attended exactly as a
    # one-token decode at its position would be (so speculation changes no greedy token).
    verify_seqs: tuple[int, ...] = ()
    _views: dict[Callable[..., Any], Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]], page_size: int, device: torch.device,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), all_logits: Sequence[int] = (),
        lora_slots: Sequence[int] | None = None, verify_seqs: Sequence[int] = (),
    ) -> "ForwardBatch":
        """From each sequence's (new token ids, position of the first, page table), and optionally
        each sequence's LoRA pool slot (-1: the base model). The host work does not grow with the
        batch in torch calls (a 256-sequence decode is a handful of ops, not thousands of launches
        on an accelerator), and the tensors reach the device in one copy."""
        query_lens = [len(token_ids) for token_ids, _, _ in seqs]
        seq_lens = [start + q for (_, start, _), q in zip(seqs, query_lens)]
        ids: list[int] = []
        positions: list[int] = []
        for token_ids, start, _ in seqs:
            ids.extend(token_ids)
            positions.extend(range(start, start + len(token_ids)))
        width = max(len(pages) for _, _, pages in seqs)
        table: list[int] = []
        for _, _, pages in seqs:
            table.extend(pages)
            table.extend([0] * (width - len(pages)))
        n, b = len(ids), len(seqs)
        host = torch.tensor(ids + positions + [0] * n + seq_lens + table, dtype=torch.long)
        pos, block_table = host[n : 2 * n], host[3 * n + b :].view(b, width)
        rows = torch.arange(b) if n == b else torch.repeat_interleave(torch.arange(b), torch.tensor(query_lens))
        torch.add(block_table[rows, pos // page_size] * page_size, pos % page_size, out=host[2 * n : 3 * n])
        dev = host.to(device)
        lora_ids = None
        if lora_slots is not None and any(s >= 0 for s in lora_slots):
            lora_ids = torch.tensor(list(lora_slots), dtype=torch.long).repeat_interleave(torch.tensor(query_lens))
            lora_ids = lora_ids.to(device)
        return cls(
            input_ids=dev[:n],
            positions=dev[n : 2 * n],
            query_lens=query_lens,
            seq_lens=seq_lens,
            slot_mapping=dev[2 * n : 3 * n],
            block_table=dev[3 * n + b :].view(b, width),
            context_lens=dev[3 * n : 3 * n + b].to(torch.int32),
            page_size=page_size,
            kv_caches=kv_caches,
            all_logits=tuple(all_logits),
            lora_ids=lora_ids,
            verify_seqs=tuple(verify_seqs),
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
    def chunk_seqs(self) -> list[int]:
        """The multi-token sequences that are prompt chunks (not verifying a proposal)."""
        verify = set(self.verify_seqs)
        return [b for b in self.multi_token_seqs if b not in verify]

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
