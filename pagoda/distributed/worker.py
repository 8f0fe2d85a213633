"""A tensor-parallel worker rank: load this rank's shard, hold its share of the KV pool, run
every step rank 0 broadcasts, until rank 0 says stop (or goes away).

Started by TensorParallelGroup (``python -m pagoda.distributed.worker``, the engine config as
JSON on stdin), never by hand; `pagoda serve --node-rank K` runs a non-zero node's ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from pagoda.config import EngineConfig
from pagoda.distributed.channel import StepChannel
from pagoda.distributed.launch import TensorParallelGroup, init_group
from pagoda.distributed.parallel import ParallelContext
from pagoda.engine.engine import GiB, build_kv_pool, kv_cache_dtype, kv_cache_size
from pagoda.engine.model_runner import ModelRunner
from pagoda.models.loader import load_model
from pagoda.platforms import detect_platform_name, get_platform

log = logging.getLogger("pagoda.distributed")


def run_rank(config: EngineConfig, rank: int, device: str, threads: int, parallel: ParallelContext | None = None,
             addr: str | None = None, group: TensorParallelGroup | None = None) -> int:
    platform = get_platform(device)
    torch.set_num_threads(threads)
    if parallel is None:
        assert addr is not None
        parallel = init_group(platform, rank, config.tensor_parallel_size, addr)
    label = f"rank {rank} of {config.tensor_parallel_size}"
    platform.seed(config.seed)
    loaded = load_model(config, platform, False, parallel)
    log.info("%s: %.2f GiB of weights (%s) on %s", label, loaded.weight_bytes / GiB, loaded.quantization or loaded.dtype,
             platform.describe())
    size = kv_cache_size(config, platform, loaded, kv_cache_dtype(config, loaded, platform))
    num_pages = torch.tensor([size.num_pages], dtype=torch.long, device=platform.device())
    torch.distributed.all_reduce(num_pages, op=torch.distributed.ReduceOp.MIN, group=parallel.group)
    size = type(size)(int(num_pages.item()), size.bytes_per_page, size.dtype)
    pool = build_kv_pool(config, platform, loaded, size)
    log.info("%s: KV cache %d tokens in %d pages (%.2f GiB, %s, %d KV heads)", label, size.num_pages * config.page_size,
             size.num_pages, size.num_pages * size.bytes_per_page / GiB, str(size.dtype).removeprefix("torch."),
             loaded.kv_heads)
    runner = ModelRunner(loaded.model, pool, platform.device())
    channel = StepChannel(parallel, platform.device())
    with torch.inference_mode():
        while True:
            try:
                batch = channel.recv_step(pool.layers)
            except RuntimeError as e:  # rank 0 is gone
                log.error("%s: rank 0 went away (%s); exiting", label, str(e).splitlines()[0] if str(e) else e)
                return 1
            if batch is None:
                break
            runner.forward(batch)
    if group is not None:
        group.stop()
    log.info("%s: stopped", label)
    return 0


def serve_node(config: EngineConfig) -> int:
    """`pagoda serve --node-rank K` (K > 0): this node's ranks, the first in this process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    group = TensorParallelGroup(config, detect_platform_name(config.device))
    return run_rank(config, group.first_rank, str(group.device), group.threads, group.ctx, group=group)


def main() -> None:
    parser = argparse.ArgumentParser(prog="pagoda.distributed.worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--local-rank", type=int, required=True)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    config = EngineConfig(**json.loads(sys.stdin.read()))
    try:
        code = run_rank(config, args.rank, args.device, args.threads, addr=args.addr)
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    os._exit(code)  # no waiting on the process group's threads


if __name__ == "__main__":
    main()
