"""AttentionMetadata: how one ragged batch maps onto the paged KV cache.

Built once per step by the model runner (host-side lists plus small device tensors)
and read by every layer's attention kernel. Sequence b contributes
``query_lens[b]`` new tokens (a prefill chunk, or 1 for a decode) at the end of a
context of ``seq_lens[b]`` tokens whose keys/values live in the pages listed in
``block_table[b]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor  # [num_tokens] int64: pool slot for each new token's k/v
    block_table: torch.Tensor  # [batch, max_pages] int64: page ids per sequence
    page_size: int

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @cached_property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @cached_property
    def query_starts(self) -> list[int]:
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        return starts

    @cached_property
    def decode_rows(self) -> torch.Tensor:
        """[n, 3] int64 on the host, one row per single-token sequence: (token index, batch
        index, context length); the layout the C decode kernel reads."""
        rows = [(self.query_starts[b], b, self.seq_lens[b]) for b, q in enumerate(self.query_lens) if q == 1]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    @cached_property
    def token_rows(self) -> torch.Tensor:
        """decode_rows' layout for every token: a prompt token is a row whose context ends at
        itself (its chunk's keys are stored before attention runs), so the decode kernel can
        attend for it too; the same tensor as decode_rows when every sequence decodes."""
        if self.is_decode_only:
            return self.decode_rows
        rows = []
        for b, (q, s) in enumerate(zip(self.query_lens, self.seq_lens)):
            start, first_len = self.query_starts[b], s - q + 1
            rows += [(start + i, b, first_len + i) for i in range(q)]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    @cached_property
    def decode_max_len(self) -> int:
        """Longest context among the single-token sequences (0 if none)."""
        return max((s for q, s in zip(self.query_lens, self.seq_lens) if q == 1), default=0)

    @cached_property
    def multi_token_seqs(self) -> list[int]:
        """Batch indices of sequences with more than one new token (prefill chunks)."""
        return [b for b, q in enumerate(self.query_lens) if q > 1]

    @cached_property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, the pool slots of its whole context in order (reference path)."""
        ps = self.page_size
        offsets = torch.arange(ps, device=self.block_table.device)
        out = []
        for b, length in enumerate(self.seq_lens):
            pages = self.block_table[b, : (length + ps - 1) // ps]
            out.append((pages[:, None] * ps + offsets).reshape(-1)[:length])
        return out

    @cached_property
    def padded_context_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, max_len] slots (padding repeats slot 0) and a [batch, max_len] validity mask."""
        max_len = max(self.seq_lens)
        ps = self.page_size
        pages = self.block_table[:, : (max_len + ps - 1) // ps]
        offsets = torch.arange(ps, device=pages.device)
        slots = (pages[:, :, None] * ps + offsets).reshape(len(self.seq_lens), -1)[:, :max_len]
        lens = torch.tensor(self.seq_lens, device=pages.device)
        valid = torch.arange(max_len, device=pages.device)[None, :] < lens[:, None]
        return torch.where(valid, slots, torch.zeros_like(slots)), valid
