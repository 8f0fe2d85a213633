"""Engine: the step loop that ties scheduler, model runner, sampler and outputs together.

Synchronous and single-threaded by design: LLM drives it directly, AsyncEngine runs
it on its own thread. One ``step()`` = schedule, one forward over the ragged batch,
sample, update, detokenize and stop-check.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.cache.page_allocator import PageAllocator
from pagoda.config import EngineConfig
from pagoda.engine.input_processor import InputLimits, InputProcessor, check_token_ids, load_model_tokenizer
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.request import Request
from pagoda.engine.sampler import Sampler, SamplingRow, compute_logprobs
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagoda.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from pagoda.lora import LoRAAdapter, LoRAManager
from pagoda.models.loader import LoadedModel, load_model, resolve_dtype
from pagoda.platforms import get_platform

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


@dataclass(frozen=True)
class ModelInfo:
    """What frontends may tell clients about the served model."""

    architecture: str
    path: str | None  # the checkpoint, or None for dummy weights from a bare config
    context_length: int
    vocab_size: int
    kv_tokens: int  # tokens the KV cache holds, all sequences together
    has_tokenizer: bool
    has_chat_template: bool


@dataclass(frozen=True)
class KVCacheSize:
    num_pages: int
    bytes_per_page: int
    dtype: torch.dtype


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
        self.tokenizer = load_model_tokenizer(config, self.loaded.path, self.loaded.read_gguf)
        self.lora = self._init_lora()
        self._init_kv_cache()
        self.inputs = InputProcessor(
            self.tokenizer, self.model_config.eos_token_id,
            InputLimits(
                context_length=self.context_length, vocab_size=self.model_config.vocab_size,
                kv_tokens=self.kv_tokens, kv_pages=self.allocator.num_pages,
                pages_needed=self.scheduler.pages_needed, device=self.platform.device(),
            ),
        )
        self.model_info = ModelInfo(
            architecture=self.model_config.architecture,
            path=None if self.loaded.path is None else str(self.loaded.path),
            context_length=self.context_length,
            vocab_size=self.model_config.vocab_size,
            kv_tokens=self.kv_tokens,
            has_tokenizer=self.tokenizer is not None,
            has_chat_template=self.tokenizer is not None and bool(self.tokenizer.chat_template),
        )
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.context_length)
        self.groups: dict[str, list[Request]] = {}
        self.prompts: dict[str, str | None] = {}
        self.generation_tokens = 0
        self._ids = itertools.count()

    # ---- set-up ----------------------------------------------------------------------

    def _init_kv_cache(self) -> None:
        """Size the KV cache, then build its pages, the model runner over them and the scheduler."""
        size = self._size_kv_cache()
        self._build_kv_pool(size)
        self.runner = ModelRunner(self.loaded.model, self.kv_pool, self.platform.device())
        self.scheduler = self._build_scheduler()
        log.info(
            "KV cache: %d tokens in %d pages (%.2f GiB, %s)", self.kv_tokens, size.num_pages,
            size.num_pages * size.bytes_per_page / GiB, str(size.dtype).removeprefix("torch."),
        )

    def _init_lora(self) -> LoRAManager | None:
        """The adapter pool (only when LoRA is enabled: otherwise no slot memory, no hook work),
        with the adapters named at start."""
        cfg = self.config
        if not cfg.lora_enabled:
            return None
        lora = LoRAManager(self.loaded.model, cfg.max_loras, cfg.max_lora_rank)
        for name, path in cfg.lora_adapters():
            try:
                lora.add(lora.read(name, path))
            except InvalidRequestError as e:
                raise ConfigError(f"LoRA adapter {name!r}: {e.message}") from None
        return lora

    def _size_kv_cache(self) -> KVCacheSize:
        """As many pages as the memory budget holds, but no more than the running requests can use."""
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
        return KVCacheSize(num_pages, per_page, dtype)

    def _build_kv_pool(self, size: KVCacheSize) -> None:
        """The page allocator and the KV tensors it hands out pages of."""
        cfg, mc = self.config, self.model_config
        self.allocator = PageAllocator(size.num_pages, cfg.page_size)
        self.kv_pool = KVPool(
            mc.num_hidden_layers, self.allocator.num_storage_pages, cfg.page_size, mc.num_key_value_heads,
            mc.head_dim, size.dtype, self.platform.device(), self.platform.alloc_streamed,
        )
        self.kv_tokens = size.num_pages * cfg.page_size

    def _build_scheduler(self) -> Scheduler:
        cfg = self.config
        return Scheduler(
            SchedulerConfig(
                max_running_requests=cfg.max_running_requests,
                max_batched_tokens=cfg.max_batched_tokens or self.platform.step_token_budget(),
                chunked_prefill_size=cfg.chunked_prefill_size,
                enable_prefix_cache=not cfg.disable_prefix_cache,
            ),
            self.allocator,
            self.lora,
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
        lora: str | None = None,
    ) -> None:
        prompt_text = prompt if isinstance(prompt, str) else None
        self.enqueue(request_id, self.make_requests(request_id, prompt, params, priority, lora), prompt_text)

    def make_requests(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0,
        lora: str | None = None,
    ) -> list[Request]:
        """Tokenize and validate into the n sequences of one request (InputProcessor's: no engine
        state touched, so a frontend may call it on its own thread); `lora` names the adapter."""
        if lora is not None:
            self.check_lora(lora)
        group = self.inputs.make_requests(request_id, prompt, params, priority)
        for req in group:
            req.lora_name = lora
        return group

    def check_lora(self, name: str) -> None:
        """Raise InvalidRequestError unless `name` is a loaded adapter (read-only: any thread)."""
        if self.lora is None:
            raise ModelNotFoundError(
                f"the LoRA adapter {name!r} does not exist: this engine serves no adapters (start it with "
                "--lora-modules or --enable-lora)", "model")
        if self.lora.get(name) is None:
            raise ModelNotFoundError(f"the LoRA adapter {name!r} does not exist (or is being unloaded)", "model")

    def enqueue(self, request_id: str, group: list[Request], prompt: str | None) -> None:
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        taken: list[Request] = []
        try:
            for req in group:
                if req.lora_name is not None:
                    if self.lora is None:
                        raise InvalidRequestError("this engine serves no LoRA adapters", "model")
                    req.lora_uid = self.lora.ref(req.lora_name)
                    taken.append(req)
        except InvalidRequestError:
            for req in taken:
                self.lora.unref(req.lora_name)
            raise
        self.groups[request_id] = group
        self.prompts[request_id] = prompt
        for req in group:
            self.scheduler.add(req)

    def check_token_ids(self, tokens: list[int], param: str) -> None:
        """Raise InvalidRequestError unless every id is in the model's vocabulary."""
        check_token_ids(tokens, self.model_config.vocab_size, param)

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

    def unfinished_request_ids(self) -> list[str]:
        return list(self.groups)

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
        if req.lora_name is not None and self.lora is not None:
            self.lora.unref(req.lora_name)

    # ---- LoRA adapters ---------------------------------------------------------------

    def read_lora(self, name: str, path: str) -> LoRAAdapter:
        """Read and check an adapter's files (any thread); `add_lora` then registers it."""
        if self.lora is None:
            raise InvalidRequestError("LoRA is not enabled: start the engine with --enable-lora or --lora-modules",
                                      "lora_name")
        if not name:
            raise InvalidRequestError("lora_name must not be empty", "lora_name")
        return self.lora.read(name, path)

    def add_lora(self, adapter: LoRAAdapter) -> None:
        """Register a read adapter (engine thread)."""
        assert self.lora is not None
        self.lora.add(adapter)

    def load_lora(self, name: str, path: str) -> None:
        self.add_lora(self.read_lora(name, path))

    def unload_lora(self, name: str) -> int:
        """Unload an adapter (engine thread): 0 if done now, else the number of unfinished
        requests using it; it goes when the last of them ends."""
        if self.lora is None:
            raise InvalidRequestError("LoRA is not enabled: this engine serves no adapters", "lora_name")
        return self.lora.remove(name).deferred

    def lora_adapters(self) -> list[tuple[str, str]]:
        """(name, path) of the adapters requests may name (read-only: any thread)."""
        if self.lora is None:
            return []
        return [(a.name, a.path) for a in list(self.lora.adapters.values()) if a.name not in self.lora.unloading]

    def _group_done(self, gid: str) -> bool:
        return all(r.finished for r in self.groups[gid])

    def _output(self, gid: str) -> RequestOutput:
        return self.outputs.build(self.groups[gid], self.prompts[gid])

    def _pop_output(self, gid: str) -> RequestOutput:
        output = self._output(gid)
        del self.groups[gid], self.prompts[gid]
        return output

    # ---- introspection ---------------------------------------------------------------

    def queue_depth(self) -> int:
        """Sequences waiting for a slot (cheap: no stats snapshot)."""
        return len(self.scheduler.waiting)

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
        if self.lora is not None:
            self.lora.check_integrity(idle=not self.groups)

