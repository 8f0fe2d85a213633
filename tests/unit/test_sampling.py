"""Sampling: each primitive op against a naive per-row implementation, then the Sampler's
observable behaviour (filters, penalties, bias, min_tokens, seeding, logprobs)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterator

import pytest
import torch

from pagoda import ops
from pagoda.engine import sampler as sampler_mod
from pagoda.engine.sampler import Sampler, SamplingRow, compute_logprobs, make_generator
from pagoda.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def row(prompt: list[int] | None = None, output: list[int] | None = None, **kwargs: Any) -> SamplingRow:
    params = SamplingParams(**kwargs)
    return SamplingRow(params, prompt or [], output or [], make_generator(params.seed))


def draws(logits_row: torch.Tensor, times: int, **kwargs: Any) -> list[int]:
    """Sample one distribution `times` times in a single batched call."""
    r = row(**kwargs)
    return Sampler()(logits_row.expand(times, -1), [r] * times).token_ids


def entropy(samples: list[int]) -> float:
    total = len(samples)
    return -sum(c / total * math.log(c / total) for c in Counter(samples).values())


# ---- primitive ops vs naive per-row Python -------------------------------------------------


def naive_filter(logits: list[float], k: int, p: float, min_p: float) -> list[float]:
    vocab = len(logits)
    keep = set(range(vocab))
    if 0 < k < vocab:
        kth = sorted(logits, reverse=True)[k - 1]
        keep = {i for i in keep if logits[i] >= kth}
    if p < 1:
        m = max(logits[i] for i in keep)
        z = sum(math.exp(logits[i] - m) for i in keep)
        nucleus: set[int] = set()
        mass = 0.0
        for i in sorted(keep, key=lambda i: -logits[i]):
            if mass >= p:
                break
            nucleus.add(i)
            mass += math.exp(logits[i] - m) / z
        keep = nucleus
    if min_p > 0:
        m = max(logits[i] for i in keep)
        keep = {i for i in keep if math.exp(logits[i] - m) >= min_p}
    return [x if i in keep else NEG_INF for i, x in enumerate(logits)]


@pytest.mark.parametrize("use", ["k", "p", "min_p", "k+p", "all"])
def test_top_k_top_p_min_p_matches_naive(use: str) -> None:
    b, vocab = 24, 40
    logits = torch.randn(b, vocab) * 2
    k = torch.tensor([[-1, 0, 1, 3, 10, 39, 40, 55][i % 8] for i in range(b)])
    p = torch.where(torch.arange(b) % 4 == 0, torch.ones(b), torch.rand(b) * 0.9 + 0.05)
    mp = torch.where(torch.arange(b) % 3 == 0, torch.zeros(b), torch.rand(b) * 0.5)
    top_k = k if "k" in use or use == "all" else None
    top_p = p if "p" in use.replace("min_p", "") or use == "all" else None
    min_p = mp if use in ("min_p", "all") else None
    got = ops.apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for i in range(b):
        want = naive_filter(
            logits[i].double().tolist(),
            int(k[i]) if top_k is not None else 0,
            float(p[i]) if top_p is not None else 1.0,
            float(mp[i]) if min_p is not None else 0.0,
        )
        assert got[i].tolist() == pytest.approx(want), f"row {i}"


def test_penalties_match_naive() -> None:
    b, vocab = 6, 30
    logits = torch.randn(b, vocab) * 3
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (0, 3, 7, 12, 1, 5)]
    outputs = [torch.randint(0, vocab, (n,)).tolist() for n in (4, 0, 9, 2, 15, 6)]
    rep = torch.rand(b) * 2 + 0.5
    freq = torch.rand(b) * 4 - 2
    pres = torch.rand(b) * 4 - 2
    prompt_mask = torch.zeros(b, vocab, dtype=torch.bool)
    counts = torch.zeros(b, vocab, dtype=torch.int32)
    for i in range(b):
        prompt_mask[i, prompts[i]] = True
        for t in outputs[i]:
            counts[i, t] += 1
    got = ops.apply_penalties(logits, prompt_mask, counts, rep, freq, pres)
    for i in range(b):
        out_count = Counter(outputs[i])
        for t in range(vocab):
            x = float(logits[i, t])
            if t in prompts[i] or t in out_count:
                x = x / float(rep[i]) if x > 0 else x * float(rep[i])
            x -= float(freq[i]) * out_count[t] + float(pres[i]) * (out_count[t] > 0)
            assert float(got[i, t]) == pytest.approx(x, abs=1e-5)


def test_penalty_exact_values() -> None:
    """Repetition divides positive / multiplies negative seen logits; freq/presence use output only."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    prompt_mask = torch.tensor([[True, False, False, False, False]])
    counts = torch.tensor([[0, 1, 0, 0, 3]], dtype=torch.int32)
    got = ops.apply_penalties(logits, prompt_mask, counts, torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert got.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.5]]
    got = ops.apply_penalties(logits, prompt_mask, counts, torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([0.5]))
    # token 0 is only in the prompt: untouched; token 1: -1 - 0.25 - 0.5; token 4: 1 - 0.75 - 0.5
    assert got.tolist() == [[2.0, -1.75, 0.5, 3.0, -0.25]]


