"""Scheduler: continuous batching with chunked prefill, prefix sharing and preemption.

Contract (as vLLM's): ``schedule()`` picks this step's work under a token budget and
returns chunks (request, number of tokens); ``update(out, tokens)`` advances the
requests after the forward. It never touches tensors, only page ids, so it is tested
on a CPU without a model.

Each step: running requests first (decodes and continuing prefill chunks), then
waiting requests in (priority, arrival) order while budget, pages and the running cap
allow. With a time budget (``max_step_ms``) and a cost model of the step (step_cost.py),
while a stream decodes each prompt chunk is also cut to the time the step has left, so a chunk over a long
context cannot stall everyone's decode; decodes always get their token. When pages run
out the lowest-priority, youngest running request is preempted: its computed pages go to
the radix tree, its own references are dropped, and it is recomputed later (usually as a
prefix-cache hit).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from pagoda.cache.page_allocator import PageAllocator
from pagoda.cache.radix_tree import RadixTree
from pagoda.engine.request import Request, Status
from pagoda.engine.step_cost import StepBudget, StepCost


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int
    max_batched_tokens: int
    chunked_prefill_size: int  # 0: no chunking beyond the step budget
    enable_prefix_cache: bool = True
    max_step_ms: float = 0.0  # predicted milliseconds a step may take (0: bounded in tokens only)


@dataclass
class ScheduledChunk:
    request: Request
    start: int
    num_tokens: int  # including the draft
    draft: list[int] = field(default_factory=list)  # speculative decoding: proposed tokens after the last one

    @property
    def token_ids(self) -> list[int]:
        """The tokens the forward computes: known ones, then the proposal to verify."""
        known = self.num_tokens - len(self.draft)
        return self.request.all_ids[self.start : self.start + known] + self.draft

    @property
    def completes(self) -> bool:
        """After this chunk the request's last known token is computed: sample its next one."""
        return self.start + self.num_tokens - len(self.draft) == self.request.num_tokens

    @property
    def wants_all_logits(self) -> bool:
        """A prompt chunk of a request that asked for prompt logprobs, or a speculating decode (its
        verification needs the logits after each proposed token): logits for every token."""
        return bool(self.draft) or (self.request.params.prompt_logprobs is not None and self.request.in_prefill)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class AdapterSlots(Protocol):
    """The LoRA adapter pool as the scheduler sees it: a running request pins its adapter's slot."""

    def acquire(self, name: str) -> int | None: ...  # the slot, or None while every slot is pinned

    def release(self, name: str) -> None: ...


# Prefix-cache keys of an adapter's requests are salted with its uid (token ids are below 2^32),
# so two adapters, or an adapter and the base model, never share KV pages.
_LORA_SALT = 1 << 32


