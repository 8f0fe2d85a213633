"""The scheduler on its own: no model, no tensors — page ids and token counts only."""

from __future__ import annotations

from pagoda.cache.page_allocator import PageAllocator
from pagoda.engine.request import Request, Status
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler, SchedulerConfig
from pagoda.engine.step_cost import MIN_CHUNK, StepCost

# A forced cost model: under 50 ms a step holds a chunk of ~290 tokens at the start of a prompt, of
# 32 (the minimum) from ~1.4K tokens of context on.
COST = StepCost(per_token_ms=0.02, per_pair_ms=1e-3, fixed_ms=2.0)


def make(num_pages=64, page_size=4, budget=32, chunk=8, running=8, cache=True, step_ms=0.0,
         cost=None) -> Scheduler:
    cfg = SchedulerConfig(max_running_requests=running, max_batched_tokens=budget, chunked_prefill_size=chunk,
                          enable_prefix_cache=cache, max_step_ms=step_ms)
    return Scheduler(cfg, PageAllocator(num_pages, page_size), step_cost=cost)


def req(rid: str, n: int, priority: int = 0, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=8), max_tokens=8, priority=priority)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update(out, [token if c.completes else None for c in out.chunks])
    return out


def test_budget_and_chunking() -> None:
    s = make(budget=20, chunk=8)
    for i in range(3):
        s.add(req(f"r{i}", 30, start=100 * i))
    out = s.schedule()
    assert sum(c.num_tokens for c in out.chunks) <= 20
    assert all(c.num_tokens <= 8 for c in out.chunks)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1", "r2"]


def test_decodes_are_scheduled_before_new_prefills() -> None:
    s = make(budget=10, chunk=0)
    s.add(req("a", 5))
    run_step(s)  # a prefilled, got its first token
    s.add(req("b", 40, start=50))
    out = s.schedule()
    assert out.chunks[0].request.request_id == "a" and out.chunks[0].num_tokens == 1
    assert out.chunks[1].num_tokens == 9  # the rest of the budget, even without chunking


def test_running_cap_and_priority() -> None:
    s = make(running=2, budget=100)
    s.add(req("low", 4, priority=5))
    s.add(req("first", 4, priority=0, start=10))
    s.add(req("second", 4, priority=1, start=20))
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["first", "second"]
    assert [r.request_id for r in s.waiting] == ["low"]


def test_out_of_pages_preempts_youngest_and_conserves_pages() -> None:
    s = make(num_pages=6, page_size=4, budget=64, chunk=0, cache=False)
    a, b = req("a", 10), req("b", 10, start=50)
    s.add(a)
    s.add(b)
    run_step(s)
    assert a.status is Status.RUNNING and b.status is Status.RUNNING  # 3 + 3 pages
    for _ in range(3):
        run_step(s)  # a needs a 4th page at 12 tokens: b (younger) is preempted
    assert b.status is Status.WAITING and b.num_preemptions == 1 and b.pages == []
    assert s.allocator.num_free() + sum(len(r.own_pages) for r in s.running) == 6
    for r in list(s.running):
        s.finish(r)
    s.check_integrity()


def test_abort_frees_pages_at_once() -> None:
    s = make()
    r = req("a", 20)
    s.add(r)
    run_step(s)
    assert s.allocator.num_free() < 64
    s.abort(r)
    s.check_integrity()
    assert s.allocator.num_free() + s.tree.cached_pages() == 64


def prefill_beside_a_decode(step_ms: float, prompt_len: int = 3000) -> list[dict[str, object]]:
    """Each step's chunks (request id -> chunk) while `doc` is prefilled and `a` decodes."""
    s = make(num_pages=2048, page_size=16, budget=1024, chunk=512, step_ms=step_ms, cost=COST)
    s.add(req("a", 10))
    run_step(s)  # a decodes from here on
    doc = req("doc", prompt_len, start=1000)
    s.add(doc)
    steps = []
    while doc.in_prefill:
        steps.append({c.request.request_id: c for c in run_step(s).chunks})
    return steps


