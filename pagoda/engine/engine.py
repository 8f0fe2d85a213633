"""Engine: the step loop that ties scheduler, model runner, sampler and outputs together.

Synchronous and single-threaded by design: LLM drives it directly, AsyncEngine runs
it on its own thread. One ``step()`` = schedule, one forward over the ragged batch,
sample, update, detokenize and stop-check.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.cache.page_allocator import PageAllocator
from pagoda.config import EngineConfig
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.request import Request
from pagoda.engine.sampler import Sampler, SamplingRow, compute_logprobs, make_generator
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.models.loader import LoadedModel, load_model, resolve_dtype
from pagoda.platforms import get_platform
from pagoda.tokenizer import IncrementalDetokenizer, load_tokenizer

if TYPE_CHECKING:
    from pagoda.structured.backend import StructuredBackend

log = logging.getLogger("pagoda.engine")

GiB = 1 << 30


@dataclass
class EngineStats:
    """A snapshot for metrics and tests."""

    num_running: int
    num_waiting: int
    kv_pages_total: int
    kv_pages_free: int
    kv_pages_cached: int
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    generation_tokens: int
    num_preemptions: int

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_pages_free / self.kv_pages_total


class Engine:
    def __init__(self, config: EngineConfig, show_progress: bool = False) -> None:
        self.config = config
        self.platform = get_platform(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.platform.seed(config.seed)
        self.loaded: LoadedModel = load_model(config, self.platform, show_progress)
        log.info(
            "model: %s, %.2f GiB of weights (%s), loaded in %.1f s",
            self.loaded.config.architecture, self.loaded.weight_bytes / GiB, self.loaded.quantization or self.loaded.dtype,
            self.loaded.load_seconds,
        )
        self.model_config = self.loaded.config
        self.context_length = self.loaded.context_length
        self.tokenizer = self._load_tokenizer()
        self.eos_ids = self._eos_ids()
        self._init_kv_cache()
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.context_length)
        self.groups: dict[str, list[Request]] = {}
        self.prompts: dict[str, str | None] = {}
        self.generation_tokens = 0
        self._ids = itertools.count()
        self._structured: StructuredBackend | None = None
        self._structured_lock = threading.Lock()

    # ---- set-up ----------------------------------------------------------------------

    def _load_tokenizer(self):
        source = self.config.tokenizer or self.loaded.path
        if source is None:
            return None  # dummy weights from a bare config: token-id prompts only
        tok = load_tokenizer(source, self.loaded.read_gguf)
        if self.config.chat_template:
            try:
                with open(self.config.chat_template) as f:
                    tok.chat_template = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read chat template {self.config.chat_template!r}: {e.strerror}") from None
        return tok

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_id)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_token_ids)
        return frozenset(ids)

    @property
    def structured(self) -> "StructuredBackend":
        """The grammar backend, built on the first constrained request (xgrammar reads the vocabulary)."""
        if self._structured is None:
            with self._structured_lock:
                if self._structured is None:
                    from pagoda.structured.backend import StructuredBackend

                    self._structured = StructuredBackend(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        return self._structured

    def _init_kv_cache(self) -> None:
        cfg, mc = self.config, self.model_config
        dtype = self.kv_cache_dtype()
        per_token = KVPool.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, dtype)
        if cfg.kv_cache_memory is not None:
            budget = int(cfg.kv_cache_memory * GiB)
        else:
            budget = self.platform.kv_cache_budget()
        per_page = per_token * cfg.page_size
        max_useful = cfg.max_running_requests * self.context_length + cfg.page_size
        num_pages = min(budget, max_useful * per_token) // per_page
        if num_pages < 2:
            raise ConfigError(
                f"KV cache budget {budget / GiB:.3f} GiB holds fewer than 2 pages of {cfg.page_size} tokens "
                f"({per_page} bytes each); raise --kv-cache-memory"
            )
        self.allocator = PageAllocator(num_pages, cfg.page_size)
        self.kv_pool = KVPool(
            mc.num_hidden_layers, self.allocator.num_storage_pages, cfg.page_size, mc.num_key_value_heads,
            mc.head_dim, dtype, self.platform.device(), self.platform.alloc_streamed,
        )
        self.kv_tokens = num_pages * cfg.page_size
        self.runner = ModelRunner(self.loaded.model, self.kv_pool, self.platform.device())
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running_requests=cfg.max_running_requests,
                max_batched_tokens=cfg.max_batched_tokens or self.platform.step_token_budget(),
                chunked_prefill_size=cfg.chunked_prefill_size,
                enable_prefix_cache=not cfg.disable_prefix_cache,
            ),
            self.allocator,
        )
        log.info(
            "KV cache: %d tokens in %d pages (%.2f GiB, %s)", self.kv_tokens, num_pages, num_pages * per_page / GiB,
            str(dtype).removeprefix("torch."),
        )

    def kv_cache_dtype(self) -> torch.dtype:
        name = self.config.kv_cache_dtype
        if name == "auto":
            return torch.bfloat16 if self.loaded.quantization else self.loaded.dtype
        return torch.int8 if name == "int8" else resolve_dtype(name, self.platform)

    # ---- requests --------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        prompt_text = prompt if isinstance(prompt, str) else None
        self.enqueue(request_id, self.make_requests(request_id, prompt, params, priority), prompt_text)

    def make_requests(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> list[Request]:
        """Tokenize and validate into the n sequences of one request (no engine state touched,
        so a frontend may call it on its own thread and report errors before queueing)."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        max_tokens = self._check_lengths(prompt_ids, params)
        vocab = self.model_config.vocab_size
        params.validate_token_ids(vocab)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        grammar = None
        if params.structured is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured output needs a tokenizer; this model has none",
                                          params.structured.kind)
            grammar = self.structured.compile(params.structured)
        group: list[Request] = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            req = Request(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_ids=prompt_ids,
                params=params,
                max_tokens=max_tokens,
                eos_ids=self.eos_ids,
                priority=priority,
                index=i,
                group_id=request_id,
                leader=group[0] if group else None,
                generator=make_generator(seed, self.platform.device()),
                grammar=None if grammar is None else self.structured.new_state(grammar),
            )
            if self.tokenizer is not None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            group.append(req)
        return group

    def enqueue(self, request_id: str, group: list[Request], prompt: str | None) -> None:
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        self.groups[request_id] = group
        self.prompts[request_id] = prompt
        for req in group:
            self.scheduler.add(req)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids", "prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    def _check_lengths(self, prompt_ids: list[int], params: SamplingParams) -> int:
        ctx = self.context_length
        if len(prompt_ids) >= ctx:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {ctx}; "
                "leave room for at least one generated token",
                "prompt",
            )
        room = min(ctx, self.kv_tokens) - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(prompt_ids) + max_tokens > ctx:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context length "
                f"({ctx})",
                "max_tokens",
            )
        if self.scheduler.pages_needed(len(prompt_ids) + max_tokens) > self.allocator.num_pages:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) can never fit in the KV cache "
                f"({self.kv_tokens} tokens); raise --kv-cache-memory",
                "max_tokens",
            )
        return max_tokens

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self.groups.get(request_id)
        if group is None:
            return None
        for req in group:
            if not req.finished:
                self.scheduler.abort(req)
                self._finish(req, "abort")
        return self._pop_output(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ---- the step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        result = self.runner.run(out.chunks)
        self._record_prompt_logprobs(out, result.all_logits)
        sampled = self._sample(out, result.last_logits)
        logprob_of = {id(c.request): lp for c, (_, lp) in zip(out.chunks, sampled)}
        touched: dict[str, None] = {}
        for req in self.scheduler.update(out, [t for t, _ in sampled]):
            self.generation_tokens += 1
            reason = self.outputs.on_token(req, req.output_ids[-1], logprob_of[id(req)])
            if reason is not None:
                self.scheduler.finish(req)
                self._finish(req, reason)
            touched[req.group_id] = None
        return [self._pop_output(gid) if self._group_done(gid) else self._output(gid) for gid in touched]

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> list[tuple[int | None, TokenLogprob | None]]:
        rows_idx = [i for i, c in enumerate(out.chunks) if c.completes]
        result: list[tuple[int | None, TokenLogprob | None]] = [(None, None)] * len(out.chunks)
        if not rows_idx:
            return result
        rows = [
            SamplingRow(
                params=c.request.params,
                prompt_ids=c.request.prompt_ids,
                output_ids=c.request.output_ids,
                generator=c.request.generator,
                eos_token_ids=c.request.eos_ids,
                grammar=c.request.grammar,
            )
            for c in (out.chunks[i] for i in rows_idx)
        ]
        # all rows complete in a decode step: no copy of the [batch, vocab] logits
        sampled = self.sampler(logits if len(rows_idx) == len(logits) else logits[rows_idx], rows)
        for j, i in enumerate(rows_idx):
            lp = None
            if rows[j].params.logprobs is not None:
                lp = TokenLogprob(sampled.token_ids[j], sampled.logprobs[j], sampled.top_logprobs[j])
            result[i] = (sampled.token_ids[j], lp)
        return result

    def _record_prompt_logprobs(self, out: SchedulerOutput, all_logits: dict[int, torch.Tensor]) -> None:
        for i, logits in all_logits.items():
            chunk = out.chunks[i]
            req = chunk.request
            if chunk.start == 0:
                req.prompt_logprobs = [None]
            targets = req.prompt_ids[chunk.start + 1 : chunk.start + chunk.num_tokens + 1]
            if not targets:
                continue
            lp = compute_logprobs(logits[: len(targets)], torch.tensor(targets), req.params.prompt_logprobs)
            for t in range(len(targets)):
                top = list(zip(lp.top_ids[t].tolist(), lp.top_logprobs[t].tolist()))
                req.prompt_logprobs.append(TokenLogprob(targets[t], float(lp.token_logprobs[t]), top))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.finish_time = time.monotonic()

    def _group_done(self, gid: str) -> bool:
        return all(r.finished for r in self.groups[gid])

    def _output(self, gid: str) -> RequestOutput:
        return self.outputs.build(self.groups[gid], self.prompts[gid])

    def _pop_output(self, gid: str) -> RequestOutput:
        output = self._output(gid)
        del self.groups[gid], self.prompts[gid]
        return output

    # ---- introspection ---------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_pages_total=self.allocator.num_pages,
            kv_pages_free=self.allocator.num_free(),
            kv_pages_cached=s.tree.cached_pages(),
            prompt_tokens_computed=s.prompt_tokens_computed,
            prompt_tokens_cached=s.prompt_tokens_cached,
            generation_tokens=self.generation_tokens,
            num_preemptions=s.num_preemptions,
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

