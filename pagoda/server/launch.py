"""Run the server: load the engine, print one "ready" line, serve with uvicorn, drain on SIGTERM.

SIGTERM (and Ctrl-C) stop accepting connections at once, let in-flight requests finish for up to
``shutdown_timeout`` seconds (then abort them), stop the engine and return, so the process exits 0:
what an orchestrator's rolling restart expects.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from pagoda.config import EngineConfig
from pagoda.engine.async_engine import AsyncEngine
from pagoda.server.app import create_app
from pagoda.server.reasoning_parsers import get_reasoning_parser
from pagoda.server.tool_parsers import get_tool_parser

log = logging.getLogger("pagoda.server")


def default_served_name(config: EngineConfig) -> str:
    if config.model:
        path = Path(config.model)
        return path.stem if path.suffix.lower() == ".gguf" else path.name or config.model
    if config.load_format == "dummy" and config.model_config:
        return "dummy"
    from pagoda.weights.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


class _Server(uvicorn.Server):
    """uvicorn, plus: the ready line once the socket is bound (with the real port, so port 0
    works), a draining flag for /health, and no re-raise of SIGTERM after a clean drain."""

    def __init__(self, config: uvicorn.Config, banner: str) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not getattr(self, "servers", None):
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(self.banner.format(url=f"http://{host}:{port}"), flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("%s received: draining in-flight requests (up to %ss)", signal.Signals(sig).name,
                     self.config.timeout_graceful_shutdown)
        app = self.config.app
        if hasattr(app, "state"):
            app.state.draining = True
        self.handle_exit(sig, frame)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("pagoda")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)


def serve(
    config: EngineConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    tool_call_parser: str = "hermes",
    reasoning_parser: str | None = None,
    pooling: str = "last",
) -> None:
    """Load the model (with a progress bar), serve until SIGTERM/SIGINT, drain, shut down."""
    setup_logging()
    # Unknown parser names fail before the model loads.
    get_tool_parser(tool_call_parser)
    if reasoning_parser:
        get_reasoning_parser(reasoning_parser)
    engine = AsyncEngine(config, show_progress=True)
    try:
        name = served_model_name or default_served_name(config)
        app = create_app(engine, name, api_key, tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                         pooling=pooling)
        uv_config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=math.ceil(shutdown_timeout), timeout_keep_alive=5,
        )
        banner = f"pagoda ready: serving {name} at {{url}}/v1 (chat page: {{url}}/)"
        _Server(uv_config, banner).run()
    finally:
        engine.shutdown()
    log.info("server stopped")


if __name__ == "__main__":
    from pagoda.server.__main__ import main

    main()
