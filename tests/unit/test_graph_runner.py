"""Decode graphs: buckets, padding and static buffers, checked on a CPU with the EagerGraph
stand-in (replay reruns the captured step over the same static buffers). Generation with
graphs must equal generation without them, token for token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.engine.graph_runner import EagerGraph, graph_buckets
from pagoda.ops import ForwardBatch
from pagoda.ops.sdpa import paged_attention_sdpa


def test_buckets() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(10) == [1, 2, 4, 8, 10]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]


class CountingGraph(EagerGraph):
    replays = 0

    def replay(self) -> None:
        CountingGraph.replays += 1
        super().replay()


def _generate(tiny_config_path, graphs: bool, quantization: str | None):
    llm = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, quantization=quantization,
              max_running_requests=16)
    if graphs:  # what the engine does on a platform with graphs, with the CPU stand-in
        engine = llm.engine
        engine.runner.capture_graphs(6, engine.scheduler.pages_needed(engine.context_length), CountingGraph)
    prompts = [[5 + i, 6, 7, 8 + 3 * i] for i in range(9)]  # 9 sequences: above the largest bucket at first
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(9)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_graphs_generate_what_eager_steps_do(tiny_config_path, quantization) -> None:
    eager = _generate(tiny_config_path, False, quantization)
    CountingGraph.replays = 0
    with_graphs = _generate(tiny_config_path, True, quantization)
    assert CountingGraph.replays > 10  # decode steps of 6 or fewer sequences replayed a graph
    assert with_graphs == eager


def test_static_sdpa_decode_equals_the_sized_one() -> None:
    """A graph's batch spans its whole block table, masked by the device's lengths."""
    g = torch.Generator().manual_seed(0)
    page, hk, d = 4, 2, 16
    k_cache, v_cache = (torch.randn(40 * page, hk, d, generator=g) for _ in range(2))
    batch = ForwardBatch.build([([1], 6, [3, 7]), ([2], 1, [9]), ([3], 12, [1, 2, 4, 5])], page, torch.device("cpu"))
    q = torch.randn(3, 6, d, generator=g)
    wide = torch.zeros(3, 10, dtype=torch.long)
    wide[:, : batch.block_table.shape[1]] = batch.block_table
    static = dataclasses.replace(batch, block_table=wide, static=True, seq_lens=[1, 1, 1], _views={})
    torch.testing.assert_close(paged_attention_sdpa(q, k_cache, v_cache, static, d**-0.5),
                               paged_attention_sdpa(q, k_cache, v_cache, batch, d**-0.5))
