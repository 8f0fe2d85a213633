"""pagoda: a fast, portable LLM serving engine.

The public API is imported lazily so `import pagoda` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "pagoda.engine.llm",
    "SamplingParams": "pagoda.engine.sampling_params",
    "EngineConfig": "pagoda.config",
    "AsyncEngine": "pagoda.engine.async_engine",
    "StructuredOutputs": "pagoda.structured",
}

if TYPE_CHECKING:
    from pagoda.config import EngineConfig
    from pagoda.engine.async_engine import AsyncEngine
    from pagoda.engine.llm import LLM
    from pagoda.engine.sampling_params import SamplingParams
    from pagoda.structured import StructuredOutputs


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")


__all__ = ["AsyncEngine", "EngineConfig", "LLM", "SamplingParams", "StructuredOutputs", "__version__"]
