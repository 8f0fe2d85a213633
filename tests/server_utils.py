"""Run the real server in a subprocess for tests: ``pagoda serve --port 0``, with the URL
read from its ready line, stderr kept in a file for failure messages, and Prometheus scraping."""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TINY_LLAMA

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"pagoda ready: .* at (http://\S+?)/v1 ")
API_KEY = "sk-pagoda-test"


class ServerProcess:
    """One server process; ``url`` is set once it printed its ready line."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagoda-server-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_ready(timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            match = READY.search(line)
            if match:
                return match.group(1)
        self.kill()
        raise RuntimeError(f"server did not become ready:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (samples only)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def tiny_config_file() -> Path:
    path = Path(tempfile.gettempdir()) / f"pagoda-tiny-{os.getpid()}.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def tiny_server(*extra: str) -> ServerProcess:
    """The random-weight tiny Llama (no tokenizer: token-id prompts), a small KV cache."""
    return ServerProcess("--model-config", str(tiny_config_file()), "--load-format", "dummy",
                         "--kv-cache-memory", "0.02", *extra)


_shared: dict[str, ServerProcess] = {}


def shared_real_server() -> ServerProcess:
    """One default-model server for every test module that wants it (loading takes ~10 s)."""
    if "real" not in _shared:
        _shared["real"] = ServerProcess()
        atexit.register(_shared["real"].terminate)
    return _shared["real"]


def sse_payloads(lines: Any) -> list[Any]:
    """Parse ``data:`` lines of an SSE body into JSON objects, stopping at [DONE] (included as the str)."""
    out: list[Any] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            out.append(data)
            break
        out.append(json.loads(data))
    return out


def run_in_app(engine, coro_fn, **app_options: Any) -> Any:
    """coro_fn(http, client) against a fresh in-process app around a shared AsyncEngine (model
    "tiny"): `http` an httpx client on the app, `client` the openai SDK's over it."""
    import asyncio

    import openai

    from pagoda.server.app import create_app

    app = create_app(engine, "tiny", **app_options)

    async def main() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0)
            return await coro_fn(http, client)

    return asyncio.run(main())
