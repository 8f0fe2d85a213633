"""The step cost model on its own: chunk sizing by time, and calibration from timed forwards."""

from __future__ import annotations

import pytest

from pagoda.config import EngineConfig
from pagoda.engine.step_cost import MIN_CHUNK, StepBudget, StepCost, attention_pairs, calibrate
from pagoda.errors import ConfigError

TRUTH = StepCost(per_token_ms=0.4, per_pair_ms=2e-4, fixed_ms=12.0)


def test_attention_pairs_count_the_causal_context() -> None:
    assert attention_pairs(0, 1) == 1
    assert attention_pairs(0, 3) == 1 + 2 + 3
    assert attention_pairs(100, 2) == 101 + 102


def test_fit_is_the_longest_chunk_within_the_time() -> None:
    for start in (0, 100, 30_000):
        for ms in (1, 40, 250, 2500):
            n = TRUTH.fit(start, ms)
            assert TRUTH.chunk_ms(start, n) <= ms < TRUTH.chunk_ms(start, n + 1), (start, ms, n)
    assert TRUTH.fit(0, 0) == TRUTH.fit(0, -5) == 0
    assert StepCost(per_token_ms=0.5, per_pair_ms=0, fixed_ms=0).fit(1000, 10) == 20


def test_step_budget_cuts_to_the_time_left_never_below_the_minimum() -> None:
    step = StepBudget(TRUTH, max_ms=250)
    assert step.cap(0, 100) == 100  # fits whole
    n = step.cap(0, 4096)
    assert MIN_CHUNK < n < 4096 and TRUTH.fixed_ms + TRUTH.chunk_ms(0, n) <= 250
    step.spend(0, n)
    assert step.cap(n, 4096) == MIN_CHUNK  # the step is full: a later prompt still progresses
    for off in (StepBudget(TRUTH, max_ms=0), StepBudget(None, max_ms=250)):
        off.spend(30_000, 512)
        assert off.cap(30_000, 512) == 512


def test_a_budget_is_kept_only_if_a_minimum_chunk_fits() -> None:
    minimal = TRUTH.fixed_ms + TRUTH.chunk_ms(0, MIN_CHUNK)
    assert TRUTH.keeps(minimal) and not TRUTH.keeps(minimal - 0.01)


def test_calibrate_recovers_a_linear_step_within_the_context() -> None:
    shapes = []

    def time_chunk(n: int, start: int) -> float:
        shapes.append((n, start))
        return TRUTH.fixed_ms + TRUTH.chunk_ms(start, n)

    for context_length in (8192, 128):
        shapes.clear()
        got = calibrate(time_chunk, context_length)
        assert got.per_token_ms == pytest.approx(TRUTH.per_token_ms)
        assert got.per_pair_ms == pytest.approx(TRUTH.per_pair_ms)
        assert got.fixed_ms == pytest.approx(TRUTH.fixed_ms)
        assert all(n + start <= context_length for n, start in shapes), shapes


def test_calibrate_keeps_the_fastest_timing_and_no_negative_cost() -> None:
    seen: set[tuple[int, int]] = set()

    def first_call_slow(n: int, start: int) -> float:  # a warm-up, or a neighbour's burst
        slow = (n, start) not in seen
        seen.add((n, start))
        return TRUTH.fixed_ms + TRUTH.chunk_ms(start, n) + (1000.0 if slow else 0.0)

    assert calibrate(first_call_slow, 8192).per_pair_ms == pytest.approx(TRUTH.per_pair_ms)
    flat = calibrate(lambda n, start: 5.0, 8192)  # nothing measurable: all of it per step
    assert (flat.per_token_ms, flat.per_pair_ms, flat.fixed_ms) == (0.0, 0.0, 5.0)
    noisy = calibrate(lambda n, start: 50.0 - n / 100, 8192)  # longer chunks "faster"
    assert noisy.per_token_ms == 0.0 and noisy.per_pair_ms == 0.0 and noisy.fixed_ms > 0


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), "fast", True])
def test_a_bad_step_budget_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match=r"max_step_ms must be a number of milliseconds >= 0 \(0: no time budget"):
        EngineConfig(max_step_ms=bad)
    assert EngineConfig(max_step_ms=0).max_step_ms == 0
    assert EngineConfig(max_step_ms=125.5).max_step_ms == 125.5
