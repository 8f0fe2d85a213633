"""Start a tensor-parallel group: spawn this node's worker processes, open the process group
with the platform's backend, watch the workers.

Ranks are laid out node by node: node k runs ranks ``k*L .. k*L+L-1`` (L = tp / nnodes), local
rank i on device index i (CPU: one group of cores each). Rank 0 is the process that runs the
scheduler, the tokenizer and the server; every other rank is a `pagoda.distributed.worker`
process. A local worker that exits while the group is up takes rank 0 down at once with one
line on stderr (a rank blocked in a collective would otherwise wait for gloo's timeout); a
remote one shows up as a failed collective, handled the same way.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pagoda.config import EngineConfig
from pagoda.distributed.parallel import ParallelContext
from pagoda.errors import ConfigError
from pagoda.platforms import Platform, get_platform

log = logging.getLogger("pagoda.distributed")

# A collective that waits longer than this has lost a rank (steps take milliseconds to seconds).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def local_ranks(config: EngineConfig) -> range:
    tp, nnodes = config.tensor_parallel_size, config.nnodes
    if tp % nnodes:
        raise ConfigError(f"--tensor-parallel-size {tp} must be a multiple of --nnodes {nnodes}")
    per_node = tp // nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def rank_device(config: EngineConfig, platform_name: str, local_rank: int) -> str:
    if platform_name == "cpu":
        return "cpu"
    base = int(config.device.partition(":")[2] or 0) if ":" in config.device else 0
    return f"{platform_name}:{base + local_rank}"


def rank_threads(config: EngineConfig, num_local: int) -> int:
    """CPU threads per rank: --num-threads (or all cores) shared among this node's ranks."""
    total = config.num_threads or len(os.sched_getaffinity(0))
    return max(1, total // num_local)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fatal(message: str) -> None:
    """One line on stderr, then exit at once (threads blocked in collectives cannot be joined)."""
    try:
        sys.stderr.write(f"pagoda: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def init_group(platform: Platform, rank: int, world: int, addr: str) -> ParallelContext:
    dist.init_process_group(platform.dist_backend, init_method=f"tcp://{addr}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return ParallelContext(rank, world, dist.group.WORLD)


class TensorParallelGroup:
    """This node's side of the group: its spawned workers and the parallel context of the
    process that created it (rank 0 on node 0, the node's first rank elsewhere)."""

    def __init__(self, config: EngineConfig, platform_name: str) -> None:
        self.config = config
        ranks = local_ranks(config)
        self.first_rank = ranks[0]
        if config.node_rank >= config.nnodes:
            raise ConfigError(f"--node-rank {config.node_rank} must be below --nnodes {config.nnodes}")
        if config.nnodes > 1 and not config.dist_init_addr:
            raise ConfigError("--nnodes above 1 needs --dist-init-addr HOST:PORT (rank 0's node, a free port)")
        self.addr = config.dist_init_addr or f"127.0.0.1:{_free_port()}"
        self.threads = rank_threads(config, len(ranks))
        self.workers: dict[int, subprocess.Popen] = {}
        self._stopping = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads)}
        payload = json.dumps(dataclasses.asdict(config))
        for local, rank in enumerate(ranks):
            if rank == self.first_rank:
                continue
            cmd = [sys.executable, "-m", "pagoda.distributed.worker", "--rank", str(rank), "--local-rank", str(local),
                   "--addr", self.addr, "--device", rank_device(config, platform_name, local),
                   "--threads", str(self.threads)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, text=True, preexec_fn=_die_with_parent)
            assert proc.stdin is not None
            proc.stdin.write(payload)
            proc.stdin.close()
            self.workers[rank] = proc
        threading.Thread(target=self._watch, name="pagoda-tp-watch", daemon=True).start()
        self.ctx = self._init(platform_name)

    def _init(self, platform_name: str) -> ParallelContext:
        platform = get_platform(rank_device(self.config, platform_name, 0))
        self.device = platform.device()
        return init_group(platform, self.first_rank, self.config.tensor_parallel_size, self.addr)

    def _watch(self) -> None:
        while not self._stopping:
            for rank, proc in self.workers.items():
                code = proc.poll()
                if code is not None and not self._stopping:
                    fatal(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {code}; "
                          "the server cannot go on without it")
            time.sleep(0.2)

    def agree_pages(self, num_pages: int) -> int:
        """The KV pages every rank can hold (the smallest of the ranks' budgets)."""
        value = torch.tensor([num_pages], dtype=torch.long, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.ctx.group)
        return int(value.item())

    def stop(self, channel=None, timeout: float = 10.0) -> None:
        """Tell the workers to stop (they leave their loop), wait, then kill any left."""
        if self._stopping:
            return
        self._stopping = True
        if channel is not None:
            try:
                channel.send_stop()
            except Exception:  # a worker already gone: nothing to tell
                pass
        deadline = time.monotonic() + timeout
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
