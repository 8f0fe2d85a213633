"""GGUF files (llama.cpp): metadata -> HF config dict, tensors -> dequantized HF tensors.

The GGUF is memory-mapped by `gguf.GGUFReader`, so only the tensor being yielded is
dequantized into RAM. llama.cpp's converter reorders Q/K rows of "llama" models so
rope pairs sit side by side; that is undone here, so consumers see plain HF weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from pagoda.errors import ModelLoadError
from pagoda.tokenizer.gguf_vocab import read_tokenizer_metadata

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> (HF architecture, Q/K rows permuted by convert_hf_to_gguf)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if m := _LAYER_RE.fullmatch(gguf_name):
        part = _LAYER_NAMES.get(m[2])
        return None if part is None else f"model.layers.{m[1]}.{part}.{m[3]}"
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        base = _GLOBAL_NAMES.get(m[1])
        return None if base is None else f"{base}.{m[2]}"
    return None


def unpermute_qk(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's `permute`: each head's rows went [2, d/2] -> [d/2, 2]."""
    n = rows.shape[0]
    if n % (2 * n_head):
        raise ModelLoadError(f"cannot un-permute {n} rows into {n_head} rope heads")
    return rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@functools.cache
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed gguf package can dequantize this type (probed on one zero block)."""
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, sizes[1]), dtype=np.uint8), qtype)
    except Exception:  # NotImplementedError for types the package cannot dequantize
        return False
    return True


def _f32(value: Any) -> float:
    """Shortest decimal for a float32 (1e-05, not 9.999999747378752e-06), as HF configs write it."""
    return float(str(np.float32(value)))


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "pass a .gguf file or a Hugging Face model directory"
        )
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated or malformed files fail inside the parser
        raise ModelLoadError(f"{path} is a damaged GGUF file: {e}") from None


class _Metadata:
    """Typed access to the GGUF key/value fields, with errors that name the file and key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None or not field.types:
            return default
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            raise ModelLoadError(f"{self.path}: metadata {key} is an array; pagoda expects one value")
        value = field.parts[field.data[0]]
        if kind == gguf.GGUFValueType.STRING:
            return bytes(value).decode("utf-8", errors="replace")
        return value.tolist()[0]

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks required key {key!r}")
        return value

    def array_len(self, key: str) -> int | None:
        field = self.fields.get(key)
        return None if field is None else len(field.data)


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any] | None:
    """llama.cpp's rope.scaling.* (or legacy rope.scale_linear) as an HF rope_scaling dict."""
    pre = f"{arch}.rope.scaling."
    kind, factor = meta.get(pre + "type"), meta.get(pre + "factor")
    if kind is None and (linear := meta.get(f"{arch}.rope.scale_linear")) is not None:
        kind, factor = "linear", linear
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if factor is not None:
        scaling["factor"] = _f32(factor)
    optional = {
        "original_context_length": ("original_max_position_embeddings", int),
        "attn_factor": ("attention_factor", _f32),
        "yarn_beta_fast": ("beta_fast", _f32),
        "yarn_beta_slow": ("beta_slow", _f32),
    }
    for key, (hf_key, conv) in optional.items():
        if (value := meta.get(pre + key)) is not None:
            scaling[hf_key] = conv(value)
    return scaling