def _order(req: Request) -> tuple[int, float]:
    return (req.priority, req.arrival)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, lora: AdapterSlots | None = None,
                 step_cost: StepCost | None = None) -> None:
        """``step_cost`` predicts a step's time for ``config.max_step_ms`` (None: no time budget)."""
        self.config = config
        self.lora = lora
        self.step_cost = step_cost
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.tree = RadixTree(allocator, enabled=config.enable_prefix_cache)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.prompt_tokens_computed = 0
        self.prompt_tokens_cached = 0
        self.num_preemptions = 0

    # ---- queue -----------------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        bisect.insort(self.waiting, req, key=_order)

    def pages_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self.finish(req)

    def finish(self, req: Request) -> None:
        """Release a finished request's pages (its computed full pages stay in the prefix cache)."""
        if req in self.running:
            self.running.remove(req)
            self._release(req)
        req.status = Status.FINISHED

    # ---- one step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        # The time budget protects decoding streams: with none running, a prompt takes whole chunks
        # (small chunks cost the prompt throughput: every chunk re-reads the whole context).
        decoding = any(not r.in_prefill for r in self.running)
        step_time = StepBudget(self.step_cost if decoding else None, self.config.max_step_ms)
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted earlier in this loop
                continue
            n = self._chunk_len(req, req.num_computed, budget, step_time)
            draft, req.draft = req.draft[: budget - 1] if n == 1 else [], []
            # a proposal only takes free (or evictable) pages: it never preempts anyone
            if draft and not self._grow(req, req.num_computed + 1 + len(draft)):
                draft = []
            while not self._grow(req, req.num_computed + n):
                victim = self._pick_victim(exclude=out)
                self._preempt(victim, out)
                if victim is req:
                    break
            if req in self.running:
                out.chunks.append(ScheduledChunk(req, req.num_computed, n + len(draft), draft))
                budget -= n + len(draft)
                step_time.spend(req.num_computed, n + len(draft))
        self._admit_waiting(out, budget, step_time)
        return out

    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Request]:
        """Advance each chunk; append its sampled token where the chunk completed the sequence.

        Returns the requests that got a new token (the engine then checks stop conditions).
        """
        advanced = []
        for chunk, token in zip(out.chunks, sampled):
            req = chunk.request
            if req.status is not Status.RUNNING:
                continue
            self.advance(chunk)
            if chunk.completes and token is not None:
                self.append(req, token)
                advanced.append(req)
        return advanced

    def advance(self, chunk: ScheduledChunk) -> None:
        """The chunk's known tokens are computed (a proposal's only once verified: see append)."""
        req = chunk.request
        req.num_computed = chunk.start + chunk.num_tokens - len(chunk.draft)
        if not req.in_prefill and not req.prompt_cached_in_tree:
            self._cache_prompt(req)

    def append(self, req: Request, token: int, after_verified: bool = False) -> None:
        """Append a sampled token. after_verified: the token before it was an accepted proposal,
        whose KV this step computed, so it counts as computed now."""
        if after_verified:
            req.num_computed += 1
        req.output_ids.append(token)

    def trim(self, req: Request) -> None:
        """Give back own pages past what the sequence's known tokens need (a rejected proposal's)."""
        keep = max(self.pages_needed(req.num_tokens), req.num_shared_pages)
        if len(req.pages) > keep:
            self.allocator.decref(req.pages[keep:])
            del req.pages[keep:]

    # ---- internals -------------------------------------------------------------------

    def _chunk_len(self, req: Request, start: int, budget: int, step_time: StepBudget) -> int:
        """Tokens of req to compute from `start` this step: a decode's one, or a prompt chunk
        within the chunk size and the step's time, then within the token budget."""
        n = req.num_tokens - start
        if n > 1:
            if self.config.chunked_prefill_size:
                n = min(n, self.config.chunked_prefill_size)
            n = step_time.cap(start, n)
        return min(n, budget)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's page table cover num_tokens, evicting cached prefixes if needed."""
        need = self.pages_needed(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        pages = self._alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _alloc(self, n: int) -> list[int] | None:
        """n pages, evicting cached prefixes (least recently used first) where the free pages are
        too few, and also where they would be cold: a cached prefix that nobody asked for again is
        worth less than a first write to memory in this step (~1 ms per 16-token page on the CPU
        VMs) and the memory it adds to the process. Cold pages are taken once no cached page is
        left to evict, so the warm part of the pool grows to the largest working set."""
        free = self.allocator.num_free()
        warm = free - self.allocator.num_cold_free()
        evict = max(n - free, min(n - warm, self.tree.evictable_pages()))
        if evict > 0:
            self.tree.evict(evict)
        return self.allocator.alloc(n)

    def _pick_victim(self, exclude: SchedulerOutput) -> Request:
        scheduled = {id(c.request) for c in exclude.chunks}
        candidates = [r for r in self.running if id(r) not in scheduled] or self.running
        return max(candidates, key=_order)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        out.chunks = [c for c in out.chunks if c.request is not req]
        req.draft = []
        self._release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        self.add(req)

    def _release(self, req: Request) -> None:
        """Hand computed full pages to the radix tree, drop own references, unpin the prefix."""
        full = req.num_computed // self.page_size
        if full:
            self.tree.insert(self._key(req, req.all_ids[: full * self.page_size]), req.pages[:full])
        self.allocator.decref(req.own_pages)
        if req.prefix_handle is not None:
            self.tree.unlock(req.prefix_handle)
        self._unpin(req)
        req.pages, req.num_shared_pages, req.prefix_handle, req.num_computed = [], 0, None, 0

    def _cache_prompt(self, req: Request) -> None:
        """Once the prompt is computed, share its full pages (n > 1 siblings, concurrent prompts)."""
        req.prompt_cached_in_tree = True
        full = len(req.prompt_ids) // self.page_size
        if not self.tree.enabled or full == 0:
            return
        self.tree.insert(self._key(req, req.prompt_ids[: full * self.page_size]), req.pages[:full])

    @staticmethod
    def _key(req: Request, token_ids: list[int]) -> list[int]:
        """The request's prefix-cache key: its token ids, salted by its adapter."""
        if not req.lora_uid:
            return token_ids
        salt = req.lora_uid * _LORA_SALT
        return [t + salt for t in token_ids]

    def _pin(self, req: Request) -> bool:
        """Pin the request's adapter in a pool slot (False: no slot free now)."""
        if req.lora_name is None:
            return True
        assert self.lora is not None, "a LoRA request reached a scheduler without an adapter pool"
        slot = self.lora.acquire(req.lora_name)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _unpin(self, req: Request) -> None:
        if req.lora_slot >= 0:
            assert self.lora is not None
            self.lora.release(req.lora_name)
            req.lora_slot = -1

    def _blocked(self, req: Request) -> bool:
        """n > 1 siblings wait until the leader's prompt is in the prefix cache."""
        leader = req.leader
        return (
            leader is not None and self.tree.enabled and not leader.finished and not leader.prompt_cached_in_tree
        )

    def _admit_waiting(self, out: SchedulerOutput, budget: int, step_time: StepBudget) -> None:
        for req in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_running_requests:
                return
            if req in out.preempted or self._blocked(req) or not self._pin(req):
                continue
            # prompt logprobs and mean pooling need every prompt position computed, cached or not
            use_cache = self.tree.enabled and req.params.prompt_logprobs is None and req.pooling != "mean"
            match = self.tree.match_prefix(self._key(req, req.all_ids)) if use_cache else None
            if match is not None:
                self.tree.lock(match.handle)
            cached = match.num_tokens if match else 0
            n = self._chunk_len(req, cached, budget, step_time)
            shared = list(match.pages) if match else []
            own = self._alloc(self.pages_needed(cached + n) - len(shared))
            if own is None:
                if match is not None:
                    self.tree.unlock(match.handle)
                self._unpin(req)
                return
            self.waiting.remove(req)
            req.pages, req.num_shared_pages = shared + own, len(shared)
            req.prefix_handle = match.handle if match else None
            req.num_computed = cached
            req.status = Status.RUNNING
            if req.num_preemptions == 0:
                req.num_cached_prompt = min(cached, len(req.prompt_ids))
                self.prompt_tokens_cached += req.num_cached_prompt
                self.prompt_tokens_computed += len(req.prompt_ids) - req.num_cached_prompt
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, cached, n))
            budget -= n
            step_time.spend(cached, n)

    def check_integrity(self) -> None:
        """When idle: every page is free or held by the prefix cache (no leak)."""
        self.tree.check_integrity()
        if not self.running:
            held = self.allocator.num_free() + self.tree.cached_pages()
            assert held == self.allocator.num_pages, f"page leak: {held} of {self.allocator.num_pages} accounted for"
