"""Speculation: the engine's side of speculative decoding, in one place.

It builds the configured proposer, decides each step whether to speculate and how far each
sequence may guess, and keeps the counts `/metrics` reports. The engine calls `propose`
before scheduling and `verified` for each speculating chunk it has sampled.
"""

from __future__ import annotations

from typing import Sequence

from pagoda.config import EngineConfig
from pagoda.engine.request import Request

# Past this many tokens a speculating sequence proposes proportionally fewer (at least 2): every
# proposed row is attended over the whole context (the CPU kernel scores a proposal's rows in one
# pass over the keys, but each row's softmax and value sums are its own: ~0.3 ms per row and 1K
# tokens of context for the default model on this CPU), so a guess costs more the longer the
# context (benchmarks/bench_speculative.py, docs/BENCHMARKS.md).
SPEC_FULL_CONTEXT = 8192


class Speculation:
    def __init__(self, config: EngineConfig, proposer, context_length: int) -> None:
        self.config, self.proposer, self.context_length = config, proposer, context_length
        self.num_draft_tokens = 0  # tokens proposed and verified
        self.num_accepted_tokens = 0  # of those, confirmed by the target
        self.num_steps = 0  # verifications (one per speculating sequence and step)

    @classmethod
    def build(cls, config: EngineConfig, platform, model_config, context_length: int) -> "Speculation | None":
        """The configured proposer (n-gram lookup or a draft model), or None without one."""
        if config.speculative_algorithm is None:
            return None
        if config.speculative_algorithm == "ngram":
            from pagoda.engine.speculative.ngram import NgramProposer

            proposer = NgramProposer(config.speculative_num_draft_tokens, config.speculative_ngram_min_match,
                                     config.speculative_ngram_max_match)
        else:
            from pagoda.engine.speculative.draft import DraftProposer

            proposer = DraftProposer(config, platform, model_config, context_length)
        return cls(config, proposer, context_length)

    def active(self, running: Sequence[Request]) -> bool:
        """Speculate this step? Only while the batch is small: past speculative_max_batch sequences
        a step costs about in proportion to its tokens, and rejected proposals would cost more than
        accepted ones save."""
        return len(running) <= self.config.speculative_max_batch

    def propose(self, running: Sequence[Request]) -> list[Request]:
        """Set `draft` on the decoding sequences that speculate this step; returns them."""
        if not self.active(running):
            return []
        k = self.config.speculative_num_draft_tokens
        reqs, limits = [], []
        for req in running:
            if req.num_tokens - req.num_computed != 1 or req.in_prefill or req.grammar is not None:
                continue  # prefilling, or constrained (its grammar would have to vet each proposal)
            # never propose past max_tokens or the context: the target adds one token of its own
            limit = min(k, req.max_tokens - len(req.output_ids) - 1, self.context_length - req.num_tokens - 1)
            if req.num_tokens > SPEC_FULL_CONTEXT:  # each proposed row attends over the whole context
                limit = min(limit, max(2, k * SPEC_FULL_CONTEXT // req.num_tokens))
            if limit > 0:
                reqs.append(req)
                limits.append(limit)
        if reqs:
            self.proposer.propose(reqs, limits)
        return reqs

    def verified(self, req: Request, drafted: int, accepted: int) -> None:
        """A speculating chunk of `req` kept `accepted` of its `drafted` proposed tokens."""
        self.num_steps += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.proposer.verified(req, drafted, accepted)

    def release(self, req: Request) -> None:
        self.proposer.release(req)

    def check_integrity(self, idle: bool) -> None:
        self.proposer.check_integrity(idle=idle)
