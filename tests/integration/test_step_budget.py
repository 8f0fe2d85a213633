"""--max-step-ms end to end on the tiny random model: the cost model is calibrated at start-up
(on CPU by default, logged once), and cutting prompt chunks by time changes no output."""

from __future__ import annotations

import argparse
import logging
import random

from pagoda import LLM, SamplingParams
from pagoda.cli import _add_engine_options, _engine_config
from pagoda.engine.step_cost import StepCost
from pagoda.platforms import Platform, get_platform

# Forced: under 30 ms a prompt chunk of ~220 tokens fits at position 0, only the minimum from ~900 on.
COST = StepCost(per_token_ms=0.02, per_pair_ms=1e-3, fixed_ms=1.0)


def make_llm(tiny_config_path, **kw) -> LLM:
    return LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, seed=1, **kw)


def test_cpu_calibrates_a_step_budget_at_start_and_logs_it(tiny_config_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pagoda.engine"):
        scheduler = make_llm(tiny_config_path).engine.scheduler
    assert scheduler.config.max_step_ms == get_platform("cpu").step_time_budget_ms() == 250
    assert Platform().step_time_budget_ms() == 0  # accelerators: bounded in tokens, as before
    cost = scheduler.step_cost
    assert min(cost.per_token_ms, cost.per_pair_ms, cost.fixed_ms) >= 0 and cost.per_token_ms + cost.fixed_ms > 0
    logged = [r.getMessage() for r in caplog.records if "step cost" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("step budget 250 ms; step cost (calibrated in "), logged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pagoda.engine"):
        off = make_llm(tiny_config_path, max_step_ms=0).engine.scheduler
    assert off.step_cost is None and off.config.max_step_ms == 0
    assert not [r for r in caplog.records if "step cost" in r.getMessage()]


def test_a_budget_the_host_cannot_keep_is_turned_off_with_a_warning(tiny_config_path, caplog, monkeypatch) -> None:
    import pagoda.engine.engine as engine_module

    busy = StepCost(per_token_ms=1.0, per_pair_ms=0.0, fixed_ms=300.0)  # as if calibrated on a loaded host
    monkeypatch.setattr(engine_module, "calibrate", lambda time_chunk, context_length: busy)
    with caplog.at_level(logging.WARNING, logger="pagoda.engine"):
        scheduler = make_llm(tiny_config_path).engine.scheduler
    assert scheduler.step_cost is None  # token chunking, as without a budget, not 32-token crawling
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["step budget off: a step with a 32-token prompt chunk is predicted to take 332 ms here, "
                      "over --max-step-ms 250 (raise it, or start on a quieter host)"]


def test_the_cli_flag_reaches_the_config() -> None:
    parser = argparse.ArgumentParser()
    _add_engine_options(parser)
    assert _engine_config(parser.parse_args(["--max-step-ms", "120"])).max_step_ms == 120.0
    assert _engine_config(parser.parse_args([])).max_step_ms is None  # the platform's


def test_greedy_output_is_the_same_with_chunks_cut_by_time(tiny_config_path) -> None:
    rng = random.Random(3)
    work = [[rng.randrange(500) for _ in range(n)] for n in (800, 300, 30)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = make_llm(tiny_config_path, max_step_ms=0).generate(work, params, use_tqdm=False)

    llm = make_llm(tiny_config_path, max_step_ms=30)
    scheduler = llm.engine.scheduler
    scheduler.step_cost = COST
    schedule, prompt_chunks = scheduler.schedule, []

    def spy():
        out = schedule()
        prompt_chunks.extend(c.num_tokens for c in out.chunks if c.request.in_prefill)
        return out

    scheduler.schedule = spy
    budgeted = llm.generate(work, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in budgeted] == [o.outputs[0].token_ids for o in reference]
    assert prompt_chunks[0] == 512 and max(prompt_chunks[3:]) < 100  # whole chunks until a stream decodes, then cut
    llm.engine.check_integrity()
