"""Turn an EngineConfig into a ready model: resolve config and dtype, build, fill weights.

Weights stream in one tensor at a time and the model is allocated once in its target
dtype, so peak memory stays near the size of the model itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pagoda.config import EngineConfig
from pagoda.distributed.parallel import SINGLE, ParallelContext
from pagoda.errors import ConfigError, ModelLoadError
from pagoda.models.config import ModelConfig, normalize_rope_scaling
from pagoda.models.layers import Linear, LinearFormat
from pagoda.models.llama import attention_shard
from pagoda.models.registry import model_class
from pagoda.platforms import Platform
from pagoda.weights.default_model import default_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    hf_config: dict[str, Any]
    path: Path | None
    dtype: torch.dtype
    load_seconds: float
    context_length: int
    weight_bytes: int
    quantization: str | None  # what --quantization resolved to: "bf16", "int8", "int4" or None
    read_gguf: tuple[Path, dict[str, Any]] | None = None  # a GGUF checkpoint's tokenizer keys, read with it
    kv_heads: int = 0  # KV heads this rank stores (all of them on one rank)


def resolve_model_path(config: EngineConfig) -> Path | None:
    if config.model is None:
        return None if config.model_config else default_model_path()
    path = Path(config.model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {config.model!r} does not exist")
    return path


def resolve_dtype(name: str, platform: Platform) -> torch.dtype:
    return platform.default_dtype() if name == "auto" else _DTYPES[name]


def resolve_quantization(config: EngineConfig, checkpoint: Any, platform: Platform) -> str | None:
    """--quantization auto: a quantized GGUF served on CPU in the default dtype keeps its own
    level: int4 for files whose weights are mostly 4 bits or fewer (Q4_1 loads exactly), int8
    for 5 to 8 bits (Q8_0 exactly). These are the most accurate fast modes (the file's own
    weights, float32 sums) and the fastest up to ~32 concurrent streams; bf16 stays one flag
    away for heavier loads. Everything else keeps --dtype."""
    if config.quantization != "auto":
        return None if config.quantization in (None, "none") else config.quantization
    types = {name: t for name, t in (getattr(checkpoint, "quant_types", None) or {}).items() if t not in ("F32", "F16", "BF16")}
    if not types or config.dtype != "auto" or platform.device_type != "cpu":
        return None
    # the layers decide: files keep embeddings and heads wider (Q4_1 layers, a Q8_0 token_embd)
    layers = [t for name, t in types.items() if "embed_tokens" not in name and "lm_head" not in name] or list(types.values())
    main = max(set(layers), key=layers.count)
    bits = re.match(r"I?Q(\d)", main)
    return "int4" if bits is None or int(bits.group(1)) <= 4 else "int8"


def linear_format(kind: str | None, group_size: int) -> LinearFormat | None:
    return LinearFormat(kind, group_size) if kind else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _apply_overrides(model_cfg: ModelConfig, config: EngineConfig) -> ModelConfig:
    """A user's --rope-scaling wins over the checkpoint's (even Jiutian's forced None)."""
    scaling = normalize_rope_scaling(config.rope_scaling_dict(), model_cfg.max_position_embeddings)
    return model_cfg if scaling is None else dataclasses.replace(model_cfg, rope_scaling=scaling)


def load_model(
    config: EngineConfig, platform: Platform, show_progress: bool = False, parallel: ParallelContext = SINGLE,
) -> LoadedModel:
    """The model, or with a tensor-parallel context this rank's shard of it (each rank reads
    only its slices of a safetensors checkpoint; a GGUF's tensors are dequantized whole from
    the mapped file and sliced)."""
    start = time.perf_counter()
    path = resolve_model_path(config)
    dtype = resolve_dtype(config.dtype, platform)
    device = platform.device()
    if config.load_format == "dummy":
        cfg_path = Path(config.model_config) if config.model_config else Path(path) / "config.json"
        hf_config, checkpoint = _read_json(cfg_path), None
    else:
        from pagoda.weights.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        hf_config = checkpoint.hf_config
    model_cfg = _apply_overrides(ModelConfig.from_hf_dict(hf_config), config)
    context_length = config.context_length or model_cfg.max_position_embeddings
    if config.context_length and config.context_length > model_cfg.max_position_embeddings and not model_cfg.rope_scaling:
        raise ConfigError(
            f"context_length {config.context_length} exceeds the model's {model_cfg.max_position_embeddings} "
            "positions; pass --rope-scaling to extend it"
        )
    quantization = resolve_quantization(config, checkpoint, platform)
    fmt = linear_format(quantization, config.int4_group_size if quantization == "int4" else 32)
    _check_fits(estimate_weight_bytes(model_cfg, dtype, fmt) // parallel.world_size, platform, quantization or config.dtype)
    model = model_class(model_cfg.architecture)(
        model_cfg, dtype, device, max_position=context_length, quantization=fmt, parallel=parallel,
    )
    if checkpoint is None and not parallel.enabled:
        _fill_dummy(model, config.seed)
    elif checkpoint is None:
        # Shards of the same random tensors on every rank: any --tensor-parallel-size above 1 computes
        # the same model (one rank's dummy weights are drawn differently, layer by layer).
        model.load_weights(dummy_tensors(model._expected_weights(), config.seed))
    else:
        names = checkpoint.tensor_names()
        tensors = checkpoint.tensors(lazy=True) if parallel.enabled and hasattr(checkpoint, "slices") else checkpoint.tensors()
        stream = tqdm(tensors, total=len(names), desc="loading weights", unit="tensor", disable=not show_progress)
        model.load_weights(stream)
    model.eval()
    return LoadedModel(
        model, model_cfg, hf_config, path, dtype, time.perf_counter() - start, context_length, weight_bytes(model),
        quantization, _read_gguf(checkpoint), attention_shard(model_cfg, parallel)[1],
    )


def _read_gguf(checkpoint: Any) -> tuple[Path, dict[str, Any]] | None:
    metadata = getattr(checkpoint, "tokenizer_metadata", None)
    return None if metadata is None else (checkpoint.path, metadata)


@torch.no_grad()
def _fill_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights, a bounded block of rows at a time in the target format (never a float32
    copy of the model: a 35B-class int4 model starts in the RAM its int4 weights need), drawn
    on the model's device (an 8B model on a GPU fills in seconds, not a minute of host RNG)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rows_per_block = 1024
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, Linear):
            for row0 in range(0, module.out_features, rows_per_block):
                rows = min(rows_per_block, module.out_features - row0)
                block = torch.empty(rows, module.in_features, device=device)
                module.load_rows(row0, block.normal_(0.0, 0.02, generator=gen))
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                done.add(id(module.weight))
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        for block in param.data.split(rows_per_block):
            block.copy_(torch.empty(block.shape, device=device).normal_(0.0, 0.02, generator=gen))
    model.finalize()


def dummy_tensors(expected: dict[str, tuple], seed: int):
    """Random checkpoint tensors by HF name (norms 1), each from its own seeded generator."""
    for index, (name, (_, _, shape, _)) in enumerate(sorted(expected.items())):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        yield name, torch.empty(shape).normal_(0.0, 0.02, generator=gen)


def _bytes_per_weight(fmt: LinearFormat | None, dtype: torch.dtype) -> float:
    if fmt is None:
        return dtype.itemsize
    if fmt.kind == "bf16":
        return 2.0
    if fmt.kind == "int8":
        return 1 + 2 / fmt.group_size  # a byte, plus a float16 scale per group
    return 0.5 + 4 / fmt.group_size  # nibbles, plus a float16 scale and min per group


def estimate_weight_bytes(cfg: ModelConfig, dtype: torch.dtype, fmt: LinearFormat | None) -> int:
    """Weight memory of a config in a format, known before anything is allocated."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i
    elem = dtype.itemsize
    small = cfg.num_hidden_layers * (2 * h + (cfg.q_size + 2 * cfg.kv_size if cfg.qkv_bias else 0)) + h
    total = cfg.num_hidden_layers * per_layer * _bytes_per_weight(fmt, dtype) + (v * h + small) * elem
    head = fmt and fmt.for_output_head()
    if not cfg.tie_word_embeddings or head is not None:  # an untied head, or a tied one's copy
        total += v * h * _bytes_per_weight(head, dtype)
    return int(total)


def _check_fits(needed: int, platform: Platform, fmt_name: str) -> None:
    """Fail fast, with the numbers, rather than die of OOM half-way through loading."""
    free = platform.free_memory()
    headroom = 1 << 30  # runtime, and repacking one layer's weights after loading
    if needed + headroom > 0.95 * free:
        hint = "" if fmt_name == "int4" else "; --quantization int4 needs about 1/7 of float32"
        raise ConfigError(
            f"the model's weights need {needed / 2**30:.1f} GiB ({fmt_name}) "
            f"but only {free / 2**30:.1f} GiB of memory is free{hint}"
        )


def weight_bytes(model: torch.nn.Module) -> int:
    """Memory held by the weights, quantized ones included."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        qweight = getattr(module, "qweight", None)
        if qweight is not None:
            total += qweight.nbytes()
    return total
