"""Decode attention over a step's worth of layers, by batch and context length; with --chunk,
prefill-chunk attention instead (the C kernel against the SDPA path).

    python benchmarks/bench_attention.py --batch 8 32 64 --context 192 --kv-cache-dtype bf16 int8
    python benchmarks/bench_attention.py --chunk 512 --batch 1 --context 4096 16384 30720 --layers 2 --repeats 3

Builds, per layer, K and V caches on huge pages as the engine's KV pool does (4 KiB pages
cost 40-50% here: a TLB miss per page jump), each sequence on its own scattered pages, and
times `ops.paged_attention` for one decode token per sequence over every layer back to back,
so each layer's cache comes from memory as in a step. The default shape is the default
model's (30 layers, 9 query and 3 KV heads of 64, pages of 16 tokens). Prints one JSON line
per case and a table of milliseconds per step and the KV bytes read per second.

--chunk N: each sequence brings N new tokens at the end of its context (a prompt chunk over
the prefix before it); `ops.paged_attention` (the AMX chunk kernel where the CPU has it) is
timed against `attend_per_sequence` (torch's SDPA in bf16 on a gathered copy, the fallback).
"""

from __future__ import annotations

import argparse
import json

import torch

from pagoda import ops
from pagoda.ops import ForwardBatch
from pagoda.ops.cpu import huge_pages
from pagoda.ops.kv_quant import quantize_rows
from pagoda.ops.sdpa import attend_per_sequence
from pagoda.platforms import get_platform
from timing import median_and_min_ms  # benchmarks/timing.py, beside this script

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def caches(slots: int, hk: int, d: int, kv_dtype: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(slots, hk, d, generator=g)
    x = quantize_rows(x) if kv_dtype == "int8" else x.to(DTYPES[kv_dtype])
    return huge_pages.copy(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[192])
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("Q", "KV"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=1, help="new tokens per sequence (1: decode)")
    ap.add_argument("--verify", action="store_true",
                    help="the chunk's tokens verify a speculative proposal (each a decode-kernel row)")
    args = ap.parse_args()
    hq, hk = args.heads
    if (min(args.batch) < 1 or args.chunk < 1 or min(args.context) < args.chunk or args.layers < 1 or hk < 1 or hq % hk
            or args.repeats < 1):
        ap.error("batch, chunk, layers and repeats must be positive, contexts at least the chunk, and Q heads a "
                 "multiple of KV heads")
    get_platform("cpu")
    d, ps = args.head_dim, args.page_size
    results = []
    for kv_dtype in args.kv_cache_dtype:
        for batch in args.batch:
            for context in args.context:
                g = torch.Generator().manual_seed(0)
                pages = -(-context // ps)
                table = (torch.randperm(batch * pages, generator=g) + 1).view(batch, pages)  # scattered
                slots = (batch * pages + 1) * ps
                layers = [(caches(slots, hk, d, kv_dtype, g), caches(slots, hk, d, kv_dtype, g))
                          for _ in range(args.layers)]
                n = args.chunk
                meta = ForwardBatch.build([([0] * n, context - n, row) for row in table.tolist()], ps,
                                          torch.device("cpu"), verify_seqs=range(batch) if args.verify else ())
                q = torch.randn(batch * n, hq, d, generator=g)

                def step() -> None:
                    for k, v in layers:
                        ops.paged_attention(q, k, v, meta, d**-0.5, torch.bfloat16)

                def sdpa_step() -> None:
                    out = torch.empty(q.shape, dtype=torch.bfloat16)
                    for k, v in layers:
                        attend_per_sequence(q, k, v, meta, d**-0.5, out, range(batch), torch.bfloat16)

                kv_bytes = 2 * args.layers * batch * context * layers[0][0][0].numel() * layers[0][0].itemsize
                for name, fn in (("paged_attention", step), ("sdpa", sdpa_step)) if n > 1 and not args.verify else (("decode", step),):
                    ms, best = median_and_min_ms(fn, args.repeats, warmup=1 if n > 1 else 3)
                    row = {"bench": f"{'chunk' if n > 1 else 'decode'}_attention", "kernel": name,
                           "kv_cache_dtype": kv_dtype, "batch": batch, "chunk": n, "context": context,
                           "layers": args.layers, "median_ms": round(ms, 3), "min_ms": round(best, 3),
                           "kv_gb_s": round(kv_bytes / ms / 1e6, 1)}
                    print(json.dumps(row))
                    results.append(row)
    print(f"\n{'kernel':<16} {'kv':<8} {'batch':>6} {'chunk':>6} {'context':>8} {'ms/step':>9} {'KV GB/s':>8}")
    for r in results:
        print(f"{r['kernel']:<16} {r['kv_cache_dtype']:<8} {r['batch']:>6} {r['chunk']:>6} {r['context']:>8} "
              f"{r['median_ms']:>9.2f} {r['kv_gb_s']:>8.1f}")


if __name__ == "__main__":
    main()
