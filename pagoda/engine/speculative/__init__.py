"""Speculative decoding: propose tokens cheaply, verify them in one forward of the target.

A proposer sets ``req.draft`` for the decoding sequences the engine picks; the scheduler
schedules each as a chunk of 1 + len(draft) tokens; the runner returns logits for all of them;
``verify`` keeps the confirmed prefix plus one token from the target.
"""

from __future__ import annotations

from pagoda.engine.speculative.ngram import NgramProposer
from pagoda.engine.speculative.verify import accepted_length, sample_and_verify

__all__ = ["NgramProposer", "accepted_length", "sample_and_verify"]
