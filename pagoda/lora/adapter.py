"""Reading one LoRA adapter into pagoda's layout.

Two formats:

- PEFT's directory: ``adapter_config.json`` (r, lora_alpha, use_rslora, target_modules,
  rank_pattern/alpha_pattern) and ``adapter_model.safetensors`` with
  ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` [r, in] and ``lora_B`` [out, r].
- llama.cpp's GGUF LoRA (convert_lora_to_gguf.py): ``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha``; tensors ``blk.N.attn_q.weight.lora_a`` /
  ``.lora_b``. llama.cpp stores Llama's Q and K rows permuted for its rope layout; the
  permutation acts on output rows, so it is undone on lora_b of q and k (as the base loader
  undoes it on the base weights).

Each projection's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into its B,
and the projections are fused as the model fuses its weights (q/k/v into qkv_proj,
gate/up into gate_up_proj): A's rows part after part, B block-diagonal (pagoda/ops/lora.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pagoda.errors import InvalidRequestError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight")


@dataclass(frozen=True)
class LoRAModelInfo:
    """What an adapter is checked and fused against: the base model's targetable projections
    (HF module name -> (our linear's path, first row in it, rows, inputs)), its head counts
    (for GGUF's Q/K permutation), and the pool's rank limit."""

    targets: dict[str, tuple[str, int, int, int]]
    num_heads: int
    num_kv_heads: int
    max_rank: int


@dataclass(eq=False)
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the largest rank of any of its projections
    modules: tuple[str, ...]  # the short names it targets ("q_proj", ...)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # linear path -> (A [w, in], B [out, w])
    uid: int = 0  # set when registered: never reused, so cached KV of one adapter is never another's


def _bad(message: str, param: str = "lora_path") -> InvalidRequestError:
    return InvalidRequestError(message, param)


def load_adapter(name: str, path: str | Path, model: LoRAModelInfo) -> LoRAAdapter:
    """Read, check and fuse an adapter; InvalidRequestError (a 4xx) for anything wrong with it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _bad(f"LoRA adapter path {str(path)!r} does not exist")
    if p.is_dir() and (p / PEFT_CONFIG).exists():
        per_module, modules = _read_peft(p, model)
    elif p.is_file() and _is_gguf(p):
        per_module, modules = _read_gguf(p, model)
    elif p.is_dir():
        raise _bad(f"{p} holds no {PEFT_CONFIG} (a PEFT adapter directory) and is not a GGUF LoRA file")
    else:
        raise _bad(f"{p} is neither a PEFT adapter directory nor a GGUF LoRA file")
    if not per_module:
        raise _bad(f"{p}: the adapter holds no LoRA weights for this model's projections")
    rank = max(a.shape[0] for a, _ in per_module.values())
    if rank > model.max_rank:
        raise _bad(f"{p}: the adapter's rank {rank} exceeds --max-lora-rank {model.max_rank}")
    return LoRAAdapter(name, str(path), rank, tuple(sorted(modules)), _fuse(per_module, model))


def _check_module(hf_module: str, a: torch.Tensor, b: torch.Tensor, model: LoRAModelInfo, p: Path) -> None:
    target = model.targets.get(hf_module)
    if target is None:
        raise _bad(f"{p}: the adapter targets {hf_module!r}, which this model lacks (LoRA is supported on "
                   "q/k/v/o_proj and gate/up/down_proj)")
    _, _, rows, inputs = target
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inputs or b.shape != (rows, r):
        raise _bad(f"{p}: {hf_module}'s LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the model's "
                   f"[{rows} x {inputs}] projection")


# ---- PEFT -------------------------------------------------------------------------------


def _read_peft(p: Path, model: LoRAModelInfo):
    try:
        cfg = json.loads((p / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _bad(f"{p / PEFT_CONFIG} cannot be read as JSON: {e}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise _bad(f"{p}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
        if cfg.get(key):
            raise _bad(f"{p}: {what} adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise _bad(f"{p}: LoRA bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise _bad(f"{p}: fan_in_fan_out adapters are not supported")
    short_names = {name.rsplit(".", 1)[-1] for name in model.targets}
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):
        lacking = sorted(set(targets) - short_names)
        if lacking:
            raise _bad(f"{p}: target modules {', '.join(lacking)} are not in this model (LoRA is supported on "
                       f"{', '.join(sorted(short_names))})")
    tensors = _read_peft_tensors(p)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise _bad(f"{p}: unexpected tensor {key!r} (only lora_A/lora_B weights of linear layers are supported)")
        pairs.setdefault(m[1], {})[m[2]] = t.float()
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: set[str] = set()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise _bad(f"{p}: {module} has lora_{'A' if 'B' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        _check_module(module, a, b, model, p)
        rank = _pattern(rank_pattern, module, r)
        mod_alpha = _pattern(alpha_pattern, module, alpha)
        if a.shape[0] != rank:
            rank = a.shape[0]  # the tensors are the truth; PEFT's patterns only explain them
        scaling = mod_alpha / math.sqrt(rank) if cfg.get("use_rslora") else mod_alpha / rank
        out[module] = (a, b * scaling)
        modules.add(module.rsplit(".", 1)[-1])
    return out, modules


def _pattern(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key the module name ends with."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.){re.escape(key)}$", module) or re.fullmatch(key, module):
            return value
    return default


def _read_peft_tensors(p: Path) -> dict[str, torch.Tensor]:
    st = p / PEFT_WEIGHTS[0]
    try:
        if st.exists():
            from safetensors.torch import load_file

            return load_file(str(st))
        binary = p / PEFT_WEIGHTS[1]
        if binary.exists():
            return torch.load(str(binary), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails inside its parser
        raise _bad(f"{p}: cannot read the adapter's weights: {e}") from None
    raise _bad(f"{p} has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")


# ---- GGUF -------------------------------------------------------------------------------


def _is_gguf(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_gguf(p: Path, model: LoRAModelInfo):
    import gguf

    from pagoda.weights.gguf import ARCHITECTURES, hf_tensor_name, unpermute_qk

    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:
        raise _bad(f"{p} is a damaged GGUF file: {e}") from None

    def meta(key: str):
        f = reader.fields.get(key)
        if f is None or not f.types:
            return None
        value = f.parts[f.data[0]]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(value).decode("utf-8", errors="replace")
        return value.tolist()[0]

    if meta("general.type") != "adapter" or (meta("adapter.type") or "lora") != "lora":
        raise _bad(f"{p} is a GGUF file but not a LoRA adapter (general.type={meta('general.type')!r}, "
                   f"adapter.type={meta('adapter.type')!r})")
    arch = meta("general.architecture") or "llama"
    permuted = ARCHITECTURES.get(arch, (None, False))[1]
    alpha = float(meta("adapter.lora.alpha") or 0.0)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, which = t.name.rpartition(".")
        hf = hf_tensor_name(base)
        if which not in ("lora_a", "lora_b") or hf is None or not hf.endswith(".weight"):
            raise _bad(f"{p}: unexpected tensor {t.name!r} in a GGUF LoRA adapter")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        pairs.setdefault(hf.removesuffix(".weight"), {})[which] = torch.tensor(arr, dtype=torch.float32)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: set[str] = set()
    for module, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise _bad(f"{p}: {module} lacks one of lora_a / lora_b")
        a, b = ab["lora_a"], ab["lora_b"]
        _check_module(module, a, b, model, p)
        if permuted and module.endswith("self_attn.q_proj"):
            b = torch.from_numpy(unpermute_qk(b.numpy(), model.num_heads).copy())
        elif permuted and module.endswith("self_attn.k_proj"):
            b = torch.from_numpy(unpermute_qk(b.numpy(), model.num_kv_heads).copy())
        rank = a.shape[0]
        scaling = alpha / rank if alpha else 1.0  # llama.cpp: no alpha means scale 1
        out[module] = (a, b * scaling)
        modules.add(module.rsplit(".", 1)[-1])
    return out, modules


# ---- fusing into the model's projections ------------------------------------------------


def _fuse(per_module: dict[str, tuple[torch.Tensor, torch.Tensor]], model: LoRAModelInfo):
    """HF projections' (A, B) -> per linear of ours, A stacked and B block-diagonal."""
    by_linear: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in per_module.items():
        path, row0, rows, _ = model.targets[module]
        by_linear.setdefault(path, []).append((row0, rows, a, b))
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    out_features = {}
    for path, row0, rows, _ in model.targets.values():
        out_features[path] = max(out_features.get(path, 0), row0 + rows)
    for path, parts in by_linear.items():
        parts.sort(key=lambda part: part[0])
        a = torch.cat([part[2] for part in parts]).contiguous()
        b = torch.zeros(out_features[path], a.shape[0])
        col = 0
        for row0, rows, pa, pb in parts:
            b[row0 : row0 + rows, col : col + pa.shape[0]] = pb
            col += pa.shape[0]
        fused[path] = (a, b)
    return fused