def gguf_hf_config(meta: _Metadata, arch: str, names: set[str]) -> dict[str, Any]:
    """Translate `{arch}.*` and `tokenizer.ggml.*` metadata into a HF config.json dict."""
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = meta.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(f"{meta.path}: partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or meta.array_len("tokenizer.ggml.tokens")
    if vocab is None:
        raise ModelLoadError(f"{meta.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    # Llama 3 style chat models end turns with eot/eom, so they count as eos like in HF configs.
    stop_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    stops = list(dict.fromkeys(t for k in stop_keys if (t := meta.get(f"tokenizer.ggml.{k}")) is not None))
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": arch,
        "hidden_act": "silu",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
    }
    if (pad := meta.get("tokenizer.ggml.padding_token_id")) is not None:
        cfg["pad_token_id"] = pad
    return cfg


class GGUFCheckpoint:
    """A single-file GGUF; every tensor comes back as float32 in HF name and layout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = _open_reader(path)
        meta = _Metadata(self.reader, path)
        if (meta.get("split.count") or 1) > 1:
            raise ModelLoadError(f"{path} is one part of a split GGUF; merge it with llama-gguf-split --merge first")
        self.architecture: str = meta.get("general.architecture") or "<missing>"
        if self.architecture not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise ModelLoadError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported (supported: {supported})"
            )
        self._entries = self._map_tensors()
        self.hf_config: dict[str, Any] = gguf_hf_config(meta, self.architecture, {t.name for t in self.reader.tensors})
        # HF name -> GGUF type name ("Q4_1", "F32", ...), for loaders that keep weights quantized.
        self.quant_types: dict[str, str] = {hf: t.tensor_type.name for hf, t in self._entries}

    @functools.cached_property
    def tokenizer_metadata(self) -> dict[str, Any]:
        """The tokenizer keys, read from the open file: the engine builds its tokenizer from
        them without parsing the file a second time."""
        return read_tokenizer_metadata(self.path, self.reader)

    def _map_tensors(self) -> list[tuple[str, Any]]:
        """Name every tensor in HF terms and check it can be dequantized, before any is read."""
        entries = []
        for t in self.reader.tensors:
            hf = hf_tensor_name(t.name)
            if hf is None:
                hint = " (llama3-style rope_freqs are not supported yet)" if t.name.startswith("rope_freqs") else ""
                raise ModelLoadError(f"{self.path}: unexpected GGUF tensor {t.name!r}{hint}")
            if not can_dequantize(t.tensor_type):
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, "
                    "which the installed gguf package cannot dequantize"
                )
            entries.append((hf, t))
        return entries

    def tensor_names(self) -> list[str]:
        return [hf for hf, _ in self._entries]

    slices = True  # tensors(lazy=True) yields parts that dequantize only the rows/columns taken

    def tensors(self, lazy: bool = False) -> Iterator[tuple[str, Any]]:
        for hf, t in self._entries:
            yield hf, (_GGUFTensor(self, hf, t) if lazy else self._dequantize(hf, t))

    def _dequantize(self, hf: str, t: Any) -> torch.Tensor:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF ne order -> torch order
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if ARCHITECTURES[self.architecture][1]:
            if ".self_attn.q_proj." in hf:
                arr = unpermute_qk(arr, int(self.hf_config["num_attention_heads"]))
            elif ".self_attn.k_proj." in hf:
                arr = unpermute_qk(arr, int(self.hf_config["num_key_value_heads"]))
        if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C")  # F32 data is a read-only view of the mmap
        return torch.from_numpy(arr)


class _GGUFTensor:
    """One GGUF tensor, read in part (a tensor-parallel rank's share): ``get_shape()`` in torch
    order, ``x[a:b]`` for rows, ``x[:, a:b]`` for columns. Only the rows taken are dequantized,
    and of them only the quantization blocks the columns cover (when the columns fall on block
    boundaries, as a rank's do; otherwise the rows are dequantized whole and cut). Q/K rows that
    llama.cpp permuted within each head are un-permuted per head, so whole heads slice cleanly."""

    def __init__(self, checkpoint: GGUFCheckpoint, hf: str, t: Any) -> None:
        self.checkpoint, self.hf, self.t = checkpoint, hf, t
        self.shape = tuple(int(n) for n in reversed(t.shape.tolist()))

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, cols = (key, slice(None)) if isinstance(key, slice) else key
        r0, r1, _ = rows.indices(self.shape[0])
        data, qtype = self.t.data, self.t.tensor_type
        part = data[r0:r1]
        if len(self.shape) == 1:
            arr = gguf.quants.dequantize(part, qtype)
        else:
            c0, c1, _ = cols.indices(self.shape[1])
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if (c0, c1) != (0, self.shape[1]) and c0 % block == 0 and c1 % block == 0:
                if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    part = part[:, c0:c1]
                else:
                    part = part[:, c0 // block * size : c1 // block * size]
                arr = gguf.quants.dequantize(part, qtype).reshape(r1 - r0, c1 - c0)
            else:
                arr = gguf.quants.dequantize(part, qtype).reshape(r1 - r0, self.shape[1])[:, c0:c1]
        if ARCHITECTURES[self.checkpoint.architecture][1]:
            cfg = self.checkpoint.hf_config
            heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"]}
            for proj, n in heads.items():
                if f".self_attn.{proj}_proj." in self.hf:
                    arr = unpermute_qk(arr, int(n) * (r1 - r0) // self.shape[0])
        return torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
