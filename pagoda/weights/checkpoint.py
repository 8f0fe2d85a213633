"""The Checkpoint interface and `load_checkpoint`, the one entry point for model files.

Every format resolves to the same two things — a Hugging Face `config.json` style dict
and a stream of (HF tensor name, CPU tensor) pairs — so the model code never learns
where its weights came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pagoda.errors import ModelLoadError
from pagoda.weights.gguf import GGUFCheckpoint
from pagoda.weights.safetensors import SafetensorsCheckpoint


@runtime_checkable
class Checkpoint(Protocol):
    """What a model loader needs: the config, the tensor names, and the tensors one by one."""

    path: Path
    hf_config: dict[str, Any]

    def tensor_names(self) -> list[str]:
        """HF tensor names in the order `tensors()` yields them."""
        ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (name, CPU tensor) pairs; only one tensor is materialized at a time."""
        ...


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a HF model directory (config.json + safetensors) or a GGUF file; nothing is read eagerly."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f"; it holds {ggufs[0].name}: pass that file's path to load a GGUF" if ggufs else ""
            raise ModelLoadError(f"{p} is not a Hugging Face model directory: it has no config.json{hint}")
        return SafetensorsCheckpoint(p)
    if p.suffix == ".safetensors":
        raise ModelLoadError(f"{p} is a single safetensors file: pass the directory that holds it and its config.json")
    return GGUFCheckpoint(p)
