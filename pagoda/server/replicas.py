"""`pagoda serve --data-parallel-size N`: N replicas behind sglang-router, in one command.

Each replica is an ordinary `pagoda serve` process on an internal loopback port (port 0: the
replica picks a free one and prints it in its ready line); the router (PyPI ``sglang-router``,
started as ``python -m sglang_router.launch_router``) listens on ``--host``/``--port`` and
routes over them: cache-aware by default (requests that share a prefix go to the replica that
has it cached), shortest queue when the load is unbalanced, health checks and retries on
failure. pagoda writes no routing of its own: this module only starts, watches and stops
processes.

Placement: on CPU each replica gets a NUMA node when there are N of them, else one of N
contiguous groups of the cores this process may use (pinned with sched_setaffinity,
``--num-threads`` divided among them); on a GPU host
replica i gets devices ``i*tp .. i*tp+tp-1`` (``--data-parallel-size`` times
``--tensor-parallel-size`` devices in all).

Lifetime: SIGTERM/SIGINT stop the router, then drain and stop every replica, and the command
exits 0. A replica that dies is reported on stderr (the router's health checks and retries
move its traffic to the others); the command fails when no replica is left or the router dies.
Children get SIGKILL if this process is killed outright (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO

from pagoda.config import EngineConfig
from pagoda.errors import ConfigError, PagodaError

log = logging.getLogger("pagoda.replicas")

READY = re.compile(r"pagoda ready: .* at (http://\S+?)/v1 ")
ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass
class RouterOptions:
    """The router's own flags that `pagoda serve` names; anything else goes in ``extra``
    (``--router-args '...'``, passed through to sglang_router.launch_router verbatim)."""

    policy: str = "cache_aware"
    health_check_interval: int = 5
    extra: list[str] = field(default_factory=list)


def _parse_cpulist(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _numa_nodes(cpus: set[int]) -> list[set[int]]:
    """This process's CPUs per NUMA node (nodes without any left out)."""
    nodes = []
    for path in sorted(Path("/sys/devices/system/node").glob("node[0-9]*/cpulist")):
        try:
            mine = _parse_cpulist(path.read_text()) & cpus
        except (OSError, ValueError):
            continue
        if mine:
            nodes.append(mine)
    return nodes


