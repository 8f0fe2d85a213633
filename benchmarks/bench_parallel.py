"""Tensor-parallel step time and data-parallel serving throughput, each against one of a kind.

    # TP=2 vs TP=1: Engine.step() time at decode (bench_step.py in a fresh process per size)
    .venv/bin/python benchmarks/bench_parallel.py step --tp 1 2 --batch 1 16 \\
        --load-format dummy --model-config benchmarks/configs/qwen2.5-0.5b.json --quantization int4

    # the collective alone: a gloo all-reduce of [rows, hidden] float32 between two processes
    .venv/bin/python benchmarks/bench_parallel.py allreduce --rows 1 16 256 --hidden 896

    # DP=2 (two replicas behind sglang-router) vs one server, 32 streaming clients (bench_serving.py)
    .venv/bin/python benchmarks/bench_parallel.py serve --dp 1 2 --concurrency 32 --num-requests 64

On a 2-core CPU neither is expected to be faster: TP=2 gives each rank one core and adds two
all-reduces per layer plus the step broadcast, so its step time documents what the collectives
cost; DP=2 gives each replica one core. On GPUs the same commands measure the real gains.
Prints each run's JSON line and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The children import this checkout's pagoda (not whichever one is installed).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout
READY = re.compile(r"pagoda ready: .* at (http://\S+?)/v1 ")


def run_step(args: argparse.Namespace, engine_flags: list[str]) -> list[dict]:
    rows = []
    for tp in args.tp:
        cmd = [sys.executable, str(HERE / "bench_step.py"), "--tensor-parallel-size", str(tp), "--batch",
               *map(str, args.batch), "--context", str(args.context), "--steps", str(args.steps), *engine_flags]
        out = _run(cmd)
        for line in out.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
    print(f"\n{'tp':>3} {'batch':>6} {'step ms':>9} {'tok/s':>8}")
    for r in rows:
        print(f"{r['tp']:>3} {r['batch']:>6} {r['step_ms']:>9.2f} {r['tok_s']:>8.1f}")
    return rows


def _allreduce_rank(rank: int, world: int, port: int, sizes: list[int], hidden: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for rows in sizes:
        x = torch.randn(rows, hidden)
        for _ in range(10):
            dist.all_reduce(x)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        us = (time.perf_counter() - t) / iters * 1e6
        if rank == 0:
            out.put({"bench": "all_reduce", "backend": "gloo", "world": world, "rows": rows, "hidden": hidden,
                     "bytes": rows * hidden * 4, "us": round(us, 1)})
    dist.destroy_process_group()


def run_allreduce(args: argparse.Namespace, _: list[str]) -> list[dict]:
    """One gloo all-reduce of a [rows, hidden] float32 tensor between two local processes: what a
    tensor-parallel step pays twice per layer (plus one for the embedding, one gather of the logits)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, 2, port, args.rows, args.hidden, args.iters, out))
             for r in range(2)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=300) for _ in args.rows]
    for p in procs:
        p.join(60)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(args: argparse.Namespace, engine_flags: list[str]) -> list[dict]:
    rows = []
    for dp in args.dp:
        port = _free_port()
        cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--port", str(port), "--dp", str(dp), *engine_flags]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        try:
            url = None
            deadline = time.monotonic() + 300
            assert server.stdout is not None
            for line in server.stdout:
                match = READY.search(line)
                if match:
                    url = match.group(1)
                    break
                if time.monotonic() > deadline:
                    break
            if url is None:
                raise SystemExit(f"the server (dp {dp}) did not start")
            bench = [sys.executable, str(HERE / "bench_serving.py"), "--base-url", url + "/v1", "--concurrency",
                     str(args.concurrency), "--num-requests", str(args.num_requests), "--input-len",
                     str(args.input_len), "--output-len", str(args.output_len)]
            out = _run(bench)
            line = next(x for x in out.splitlines() if x.startswith("{"))
            row = {"dp": dp, **json.loads(line)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"\n{'dp':>3} {'clients':>8} {'out tok/s':>10} {'req/s':>7} {'TTFT p50 ms':>12} {'ITL p50 ms':>11}")
    for r in rows:
        print(f"{r['dp']:>3} {args.concurrency:>8} {r.get('output_tok_s') or float('nan'):>10.1f} "
              f"{r.get('request_s') or float('nan'):>7.2f} {r.get('ttft_p50_ms', float('nan')):>12.0f} "
              f"{r.get('itl_p50_ms', float('nan')):>11.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step", help="TP sizes: decode step time")
    step.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    step.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    step.add_argument("--context", type=int, default=128)
    step.add_argument("--steps", type=int, default=32)
    serve = sub.add_parser("serve", help="DP sizes: serving under concurrent clients")
    serve.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    serve.add_argument("--concurrency", type=int, default=32)
    serve.add_argument("--num-requests", type=int, default=64)
    serve.add_argument("--input-len", type=int, default=128)
    serve.add_argument("--output-len", type=int, default=64)
    ar = sub.add_parser("allreduce", help="the collective alone: gloo all-reduce time between 2 processes")
    ar.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256])
    ar.add_argument("--hidden", type=int, default=896)
    ar.add_argument("--iters", type=int, default=200)
    args, engine_flags = ap.parse_known_args()  # the rest: engine flags (--model, --quantization, ...)
    os.chdir(HERE.parent)
    {"step": run_step, "serve": run_serve, "allreduce": run_allreduce}[args.what](args, engine_flags)


if __name__ == "__main__":
    main()
