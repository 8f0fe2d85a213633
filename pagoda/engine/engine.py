"""Engine: the step loop that ties scheduler, model runner, sampler and outputs together.

Synchronous and single-threaded by design: LLM drives it directly, AsyncEngine runs
it on its own thread. One ``step()`` = schedule, one forward over the ragged batch,
sample, update, detokenize and stop-check.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.cache.page_allocator import PageAllocator
from pagoda.config import EngineConfig
from pagoda.distributed.channel import StepChannel
from pagoda.distributed.launch import TensorParallelGroup, rank_device
from pagoda.distributed.parallel import SINGLE
from pagoda.engine.input_processor import InputLimits, InputProcessor, check_token_ids, load_model_tokenizer
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.request import Request, Status
from pagoda.engine.sampler import Sampler, SamplingRow, compute_logprobs
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from pagoda.engine.speculative.speculation import Speculation
from pagoda.engine.speculative.verify import sample_and_verify
from pagoda.engine.step_cost import MIN_CHUNK, StepCost, calibrate, timed_forward
from pagoda.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from pagoda.lora import LoRAAdapter, LoRAManager
from pagoda.models.loader import LoadedModel, load_model, resolve_dtype
from pagoda.platforms import detect_platform_name, get_platform

log = logging.getLogger("pagoda.engine")

GiB = 1 << 30
# A server's Python cost of one streamed output (asyncio, SSE framing, a socket write: ~60 us sampled
# with py-spy on this project's CPU at 256 streams), and the share of a step those may take.
STREAM_EVENT_S = 60e-6
STREAM_SHARE = 0.25


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
    spec_num_draft_tokens: int = 0  # tokens proposed and verified
    spec_num_accepted_tokens: int = 0  # of those, confirmed by the target
    spec_num_steps: int = 0  # verifications (one per speculating sequence and step)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_pages_free / self.kv_pages_total

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_acceptance_length(self) -> float:
        """Tokens per verification: the accepted ones plus the target's own."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_steps if self.spec_num_steps else 0.0


@dataclass(frozen=True)
class ModelInfo:
    """What frontends may tell clients about the served model."""

    architecture: str
    path: str | None  # the checkpoint, or None for dummy weights from a bare config
    context_length: int
    vocab_size: int
    hidden_size: int  # the length of an embedding request's vector
    kv_tokens: int  # tokens the KV cache holds, all sequences together
    has_tokenizer: bool
    has_chat_template: bool
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class KVCacheSize:
    num_pages: int
    bytes_per_page: int
    dtype: torch.dtype


def kv_cache_dtype(config: EngineConfig, loaded: LoadedModel, platform) -> torch.dtype:
    name = config.kv_cache_dtype
    if name == "auto":
        return torch.bfloat16 if loaded.quantization else loaded.dtype
    return torch.int8 if name == "int8" else resolve_dtype(name, platform)


def kv_cache_size(
    config: EngineConfig, platform, loaded: LoadedModel, dtype: torch.dtype, reserve: int = 0
) -> KVCacheSize:
    """As many pages as the memory budget holds, but no more than the running requests can use.
    A tensor-parallel rank sizes its own share (its KV heads) against its own budget:
    --kv-cache-memory is per rank. Without it, `reserve` bytes of the free memory stay free
    (what the decode graphs will take)."""
    mc = loaded.config
    per_token = KVPool.bytes_per_token(mc.num_hidden_layers, loaded.kv_heads, mc.head_dim, dtype)
    if config.kv_cache_memory is not None:
        budget = int(config.kv_cache_memory * GiB)
    else:
        budget = platform.kv_cache_budget() - reserve
    per_page = per_token * config.page_size
    max_useful = config.max_running_requests * loaded.context_length + config.page_size
    num_pages = min(budget, max_useful * per_token) // per_page
    if num_pages < 2:
        raise ConfigError(
            f"KV cache budget {budget / GiB:.3f} GiB holds fewer than 2 pages of {config.page_size} tokens "
            f"({per_page} bytes each); raise --kv-cache-memory"
        )
    return KVCacheSize(num_pages, per_page, dtype)


