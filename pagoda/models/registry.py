"""Architecture name -> model class, imported lazily so unused models cost nothing."""

from __future__ import annotations

import importlib

from torch import nn

from pagoda.errors import ConfigError
from pagoda.models.config import ARCHITECTURES

# Every supported architecture is a config variant of the one Llama-family model.
_MODELS: dict[str, tuple[str, str]] = {arch: ("pagoda.models.llama", "LlamaForCausalLM") for arch in ARCHITECTURES}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        module, name = _MODELS[architecture]
    except KeyError:
        raise ConfigError(f"unsupported architecture {architecture!r} (supported: {', '.join(_MODELS)})") from None
    return getattr(importlib.import_module(module), name)