def test_token_bin_counts_and_bias_match_naive() -> None:
    vocab = 12
    seqs = [[1, 1, 5], [], [11, 0, 11, 11]]
    width = max(len(s) for s in seqs)
    padded = torch.tensor([s + [vocab] * (width - len(s)) for s in seqs])
    got = ops.token_bin_counts(padded, vocab)
    for i, s in enumerate(seqs):
        assert got[i].tolist() == [Counter(s)[t] for t in range(vocab)]
    logits = torch.randn(3, vocab)
    r, t, v = torch.tensor([0, 2, 2, 0]), torch.tensor([3, 4, 4, 7]), torch.tensor([1.5, -2.0, 0.5, NEG_INF])
    want = logits.clone()
    for ri, ti, vi in zip(r.tolist(), t.tolist(), v.tolist()):
        want[ri, ti] += vi
    assert torch.equal(ops.apply_token_bias(logits, r, t, v), want)


def test_sample_from_probs_matches_naive() -> None:
    probs = torch.softmax(torch.randn(8, 20), dim=-1)
    noise = torch.empty_like(probs).exponential_()
    got = ops.sample_from_probs(probs, noise).tolist()
    for i in range(8):
        ratios = [float(probs[i, j]) / float(noise[i, j]) for j in range(20)]
        assert got[i] == ratios.index(max(ratios))


def test_exponential_race_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0]).expand(20000, -1)
    tokens = ops.sample_from_probs(probs, torch.empty_like(probs).exponential_())
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert freq[3] == 0
    assert torch.allclose(freq[:3], torch.tensor([0.6, 0.3, 0.1], dtype=torch.double), atol=0.02)


# ---- the Sampler ---------------------------------------------------------------------------


def test_temperature_zero_and_top_k_one_are_argmax() -> None:
    logits = torch.randn(32, 100)
    rows = [row(temperature=0.0) if i % 2 else row(top_k=1, temperature=1.5) for i in range(32)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    single = ops.apply_top_k_top_p_min_p(logits, torch.ones(32, dtype=torch.long), None, None)
    assert torch.isfinite(single).sum(-1).tolist() == [1] * 32


def test_top_k_never_samples_outside_top_k() -> None:
    logits = torch.randn(1, 50) * 0.3  # nearly flat: ignoring top_k would hit other tokens
    allowed = set(logits[0].topk(5).indices.tolist())
    seen = set(draws(logits, 4000, top_k=5))
    assert seen == allowed


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    for p, nucleus in ((0.35, {0}), (0.65, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3})):
        masked = ops.apply_top_k_top_p_min_p(logits, None, torch.tensor([p]), None)
        assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == nucleus
    samples = draws(logits, 6000, top_p=0.65)
    counts = Counter(samples)
    assert set(counts) == {0, 1}
    assert counts[0] / len(samples) == pytest.approx(0.4 / 0.7, abs=0.03)  # renormalised nucleus


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    masked = ops.apply_top_k_top_p_min_p(logits, None, None, torch.tensor([0.2]))  # cutoff 0.1
    assert torch.isfinite(masked[0]).tolist() == [True, True, True, False]
    assert set(draws(logits, 4000, min_p=0.2)) == {0, 1, 2}
    assert set(draws(logits, 4000, min_p=0.5)) == {0, 1}  # cutoff 0.25


def test_higher_temperature_flattens() -> None:
    logits = torch.linspace(0, 6, 30)[None]
    h = [entropy(draws(logits, 4000, temperature=t)) for t in (0.3, 1.0, 3.0)]
    assert h[0] < h[1] < h[2]


def test_repetition_penalty_through_sampler() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    s = Sampler()
    assert s(logits, [row(temperature=0)]).token_ids == [0]
    # 3/2 = 1.5 < 2: a token seen only in the prompt is penalised too
    assert s(logits, [row(prompt=[0], temperature=0, repetition_penalty=2.0)]).token_ids == [1]


def test_frequency_and_presence_use_output_counts_only() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    s = Sampler()
    assert s(logits, [row(output=[0, 0], temperature=0, frequency_penalty=0.6)]).token_ids == [1]  # 5 - 1.2
    assert s(logits, [row(output=[0, 0], temperature=0, frequency_penalty=0.4)]).token_ids == [0]  # 5 - 0.8
    assert s(logits, [row(output=[0], temperature=0, presence_penalty=1.5)]).token_ids == [1]
    assert s(logits, [row(prompt=[0, 0, 0], temperature=0, presence_penalty=2, frequency_penalty=2)]).token_ids == [0]


