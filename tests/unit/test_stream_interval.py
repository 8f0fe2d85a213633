"""Engine.stream_interval: a request's outputs gather tokens when outputs would cost the server
a large share of a fast step; its first token and its end always go out at once."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError


def _outputs_per_request(llm: LLM, n: int = 4, tokens: int = 9) -> tuple[list[list[int]], list[list[int]]]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [engine.new_request_id() for _ in range(n)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [5 + i, 6, 7], params)
    deltas: dict[str, list[list[int]]] = {rid: [] for rid in ids}
    final: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id].append(out.outputs[0].delta_token_ids)
            final[out.request_id] = out.outputs[0].token_ids
    return [deltas[r] for r in ids], [final[r] for r in ids]


def test_fixed_interval_batches_deltas_and_loses_nothing(tiny_config_path) -> None:
    every, every_final = _outputs_per_request(LLM(model_config=str(tiny_config_path), load_format="dummy",
                                                  stream_interval=1))
    paced, paced_final = _outputs_per_request(LLM(model_config=str(tiny_config_path), load_format="dummy",
                                                  stream_interval=4))
    assert paced_final == every_final and all(len(f) == 9 for f in paced_final)
    for per_step, grouped in zip(every, paced):
        assert [len(d) for d in per_step] == [1] * 9
        assert [len(d) for d in grouped] == [1, 4, 4]  # the first token at once, then 4 at a time, the end
        assert sum(grouped, []) == sum(per_step, [])


def test_auto_is_one_token_while_steps_are_slow_and_more_when_fast(tiny_config_path) -> None:
    engine = LLM(model_config=str(tiny_config_path), load_format="dummy").engine
    engine.scheduler.running.extend([object()] * 256)  # only counted
    engine._step_s = 0.5  # a CPU-sized step: 256 outputs are a small share of it
    assert engine.stream_interval() == 1
    engine._step_s = 0.01  # a GPU-sized step: 256 outputs would cost more than the step
    assert engine.stream_interval() > 4
    engine.scheduler.running.clear()


def test_negative_interval_is_refused(tiny_config_path) -> None:
    with pytest.raises(ConfigError, match="stream_interval"):
        LLM(model_config=str(tiny_config_path), load_format="dummy", stream_interval=-1)
