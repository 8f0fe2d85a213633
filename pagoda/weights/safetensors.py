"""Hugging Face model directories: config.json plus one or many (indexed) safetensors files.

Headers are read up front so a broken download fails at load time with the file named,
not halfway through copying weights; tensor data is read lazily, one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open

from pagoda.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object, turning every failure into a ModelLoadError that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _header_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type, or OSError
        raise ModelLoadError(f"{file} is not a readable safetensors file: {e}") from None


class SafetensorsCheckpoint:
    """A HF directory; tensors keep their stored dtype."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hf_config: dict[str, Any] = read_json(path / "config.json")
        self._shards: dict[Path, list[str]] = self._plan()

    def _plan(self) -> dict[Path, list[str]]:
        """Map each safetensors file to the tensor names to read from it."""
        index = self.path / INDEX_NAME
        if index.is_file():
            return self._plan_from_index(index)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path} holds no *.safetensors weight files")
        shards: dict[Path, list[str]] = {}
        seen: dict[str, Path] = {}
        for file in files:
            keys = _header_keys(file)
            for key in keys:
                if key in seen:
                    raise ModelLoadError(f"tensor {key!r} is in both {seen[key].name} and {file.name}")
                seen[key] = file
            shards[file] = keys
        return shards

    def _plan_from_index(self, index: Path) -> dict[Path, list[str]]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no \"weight_map\" object")
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(self.path / str(shard), []).append(name)
        for file, names in shards.items():
            if not file.is_file():
                raise ModelLoadError(f"{index.name} names shard {file.name}, which is missing from {self.path}")
            missing = sorted(set(names) - set(_header_keys(file)))
            if missing:
                raise ModelLoadError(f"{index.name} puts {missing[0]!r} in {file.name}, but that shard lacks it")
        return dict(sorted(shards.items()))

    def tensor_names(self) -> list[str]:
        return [name for names in self._shards.values() for name in names]

    slices = True  # tensors(lazy=True) yields slices that read only the rows/columns taken

    def tensors(self, lazy: bool = False) -> Iterator[tuple[str, Any]]:
        """(name, tensor) pairs; with ``lazy``, (name, safetensors slice): ``s.get_shape()`` and
        ``s[a:b]`` / ``s[:, a:b]`` read just that part of the file (a tensor-parallel rank's share)."""
        for file, names in self._shards.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    yield name, (f.get_slice(name) if lazy else f.get_tensor(name))
