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

from typing import Sequence

import torch


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
