"""The two ends of constrained decoding the engine touches.

``StructuredBackend`` (one per engine, built on the first constrained request): turns a request's
StructuredOutputs into a compiled grammar (cached) and gives each sequence its GrammarState.

``GrammarMasker`` (the sampler's): per step, one call fills the allowed-token bitmask of every
constrained row (xgrammar walks its matchers in C++), one call applies it to those rows of the
batch's logits in place (-inf where a token is not allowed). Unconstrained rows are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import xgrammar as xgr

from pagoda.structured.grammar import GrammarCache, GrammarState, tokenizer_info
from pagoda.structured.params import StructuredOutputs
from pagoda.tokenizer import Tokenizer


class StructuredBackend:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.cache = GrammarCache(self.info)

    def compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        """Compiled once per distinct spec; raises InvalidRequestError with the parser's message."""
        return self.cache.get(spec)

    @staticmethod
    def new_state(compiled: xgr.CompiledGrammar) -> GrammarState:
        return GrammarState(compiled)


class GrammarMasker:
    """Applies constrained rows' grammars to a batch of logits. Holds only a reusable bitmask."""

    def __init__(self) -> None:
        self.batch = xgr.BatchGrammarMatcher()
        self.bitmask = torch.empty(0, 0, dtype=torch.int32)

    def fill(self, states: Sequence[GrammarState], rows: list[int], batch_size: int, vocab_size: int) -> torch.Tensor:
        """The [batch_size, ceil(vocab/32)] bitmask with rows[i] filled from states[i] (others stale)."""
        shape = xgr.get_bitmask_shape(batch_size, vocab_size)
        if self.bitmask.shape[0] < shape[0] or self.bitmask.shape[1] != shape[1]:
            self.bitmask = xgr.allocate_token_bitmask(max(shape[0], 2 * self.bitmask.shape[0]), vocab_size)
        self.batch.batch_fill_next_token_bitmask([s.matcher for s in states], self.bitmask, rows)
        return self.bitmask[: shape[0]]

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """-inf, in place, on logits[r] wherever bitmask[r] disallows the token, for r in rows."""
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows, backend="cpu")
        else:  # accelerators: the portable torch implementation (no compile step, any device)
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows,
                                            backend="torch_native")

    def __call__(self, logits: torch.Tensor, states: Sequence[GrammarState], rows: list[int]) -> torch.Tensor:
        """Fill and apply; returns the bitmask (valid for `rows`) for re-applying to a fresh row."""
        bitmask = self.fill(states, rows, logits.shape[0], logits.shape[-1])
        self.apply(logits, bitmask, rows)
        return bitmask
