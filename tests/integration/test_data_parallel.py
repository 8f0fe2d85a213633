"""`pagoda serve --data-parallel-size 2`: two tiny-model replicas behind sglang-router on loopback.

One launcher for the module (~10 s to start): cache-aware routing keeps a shared prefix on one
replica, a replica killed under load leaves the other serving every later request, SIGTERM
stops everything. The tiny tokenizer gives text prompts, which the router's prefix tree needs.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import socket
import time

import httpx
import pytest

from pagoda.config import EngineConfig
from pagoda.server.replicas import _core_groups, _engine_flags
from tests.server_utils import ServerProcess, tiny_config_file
from tests.tiny_tokenizer import write_tiny_tokenizer

pytest.importorskip("sglang_router")

PREFIX = "A long shared system prompt about pagodas and their many floors. " * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dp(tmp_path_factory) -> ServerProcess:
    tok = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    server = ServerProcess("--model-config", str(tiny_config_file()), "--load-format", "dummy",
                           "--kv-cache-memory", "0.02", "--tokenizer", str(tok), "--dp", "2",
                           "--port", str(free_port()), "--router-health-check-interval", "1", timeout=120)
    yield server
    server.kill()


def replica_pids(server: ServerProcess) -> dict[int, int]:
    return {int(i): int(pid) for i, pid in re.findall(r"replica (\d+) \(pid (\d+)\) ready", server.stderr_tail(100_000))}


def complete(url: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      json={"model": "dummy", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})


def test_split_of_cores_and_flags() -> None:
    from pagoda.server.replicas import _parse_cpulist

    assert _parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    groups = _core_groups(2)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert sorted(groups[0] | groups[1]) == cpus and not groups[0] & groups[1]
    config = EngineConfig(model_config="x.json", load_format="dummy", kv_cache_memory=0.5, disable_prefix_cache=True)
    assert _engine_flags(config, skip=()) == ["--model-config", "x.json", "--load-format", "dummy",
                                              "--kv-cache-memory", "0.5", "--disable-prefix-cache"]


def test_router_sees_both_replicas_and_their_probes(dp: ServerProcess) -> None:
    workers = httpx.get(dp.url + "/workers", timeout=10).json()["workers"]
    assert len(workers) == 2 and all(w["is_healthy"] and w["model_id"] == "dummy" for w in workers)
    info = httpx.get(workers[0]["url"] + "/get_model_info", timeout=10).json()
    assert info["model_path"] == "dummy" and info["is_generation"] is True
    assert httpx.get(workers[0]["url"] + "/server_info", timeout=10).json()["engine"] == "pagoda"
    assert httpx.get(dp.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "dummy"


def test_shared_prefix_lands_on_one_replica(dp: ServerProcess) -> None:
    """cache_aware: every request after the first finds the prefix cached, so all went to one replica."""
    cached = []
    for i in range(6):
        r = complete(dp.url, f"{PREFIX} Question {i}: how tall?")
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert all(c >= prompt_tokens - 32 for c in cached[1:]), cached


def test_killed_replica_leaves_the_other_serving(dp: ServerProcess) -> None:
    pids = replica_pids(dp)
    assert len(pids) == 2
    with cf.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(complete, dp.url, f"load {i} " * 10, 32) for i in range(24)]
        time.sleep(0.3)
        os.kill(pids[0], 9)
        for f in load:
            try:
                f.result()
            except httpx.HTTPError:
                pass  # in flight on the dead replica: the router may or may not save it
    later = [complete(dp.url, f"later request {i}") for i in range(12)]
    assert [r.status_code for r in later] == [200] * 12
    reported = re.compile(r"ERROR pagoda.replicas: replica 0 \(pid \d+, \S+\) exited with code -9; 1 of 2 replicas left")
    deadline = time.monotonic() + 5
    while not reported.search(dp.stderr_tail(1_000_000)):
        assert time.monotonic() < deadline, "the launcher did not report the dead replica"
        time.sleep(0.2)


def test_sigterm_stops_router_and_replicas(dp: ServerProcess) -> None:
    pids = replica_pids(dp)
    assert dp.terminate(timeout=40) == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(dp.url + "/health", timeout=2)