def _core_groups(n: int) -> list[set[int] | None]:
    """The CPUs this process may run on, one NUMA node per replica when there are n nodes,
    else split into n contiguous groups (None: fewer cores than replicas)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [None] * n
    if len(cpus) < n:
        return [None] * n
    nodes = _numa_nodes(set(cpus))
    if len(nodes) == n:
        return nodes
    size, rest = divmod(len(cpus), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < rest else 0)
        groups.append(set(cpus[start:end]))
        start = end
    return groups


def _child_setup(cpus: set[int] | None):
    def setup() -> None:
        os.setpgrp()  # a Ctrl-C in the terminal reaches the launcher only; it stops the children
        try:  # die with the launcher even if it is SIGKILLed
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def _engine_flags(config: EngineConfig, skip: tuple[str, ...]) -> list[str]:
    """Command-line flags that rebuild ``config`` (only the fields off their default)."""
    out: list[str] = []
    for f in fields(EngineConfig):
        value = getattr(config, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out


class _Child:
    """One child process whose stdout/stderr lines are relayed to ours with a prefix."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cpus: set[int] | None) -> None:
        self.name = name
        self.url: str | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=_child_setup(cpus), errors="replace")
        # Both of a child's streams go to our stderr, so our stdout carries one ready line: ours.
        for stream, watched in ((self.proc.stdout, True), (self.proc.stderr, False)):
            threading.Thread(target=self._relay, args=(stream, watched), daemon=True).start()

    def _relay(self, stream: IO[str], watched: bool) -> None:
        for line in stream:
            if watched:
                self.lines.put(line)
            try:
                sys.stderr.write(f"[{self.name}] {line}")
                sys.stderr.flush()
            except ValueError:  # our stream closed at exit
                return
        if watched:
            self.lines.put(None)

    def wait_ready(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line is None:
                break
            match = READY.search(line)
            if match:
                self.url = match.group(1)
                return self.url
        code = self.proc.poll()
        raise PagodaError(f"{self.name} did not start" + (f" (exit code {code})" if code is not None else
                                                           " in time"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


class ReplicaSet:
    """Start N replicas and the router, watch them, stop them all."""

    def __init__(
        self, config: EngineConfig, serve_flags: list[str], data_parallel_size: int, host: str, port: int,
        router: RouterOptions, api_key: str | None = None, shutdown_timeout: float = 30.0,
        served_model_name: str | None = None, startup_timeout: float = 600.0,
    ) -> None:
        if data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be positive (got {data_parallel_size})")
        if router.policy not in ROUTER_POLICIES:
            raise ConfigError(f"router policy must be one of {', '.join(ROUTER_POLICIES)} (got {router.policy!r})")
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            raise ConfigError("--data-parallel-size needs the router: pip install sglang-router") from None
        self.config, self.serve_flags, self.n = config, serve_flags, data_parallel_size
        self.host, self.port, self.router_opts = host, port, router
        self.api_key, self.shutdown_timeout = api_key, shutdown_timeout
        self.served_model_name, self.startup_timeout = served_model_name, startup_timeout
        self.replicas: list[_Child] = []
        self.router: _Child | None = None
        self._stop = threading.Event()
        self._reported: set[int] = set()

    # ---- placement -------------------------------------------------------------------------

    def _placement(self) -> list[tuple[list[str], set[int] | None]]:
        """(extra engine flags, CPUs to pin to) per replica."""
        from pagoda.platforms import detect_platform_name

        kind = detect_platform_name(self.config.device)
        tp = self.config.tensor_parallel_size
        if kind == "cpu":
            groups = _core_groups(self.n)
            total = self.config.num_threads or len(os.sched_getaffinity(0))
            threads = max(1, total // self.n)
            return [(["--device", "cpu", "--num-threads", str(threads)], g) for g in groups]
        if self.config.nnodes > 1:
            raise ConfigError("--data-parallel-size with --nnodes is not supported: start one group per replica")
        base = 0
        if ":" in self.config.device:
            base = int(self.config.device.partition(":")[2] or 0)
        return [(["--device", f"{kind}:{base + i * tp}"], None) for i in range(self.n)]

    # ---- start -----------------------------------------------------------------------------

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.api_key:
            env["PAGODA_API_KEY"] = self.api_key  # never on a command line
        engine = _engine_flags(self.config, skip=("device", "num_threads"))
        for i, (flags, cpus) in enumerate(self._placement()):
            cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                   *self.serve_flags, *engine, *flags]
            self.replicas.append(_Child(f"replica {i}", cmd, env, cpus))
        deadline = time.monotonic() + self.startup_timeout
        urls = [r.wait_ready(deadline) for r in self.replicas]
        for i, (r, url) in enumerate(zip(self.replicas, urls)):
            log.info("replica %d (pid %d) ready at %s", i, r.proc.pid, url)
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port),
               "--worker-urls", *urls, "--policy", self.router_opts.policy,
               "--health-check-interval-secs", str(self.router_opts.health_check_interval),
               "--shutdown-grace-period-secs", str(max(1, int(self.shutdown_timeout))),
               "--log-level", "warn", *self.router_opts.extra]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.router = _Child("router", cmd, env, None)
        self._wait_router(deadline)

    def _wait_router(self, deadline: float) -> None:
        """Ready when the router answers and has registered every replica (it registers them in the
        background after it starts listening)."""
        assert self.router is not None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        url = f"http://{host}:{self.port}"
        url = url if ":" not in host else f"http://[{host}]:{self.port}"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if not self.router.alive():
                raise PagodaError(f"the router exited (code {self.router.proc.returncode}) before it was ready")
            try:
                req = urllib.request.Request(f"{url}/workers", headers=headers)
                with urllib.request.urlopen(req, timeout=2) as r:
                    if _count_workers(json.loads(r.read())) >= self.n:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        else:
            raise PagodaError("the router did not register the replicas in time")
        name = self.served_model_name or _served_name(self.config)
        shown = f"http://{self.host}:{self.port}" if ":" not in self.host else f"http://[{self.host}]:{self.port}"
        print(f"pagoda ready: serving {name} at {shown}/v1 ({self.n} replicas behind sglang-router, policy "
              f"{self.router_opts.policy})", flush=True)

    # ---- watch and stop --------------------------------------------------------------------

    def run(self) -> int:
        """Start, then watch until a signal (exit 0) or until the service cannot go on (exit 1)."""
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        code = 0
        try:
            self.start()
            code = self._watch()
        finally:
            self.stop()
            for sig, handler in originals.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, sig: int, frame: object) -> None:
        if not self._stop.is_set():
            log.info("%s received: stopping the router and draining the replicas", signal.Signals(sig).name)
        self._stop.set()
        if self.router is None:  # still starting: interrupt the wait
            raise KeyboardInterrupt

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            assert self.router is not None
            if not self.router.alive():
                log.error("the router exited (code %s): stopping the replicas", self.router.proc.returncode)
                return 1
            for i, r in enumerate(self.replicas):
                if not r.alive() and i not in self._reported:
                    self._reported.add(i)
                    left = sum(x.alive() for x in self.replicas)
                    log.error("replica %d (pid %d, %s) exited with code %s; %d of %d replicas left serving",
                              i, r.proc.pid, r.url, r.proc.returncode, left, self.n)
            if not any(r.alive() for r in self.replicas):
                log.error("no replica is left: stopping")
                return 1
        return 0

    def stop(self) -> None:
        if self.router is not None:  # first the router: it stops taking requests and lets in-flight ones finish
            self.router.stop()
            try:
                self.router.proc.wait(self.shutdown_timeout + 5)
            except subprocess.TimeoutExpired:
                self.router.stop(signal.SIGKILL)
        for r in self.replicas:
            r.stop()
        deadline = time.monotonic() + self.shutdown_timeout + 10
        for r in self.replicas:
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.stop(signal.SIGKILL)
                r.proc.wait(5)


def _count_workers(body: object) -> int:
    if isinstance(body, dict):
        for key in ("workers", "urls"):
            if isinstance(body.get(key), list):
                return len(body[key])
        stats = body.get("stats")
        if isinstance(stats, dict) and isinstance(stats.get("total_workers"), int):
            return stats["total_workers"]
    if isinstance(body, list):
        return len(body)
    return 0


def _served_name(config: EngineConfig) -> str:
    from pagoda.server.launch import default_served_name

    return default_served_name(config)


def router_options(policy: str, health_check_interval: int, router_args: str | None) -> RouterOptions:
    return RouterOptions(policy=policy, health_check_interval=health_check_interval,
                         extra=shlex.split(router_args or ""))
