"""Decode step time of the engine alone (no HTTP, no sampling variety), with a profile.

    python benchmarks/bench_step.py --quantization bf16 --batch 1 64 [--profile]
    python benchmarks/bench_step.py --device cuda --load-format dummy \
        --model-config benchmarks/configs/llama3-8b.json --batch 1 32 256

Fills the engine with `batch` sequences whose prompts are `--context` tokens, lets them
all reach decode, then times `Engine.step()` (schedule, forward, greedy sample, outputs).
Prints one JSON line per batch size and, with --profile, torch's op table.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time

import torch

from pagoda import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights from --model-config's shape")
    ap.add_argument("--model-config", default=None, help="config.json of the shape to build (with dummy)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks (processes) the model is split over")
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--disable-graphs", action="store_true", help="decode eagerly (graphs: CUDA/MUSA only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the engine's set-up lines (graphs' capture)

    llm = LLM(model=args.model, quantization=args.quantization, device=args.device, dtype=args.dtype,
              kv_cache_dtype=args.kv_cache_dtype, load_format=args.load_format, model_config=args.model_config,
              max_running_requests=max(args.batch), disable_graphs=args.disable_graphs,
              tensor_parallel_size=args.tensor_parallel_size, num_threads=args.num_threads)
    engine = llm.engine
    device = engine.platform.describe()
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True)
    for batch in args.batch:
        ids = []
        for _ in range(batch):
            ids.append(engine.new_request_id())
            engine.add_request(ids[-1], [rng.randrange(100, vocab) for _ in range(args.context)], params)
        while engine.stats().num_waiting or any(r.in_prefill for r in engine.scheduler.running):
            engine.step()
        for _ in range(4):
            engine.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_ms = (time.perf_counter() - t) / args.steps * 1000
        print(json.dumps({"bench": "step", "device": device, "graphs": engine.runner.graphs is not None,
                          "quantization": args.quantization,
                          "kv_cache_dtype": str(engine.kv_pool.k[0].dtype).removeprefix("torch."), "batch": batch,
                          "tp": args.tensor_parallel_size,
                          "context": args.context, "step_ms": round(step_ms, 2),
                          "tok_s": round(batch * 1000 / step_ms, 1)}))
        if args.profile:
            with torch.profiler.profile() as prof:
                for _ in range(8):
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        for rid in ids:
            engine.abort(rid)
    engine.close()


if __name__ == "__main__":
    main()
