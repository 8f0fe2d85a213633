"""The scheduler on its own: no model, no tensors — page ids and token counts only."""

from __future__ import annotations

from pagoda.cache.page_allocator import PageAllocator
from pagoda.engine.request import Request, Status
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler, SchedulerConfig


def make(num_pages=64, page_size=4, budget=32, chunk=8, running=8, cache=True) -> Scheduler:
    cfg = SchedulerConfig(max_running_requests=running, max_batched_tokens=budget, chunked_prefill_size=chunk,
                          enable_prefix_cache=cache)
    return Scheduler(cfg, PageAllocator(num_pages, page_size))


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