def test_time_budget_cuts_long_context_chunks_and_decodes_keep_their_token() -> None:
    steps = prefill_beside_a_decode(step_ms=50)
    sizes = [step["doc"].num_tokens for step in steps]
    assert sum(sizes) == 3000
    for step in steps:
        assert step["a"].num_tokens == 1  # a token in every step
        predicted = COST.fixed_ms + sum(COST.chunk_ms(c.start, c.num_tokens) for c in step.values())
        assert predicted <= 50 or step["doc"].num_tokens == MIN_CHUNK, (predicted, step["doc"].num_tokens)
    # the longer the context, the shorter the chunk, down to the minimum that keeps it moving
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
    assert MIN_CHUNK < sizes[0] < 512 and sizes[-2] == MIN_CHUNK and min(sizes) > 0


def test_step_budget_zero_keeps_token_chunking() -> None:
    steps = prefill_beside_a_decode(step_ms=0)
    assert [step["doc"].num_tokens for step in steps] == [512] * 5 + [3000 - 5 * 512]
    assert all(step["a"].num_tokens == 1 for step in steps)


def test_a_new_prompt_progresses_when_the_step_is_full() -> None:
    s = make(num_pages=2048, page_size=16, budget=1024, chunk=512, step_ms=50, cost=COST)
    s.add(req("a", 10, start=9000))
    run_step(s)  # a decodes from here on
    doc = req("doc", 3000)
    s.add(doc)
    while doc.num_computed < 2000:
        run_step(s)
    s.add(req("b", 100, start=5000))
    chunks = {c.request.request_id: c.num_tokens for c in run_step(s).chunks}
    assert chunks == {"a": 1, "doc": MIN_CHUNK, "b": MIN_CHUNK}


def test_a_prompt_with_no_stream_waiting_takes_whole_chunks() -> None:
    s = make(num_pages=2048, page_size=16, budget=1024, chunk=512, step_ms=50, cost=COST)
    doc = req("doc", 3000)
    s.add(doc)
    sizes = []
    while doc.in_prefill:
        sizes.append(run_step(s).chunks[0].num_tokens)
    assert sizes == [512] * 5 + [3000 - 5 * 512]  # nobody decodes: the budget would only slow the prompt


def test_cached_prefixes_are_evicted_before_cold_pages_are_taken() -> None:
    """With pages past the warm ones (never written: a first write costs ~1 ms a page on the CPU
    VMs), a new prompt reuses the least recently used cached prefix's pages rather than taking
    cold ones; what no eviction can free comes from cold pages (the warm part grows), and a
    prompt cached for sharing while its request still runs stays cached."""
    cfg = SchedulerConfig(max_running_requests=8, max_batched_tokens=64, chunked_prefill_size=0,
                          enable_prefix_cache=True, max_step_ms=0.0)
    s = Scheduler(cfg, PageAllocator(16, 4, warm_pages=6))
    a = req("a", 12)
    s.add(a)
    run_step(s)
    s.finish(a)  # its 3 full pages of prompt stay cached
    assert s.tree.evictable_pages() == 3 and s.allocator.num_cold_free() == 10
    b = req("b", 16, start=100)  # 4 pages: the 3 warm free ones, then 1 of a's cached prefix
    s.add(b)
    run_step(s)
    assert s.allocator.num_cold_free() == 10
    c = req("c", 24, start=200)  # 6 pages, and b's next token 1: a's last 2 cached ones, then 5 cold
    s.add(c)
    run_step(s)
    assert s.allocator.num_cold_free() == 5 and {1, 2} <= set(b.pages + c.pages)
    assert s.tree.match_prefix(list(range(100, 116))).num_tokens == 12  # b's prompt, still shared
    for r in list(s.running):
        s.finish(r)
    s.check_integrity()