def build_kv_pool(config: EngineConfig, platform, loaded: LoadedModel, size: KVCacheSize) -> KVPool:
    mc = loaded.config
    storage_pages = PageAllocator.storage_pages(size.num_pages)
    prefault = platform.kv_prefault_bytes()
    if prefault:
        # At least one longest request's pages, so that a document's prefill never meets memory
        # never written: each step writes every layer's K and V, and a first write backs a whole
        # 2 MiB huge page of each at once, 60 of them in one step for the default model (steps of
        # 0.5-0.7 s past the warm part, against 0.2 s, in a 30K-token prefill).
        pages = -(-loaded.context_length // config.page_size) + 1  # and the null page
        prefault = max(prefault, pages * size.bytes_per_page)
    return KVPool(mc.num_hidden_layers, storage_pages, config.page_size, loaded.kv_heads, mc.head_dim, size.dtype,
                  platform.device(), platform.alloc_streamed, prefault)


class Engine:
    def __init__(self, config: EngineConfig, show_progress: bool = False) -> None:
        self.config = config
        self.tp: TensorParallelGroup | None = None
        self.channel: StepChannel | None = None
        parallel = SINGLE
        if config.tensor_parallel_size > 1:
            # Spawns ranks 1.. (they load their shards meanwhile) and opens the process group.
            self.tp = TensorParallelGroup(config, detect_platform_name(config.device))
            parallel = self.tp.ctx
            config = dataclasses.replace(config, device=rank_device(config, detect_platform_name(config.device), 0))
        self.platform = get_platform(config.device)
        if self.tp is not None:
            torch.set_num_threads(self.tp.threads)
        elif config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.platform.seed(config.seed)
        if self.tp is not None:
            atexit.register(self.close)
        self.loaded: LoadedModel = load_model(config, self.platform, show_progress, parallel)
        self.rank_label = f"rank 0 of {config.tensor_parallel_size}: " if self.tp else ""
        log.info(
            "%smodel: %s, %.2f GiB of weights (%s), loaded in %.1f s", self.rank_label,
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
            hidden_size=self.model_config.hidden_size,
            kv_tokens=self.kv_tokens,
            has_tokenizer=self.tokenizer is not None,
            has_chat_template=self.tokenizer is not None and bool(self.tokenizer.chat_template),
            tensor_parallel_size=config.tensor_parallel_size,
        )
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.context_length)
        self.groups: dict[str, list[Request]] = {}
        self.prompts: dict[str, str | None] = {}
        self.generation_tokens = 0
        self._step_s = 0.0  # moving average of a step's wall time (stream_interval's auto)
        self.speculation = Speculation.build(self.config, self.platform, self.model_config, self.context_length)
        self._ids = itertools.count()

    # ---- set-up ----------------------------------------------------------------------

    def _init_kv_cache(self) -> None:
        """Size the KV cache, then build its pages, the model runner over them and the scheduler."""
        size = self._size_kv_cache()
        if self.tp is not None:  # every rank holds the same pages (of its own KV heads)
            size = dataclasses.replace(size, num_pages=self.tp.agree_pages(size.num_pages))
            self.channel = StepChannel(self.tp.ctx, self.platform.device())
        self._build_kv_pool(size)
        self.runner = ModelRunner(self.loaded.model, self.kv_pool, self.platform.device(), self.channel)
        self.scheduler = self._build_scheduler()
        log.info(
            "%sKV cache: %d tokens in %d pages (%.2f GiB, %s)", self.rank_label, self.kv_tokens, size.num_pages,
            size.num_pages * size.bytes_per_page / GiB, str(size.dtype).removeprefix("torch."),
        )
        if self._graph_max_batch():
            self._capture_graphs()

    def _graph_max_batch(self) -> int:
        """The largest decode batch to capture as a graph; 0: none (no graphs on this platform,
        --disable-graphs, or tensor parallelism, whose other ranks run their steps eagerly)."""
        if self.config.disable_graphs or not self.platform.capabilities.graph_capture or self.tp is not None:
            return 0
        return min(self.config.graph_max_batch_size, self.config.max_running_requests)

    def _capture_graphs(self) -> None:
        free = self.platform.free_memory()
        self.runner.capture_graphs(self._graph_max_batch(), self.scheduler.pages_needed(self.context_length),
                                   self.platform.new_graph)
        log.info("decode graphs take %.2f GiB", (free - self.platform.free_memory()) / GiB)

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
        return kv_cache_size(self.config, self.platform, self.loaded, self.kv_cache_dtype(),
                             self._graph_memory_estimate())

    def _graph_memory_estimate(self) -> int:
        """Bytes the decode graphs' shared memory pool will hold: the largest bucket's logits
        and, generously, a dozen activations of its widest layer."""
        mc, batch = self.model_config, self._graph_max_batch()
        widest = max(mc.hidden_size, 2 * mc.intermediate_size, mc.q_size + 2 * mc.kv_size)
        return batch * (mc.vocab_size + 12 * widest) * 4

    def _build_kv_pool(self, size: KVCacheSize) -> None:
        """The page allocator and the KV tensors it hands out pages of."""
        self.kv_pool = build_kv_pool(self.config, self.platform, self.loaded, size)
        self.allocator = PageAllocator(size.num_pages, self.config.page_size, self.kv_pool.warm_pages)
        self.kv_tokens = size.num_pages * self.config.page_size

    def _build_scheduler(self) -> Scheduler:
        cfg = self.config
        max_step_ms = self.platform.step_time_budget_ms() if cfg.max_step_ms is None else cfg.max_step_ms
        return Scheduler(
            SchedulerConfig(
                max_running_requests=cfg.max_running_requests,
                max_batched_tokens=cfg.max_batched_tokens or self.platform.step_token_budget(),
                chunked_prefill_size=cfg.chunked_prefill_size,
                enable_prefix_cache=not cfg.disable_prefix_cache,
                max_step_ms=max_step_ms,
            ),
            self.allocator,
            self.lora,
            self._step_cost(max_step_ms) if max_step_ms else None,
        )

    def _step_cost(self, max_step_ms: float) -> StepCost | None:
        """The step cost model, calibrated on a few synthetic forwards (before graphs are captured:
        they run eagerly); None, with a warning, where the budget cannot be kept."""
        t = time.perf_counter()
        cost = calibrate(timed_forward(self.runner, self.allocator, self.platform.synchronize), self.context_length)
        log.info("%sstep budget %g ms; step cost (calibrated in %.1f s): %s", self.rank_label, max_step_ms,
                 time.perf_counter() - t, cost)
        if cost.keeps(max_step_ms):
            return cost
        log.warning("%sstep budget off: a step with a %d-token prompt chunk is predicted to take %.0f ms here, over "
                    "--max-step-ms %g (raise it, or start on a quieter host)", self.rank_label, MIN_CHUNK,
                    cost.fixed_ms + cost.chunk_ms(0, MIN_CHUNK), max_step_ms)
        return None

    def kv_cache_dtype(self) -> torch.dtype:
        return kv_cache_dtype(self.config, self.loaded, self.platform)

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one rank)."""
        if self.tp is not None:
            self.tp.stop(self.channel)

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
        self.enqueue(request_id, self.make_requests(request_id, prompt, params, priority, lora=lora), prompt_text)

    def make_requests(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0,
        pooling: str | None = None, lora: str | None = None,
    ) -> list[Request]:
        """Tokenize and validate into the n sequences of one request (InputProcessor's: no engine
        state touched, so a frontend may call it on its own thread). With `pooling` ("last" or
        "mean") it is an embedding request: prefilled in the same batches as any other, nothing
        sampled, its output carrying the pooled final hidden state (see _pool). `lora` names the
        adapter it runs with."""
        if lora is not None:
            self.check_lora(lora)
        group = self.inputs.make_requests(request_id, prompt, params, priority, pooling)
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
        start = time.perf_counter()
        outputs = self._step()
        self._step_s += 0.2 * (time.perf_counter() - start - self._step_s)
        return outputs

    def stream_interval(self) -> int:
        """Tokens a request gathers before its next output (its first token and its end go out at
        once). Each output costs a server ~STREAM_EVENT_S of Python on the same interpreter; auto
        keeps a step's outputs under STREAM_SHARE of the step (a 256-sequence decode on a GPU takes
        ~10 ms, and 256 outputs would triple it), and is 1 wherever the step is the slower part."""
        if self.config.stream_interval:
            return self.config.stream_interval
        events_s = len(self.scheduler.running) * STREAM_EVENT_S
        return max(1, math.ceil(events_s / (STREAM_SHARE * self._step_s))) if self._step_s > 0 else 1

    def _step(self) -> list[RequestOutput]:
        proposed = self.speculation.propose(self.scheduler.running) if self.speculation is not None else []
        out = self.scheduler.schedule()
        for req in proposed:
            req.draft = []  # a proposal lives one step (the scheduler took it, or left it out)
        if not out.chunks:
            return []
        result = self.runner.run(out.chunks)
        self._record_prompt_logprobs(out, result.all_logits)
        emitted = self._sample(out, result.last_logits, result.all_logits)
        touched: dict[str, None] = {}
        pooled = {id(req) for req in self._pool(out, result.hidden)}
        for chunk, tokens in zip(out.chunks, emitted):
            req = chunk.request
            if req.status is not Status.RUNNING:
                continue
            self.scheduler.advance(chunk)
            if id(req) in pooled:  # an embedding: its prompt is computed, it is done
                self.scheduler.finish(req)
                self._finish(req, "stop")
                touched[req.group_id] = None
                continue
            # token by token, exactly as without speculation: the first stop ends the sequence
            for j, (token, logprob) in enumerate(tokens):
                self.scheduler.append(req, token, after_verified=j > 0)
                self.generation_tokens += 1
                reason = self.outputs.on_token(req, token, logprob)
                if reason is not None:
                    self.scheduler.finish(req)
                    self._finish(req, reason)
                    break
            if chunk.draft:
                self.speculation.verified(req, len(chunk.draft), len(tokens) - 1)
                if req.status is Status.RUNNING:
                    self.scheduler.trim(req)
            if tokens:
                touched[req.group_id] = None
        interval = self.stream_interval()
        return [self._pop_output(gid) if self._group_done(gid) else self._output(gid) for gid in touched
                if interval == 1 or self._output_due(gid, interval)]

    def _pool(self, out: SchedulerOutput, hidden: dict[int, torch.Tensor]) -> list[Request]:
        """Fold each embedding chunk's hidden states into its request; the requests now complete."""
        done = []
        for i, h in hidden.items():
            chunk = out.chunks[i]
            req = chunk.request
            if req.pooling == "mean":
                total = h.sum(0)
                req.pooled = total if req.pooled is None or chunk.start == 0 else req.pooled + total
            if chunk.completes:
                req.pooled = h[-1].clone() if req.pooling == "last" else req.pooled / len(req.prompt_ids)
                done.append(req)
        return done

    # ---- sampling --------------------------------------------------------------------

    def _sample(
        self, out: SchedulerOutput, logits: torch.Tensor, all_logits: dict[int, torch.Tensor]
    ) -> list[list[tuple[int, TokenLogprob | None]]]:
        """Per chunk, the tokens it emits: none (a prompt chunk short of the end), one, or for a
        speculating chunk its accepted proposal plus the target's next token."""
        rows_idx = [i for i, c in enumerate(out.chunks) if c.completes and c.request.pooling is None]
        result: list[list[tuple[int, TokenLogprob | None]]] = [[] for _ in out.chunks]
        if not rows_idx:
            return result
        speculating = any(out.chunks[i].draft for i in rows_idx)
        items = []
        for i in rows_idx:
            req = out.chunks[i].request
            row = SamplingRow(params=req.params, prompt_ids=req.prompt_ids, output_ids=req.output_ids,
                              generator=req.generator, eos_token_ids=req.eos_ids, grammar=req.grammar)
            items.append((row, out.chunks[i].draft))
        if speculating:
            batch_logits = torch.cat([all_logits[i] if out.chunks[i].draft else logits[i : i + 1] for i in rows_idx])
        else:  # all rows complete in a decode step: no copy of the [batch, vocab] logits
            batch_logits = logits if len(rows_idx) == len(logits) else logits[rows_idx]
        sampled, spans = sample_and_verify(self.sampler, batch_logits, items)
        for i, (row, _), (lo, hi) in zip(rows_idx, items, spans):
            tokens = []
            for j in range(lo, hi):
                lp = None
                if row.params.logprobs is not None:
                    lp = TokenLogprob(sampled.token_ids[j], sampled.logprobs[j], sampled.top_logprobs[j])
                tokens.append((sampled.token_ids[j], lp))
            result[i] = tokens
        return result

    def _record_prompt_logprobs(self, out: SchedulerOutput, all_logits: dict[int, torch.Tensor]) -> None:
        for i, logits in all_logits.items():
            chunk = out.chunks[i]
            req = chunk.request
            if chunk.draft:
                continue
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
        if self.speculation is not None:
            self.speculation.release(req)
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

    def _output_due(self, gid: str, interval: int) -> bool:
        """Whether a group's next output goes out this step: done, a first token, or `interval` new."""
        return any(r.finished or r.sent_tokens == 0 or len(r.output_ids) - r.sent_tokens >= interval
                   for r in self.groups[gid])

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
        s, spec = self.scheduler, self.speculation
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
            spec_num_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_num_steps=spec.num_steps if spec else 0,
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        if self.speculation is not None:
            self.speculation.check_integrity(idle=not self.groups)
        if self.lora is not None:
            self.lora.check_integrity(idle=not self.groups)