def test_logit_bias_forces_and_bans() -> None:
    logits = torch.randn(1, 64)
    assert set(draws(logits, 500, logit_bias={7: 100.0})) == {7}
    top = int(logits.argmax())
    got = Sampler()(logits, [row(temperature=0, logit_bias={top: -100.0})]).token_ids[0]
    assert got != top


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    eos, stop = 2, 5
    logits = torch.zeros(1, 10)
    logits[0, eos], logits[0, stop] = 20.0, 19.0
    s = Sampler()

    def pick(output: list[int], **kw: Any) -> list[int]:
        r = row(output=output, min_tokens=3, stop_token_ids=[stop], **kw)
        r.eos_token_ids = {eos}
        return s(logits.expand(300, -1), [r] * 300).token_ids

    assert not {eos, stop} & set(pick([1], temperature=0))
    assert not {eos, stop} & set(pick([1, 1]))
    assert set(pick([1, 1, 1], temperature=0)) == {eos}  # reached min_tokens: no longer blocked


def test_seeded_row_is_independent_of_batch() -> None:
    vocab, steps = 200, 6
    step_logits = [torch.randn(vocab) for _ in range(steps)]
    target = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234)

    def run(batch: int, at: int) -> list[int]:
        mine = row(**target)
        tokens = []
        for logits_row in step_logits:
            others = [
                row(temperature=float(torch.rand(1)) + 0.1, seed=[None, 7, 99][j % 3], top_k=int(torch.randint(0, 20, (1,))))
                for j in range(batch - 1)
            ]
            rows = others[:at] + [mine] + others[at:]
            logits = torch.randn(batch, vocab)
            logits[at] = logits_row
            tokens.append(Sampler()(logits, rows).token_ids[at])
        return tokens

    alone = run(1, 0)
    assert run(9, 4) == alone
    assert run(16, 15) == alone
    other_seed = row(**{**target, "seed": 4321})
    differs = [Sampler()(lg[None], [other_seed]).token_ids[0] for lg in step_logits]
    assert differs != alone  # the seed actually drives the draw


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(5, 40)
    rows = [
        row(logprobs=3, temperature=0.7, repetition_penalty=1.5, output=[1, 2]),
        row(),
        row(logprobs=0, logit_bias={3: 50.0}),
        row(logprobs=20, temperature=0),
        row(logprobs=1, top_k=4),
    ]
    out = Sampler()(logits, rows)
    want = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(float(want[i, tok]), abs=1e-6)
    for i, k in enumerate([3, 0, 0, 20, 1]):
        top = out.top_logprobs[i]
        assert len(top) == k
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        for tok, lp in top:
            assert lp == pytest.approx(float(want[i, tok]), abs=1e-6)
        if k:
            assert top[0][0] == int(logits[i].argmax())
    assert Sampler()(logits, [row() for _ in range(5)]).logprobs is None


def test_compute_logprobs_for_prompt() -> None:
    logits = torch.randn(7, 30)
    prompt_next = torch.randint(0, 30, (7,))
    lp = compute_logprobs(logits, prompt_next, 4)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(lp.token_logprobs, full[torch.arange(7), prompt_next])
    assert torch.allclose(lp.top_logprobs, full.topk(4, -1).values)
    assert torch.equal(lp.top_ids, full.topk(4, -1).indices)
    assert compute_logprobs(logits, prompt_next, 0).top_ids.shape == (7, 0)


def test_tied_logprobs_list_the_greedy_pick_first() -> None:
    """bfloat16 logits tie often: the top list must start with the token greedy picks."""
    logits = torch.zeros(3, 200)
    ties = [[150, 7, 42, 199], [3, 2, 1, 0], list(range(100, 120))]
    for row, ids in enumerate(ties):
        logits[row, ids] = 5.0
    greedy = ops.sampling.argmax_rows(logits)
    lp = compute_logprobs(logits, greedy, 3)
    assert lp.top_ids[:, 0].tolist() == greedy.tolist() == [7, 0, 100]
    assert lp.top_ids.tolist() == [[7, 42, 150], [0, 1, 2], [100, 101, 102]]


def test_skips_unneeded_stages_and_leaves_input_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise AssertionError("stage should have been skipped")

    for name in ("apply_penalties", "apply_top_k_top_p_min_p", "apply_token_bias", "sample_from_probs"):
        monkeypatch.setattr(sampler_mod.sops, name, boom)
    logits = torch.randn(4, 16)
    before = logits.clone()
    assert Sampler()(logits, [row(temperature=0) for _ in range(4)]).token_ids == logits.argmax(-1).tolist()
    monkeypatch.undo()
    Sampler()(logits, [row(repetition_penalty=1.3, top_p=0.5, logit_bias={1: 2.0}, output=[1]) for _ in range(4)])
    assert torch.equal(logits, before)


def test_mixed_batch_and_half_precision() -> None:
    logits = torch.randn(6, 32).to(torch.bfloat16)
    rows = [row(temperature=0), row(top_k=3), row(top_p=0.5), row(min_p=0.3), row(temperature=0), row(seed=3)]
    out = Sampler()(logits, rows)
    assert len(out.token_ids) == 6
    assert out.token_ids[0] == int(logits[0].float().argmax())
    assert out.token_ids[4] == int(logits[4].float().argmax())
    assert out.token_ids[1] in logits[1].float().topk(3).indices.tolist()
