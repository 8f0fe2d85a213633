"""AsyncEngine: streaming, abort, and an event loop that stays free while the model computes."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagoda import AsyncEngine, SamplingParams
from pagoda.errors import InvalidRequestError


@pytest.fixture(scope="module")
def engine(tiny_config_path):
    eng = AsyncEngine(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, page_size=4)
    yield eng
    eng.shutdown()


def test_streams_match_offline_and_loop_stays_responsive(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.005)

        async def one(i):
            pieces = []
            async for out in engine.generate([i + 1] * (5 + i), params):
                pieces.extend(out.outputs[0].delta_token_ids)
                final = out
            assert final.finished and pieces == final.outputs[0].token_ids
            return pieces

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(8)))
        elapsed = time.perf_counter() - start
        stop = True
        await task
        return results, ticks, elapsed

    results, ticks, elapsed = asyncio.run(main())
    assert all(len(r) == 40 for r in results)
    assert ticks >= elapsed / 0.005 * 0.3  # the loop kept running while the engine worked


def test_abort_frees_pages_and_errors_raise_at_once(engine) -> None:
    async def main():
        stream = await engine.add_request([3] * 30, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                engine.abort(stream.request_id)
        assert out.finished and out.outputs[0].finish_reason == "abort"
        with pytest.raises(InvalidRequestError, match="context length"):
            await engine.add_request([1] * 5000)

    asyncio.run(main())
    deadline = time.time() + 5
    while engine.stats().num_running and time.time() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats.num_running == 0
    assert stats.kv_pages_free + stats.kv_pages_cached == stats.kv_pages_total
