"""Verification of a proposal against the target model's own picks.

The target's logits after the last known token and after each proposed token (one forward
over the chunk) go through the ordinary sampler, one row per position, each row seeing the
history it would have had (the output so far plus the proposal before that position), so
penalties, logit bias and min_tokens apply exactly as without speculation. The proposal is
accepted while it equals the target's pick; the first pick that differs (or, when all are
accepted, the pick after the last) is the step's extra token.

Why this is exact. Greedy: every emitted token is the argmax the target would have picked
token by token. Sampling: the pick at position i is a draw from the target's distribution
p_i given the emitted prefix, so the emitted sequence is distributed exactly as without
speculation. For a proposal that is one token x (a point mass q, as n-gram and greedy-draft
proposals are) this is rejection sampling: x is accepted with probability p(x) = min(1,
p(x)/q(x)), and on rejection the token is a draw from p with x removed and renormalised
(the race's winner given that it is not x). Because each position takes exactly the noise
the sampler would have drawn for that token without speculation (the noise of positions
after the first rejection is given back, see rewind_generator), a seeded request emits the
same tokens with speculation on or off, in any batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from pagoda.engine.sampler import Sampler, SamplerOutput, SamplingRow


def accepted_length(picks: Sequence[int], draft: Sequence[int]) -> int:
    """How many proposed tokens the target's picks confirm (picks has len(draft) + 1 entries)."""
    n = 0
    for pick, proposed in zip(picks, draft):
        if pick != proposed:
            break
        n += 1
    return n


def rewind_generator(gen: torch.Generator, state: torch.Tensor, draws: int, vocab: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """Reset a request's generator to before this step and replay the noise of `draws` tokens,
    as the sampler draws it (one Exp(1) vector of the vocabulary's width per token)."""
    gen.set_state(state)
    buf = torch.empty(vocab, dtype=dtype, device=device)
    for _ in range(draws):
        buf.exponential_(generator=gen)


def sample_and_verify(
    sampler: Sampler, logits: torch.Tensor, items: Sequence[tuple[SamplingRow, Sequence[int]]]
) -> tuple[SamplerOutput, list[tuple[int, int]]]:
    """Sample every position of every item and keep what the target confirms.

    items: per sequence, its sampling row (history up to the last known token) and its proposal
    (empty for an ordinary decode); logits: 1 + len(proposal) rows per item, in order.
    Returns the sampler's output over all rows and, per item, the span of rows it emits
    (the accepted proposal's positions plus the target's own next token).
    """
    rows: list[SamplingRow] = []
    starts: list[int] = []
    for row, draft in items:
        starts.append(len(rows))
        rows.append(row)
        for p in range(1, len(draft) + 1):
            rows.append(dataclasses.replace(row, output_ids=row.output_ids + list(draft[:p])))
    rewinds = {
        i: row.generator.get_state() for i, (row, draft) in enumerate(items)
        if draft and row.generator is not None and not row.params.greedy
    }
    sampled = sampler(logits, rows)
    spans = []
    for i, ((row, draft), lo) in enumerate(zip(items, starts)):
        n = accepted_length(sampled.token_ids[lo : lo + len(draft) + 1], draft) + 1
        spans.append((lo, lo + n))
        if i in rewinds:
            rewind_generator(row.generator, rewinds[i], n, logits.shape[-1], torch.float32, logits.device)
    return sampled, spans
