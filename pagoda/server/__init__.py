"""The OpenAI-compatible HTTP server: ``create_app`` builds the FastAPI app around an AsyncEngine,
``serve`` runs it with uvicorn. Imported lazily so `import pagoda.server` stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagoda.server.app import create_app
    from pagoda.server.launch import serve

_EXPORTS = {"create_app": "pagoda.server.app", "serve": "pagoda.server.launch"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagoda.server' has no attribute {name!r}")


__all__ = ["create_app", "serve"]
