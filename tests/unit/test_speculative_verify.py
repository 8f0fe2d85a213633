"""Verification keeps the target's distribution exactly: a statistical test on a small vocabulary."""

from __future__ import annotations

import torch

from pagoda.engine.sampler import Sampler, SamplingRow, make_generator
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.speculative.verify import accepted_length, sample_and_verify

V = 5


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / temperature).softmax(-1)


def test_accepted_length() -> None:
    assert accepted_length([1, 2, 3], [1, 2]) == 2
    assert accepted_length([1, 5, 3], [1, 2]) == 1
    assert accepted_length([4, 2, 3], [1, 2]) == 0
    assert accepted_length([7], []) == 0


def test_greedy_verification_keeps_the_argmax_prefix() -> None:
    logits = torch.tensor([[0, 3, 1, 0, 0], [0, 0, 0, 4, 0], [5, 0, 0, 0, 0], [0, 0, 2, 0, 0]], dtype=torch.float32)
    row = SamplingRow(SamplingParams(temperature=0), [0], [])
    _, spans = sample_and_verify(Sampler(), logits, [(row, [1, 3, 2])])
    assert spans == [(0, 3)]  # 1 and 3 accepted, 0 (the argmax after 3) replaces the proposed 2


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """Two positions, a proposal x: the emitted first token is distributed as p0 (so x is
    accepted with probability p0(x), and a rejection draws from p0 without x), and the token
    after an accepted x as p1. Total variation over 20,000 seeded draws stays within 0.02."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, V, generator=gen) * 1.5
    params = SamplingParams(temperature=0.8, seed=0)
    p0, p1 = probs(logits[0], 0.8), probs(logits[1], 0.8)
    sampler = Sampler()
    for x in (int(p0.argmax()), int(p0.argmin())):  # a likely and an unlikely proposal
        n = 20000
        items = [(SamplingRow(params, [0], [], generator=make_generator(seed)), [x]) for seed in range(n)]
        sampled, spans = sample_and_verify(sampler, logits.repeat(n, 1), items)
        first = torch.zeros(V)
        second = torch.zeros(V)
        for lo, hi in spans:
            first[sampled.token_ids[lo]] += 1
            if hi - lo == 2:
                assert sampled.token_ids[lo] == x
                second[sampled.token_ids[lo + 1]] += 1
            else:
                assert hi - lo == 1 and sampled.token_ids[lo] != x
        assert 0.5 * (first / n - p0).abs().sum() < 0.02
        accepted = second.sum()
        assert abs(accepted / n - p0[x]) < 0.02  # acceptance probability p0(x) = min(1, p0(x) / q(x)), q = 1
        rejected = first.clone()
        rejected[x] = 0
        residual = p0.clone()
        residual[x] = 0
        assert 0.5 * (rejected / rejected.sum() - residual / residual.sum()).abs().sum() < 0.03
        if accepted > 1000:
            assert 0.5 * (second / accepted - p1).abs().sum() < 0.05


def test_seeded_rows_draw_the_same_noise_as_without_speculation() -> None:
    """After a rejection the generator is rewound to one draw per emitted token."""
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler()
    plain_gen = make_generator(7)
    plain = []
    for i in range(3):
        out = sampler(logits[i : i + 1], [SamplingRow(params, [0], [], generator=plain_gen)])
        plain.append(out.token_ids[0])
    spec_gen = make_generator(7)
    emitted = []
    while len(emitted) < 3:
        draft = [(plain[len(emitted)] + 1) % V]  # always wrong: one token per verification
        i = len(emitted)
        sampled, spans = sample_and_verify(sampler, logits[i : i + 2], [(SamplingRow(params, [0], [], generator=spec_gen), draft)])
        lo, hi = spans[0]
        emitted.extend(sampled.token_ids[lo:hi])
    assert emitted == plain
