"""Time of each quantized projection of the default model, by row count.

    python benchmarks/bench_matmul.py --quantization int4 --rows 1 8 16 32 64 512 2048

Loads the model (a small KV cache), takes one layer's q/k/v, output, gate/up and down
projections and the output head, and times `ops.int4_linear` / `ops.int8_linear` on random
bfloat16 activations: best of --repeats calls after warm-up, so the weights are warm in
cache (a decode step streams them from memory instead). Shows which kernel path a row count
takes (FMA below 5 rows, exact AMX to 16, rounded AMX beyond, where the CPU has AMX).
Prints one JSON line per (projection, rows) and a table of microseconds and GMAC/s.

    python benchmarks/bench_matmul.py --stack --rows 8 16 32 64

--stack times what a decode step does instead: every layer's four projections and the
head back to back (median of --repeats passes), so the weights stream from memory.
"""

from __future__ import annotations

import argparse
import json

import torch

from pagoda import LLM, ops
from pagoda.ops.quant import Int4Weight
from timing import median_and_min_ms  # benchmarks/timing.py, beside this script

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def stack_times(model, rows_list: list[int], repeats: int) -> None:
    weights = [layer.get_submodule(name).qweight for layer in model.layers for name in PROJECTIONS]
    weights.append(model.lm_head.qweight)
    print(f"\nwhole stack ({len(model.layers)} layers x {len(PROJECTIONS)} projections + head), ms per pass")
    for rows in rows_list:
        xs = [torch.randn(rows, w.in_features).bfloat16() for w in weights]
        ops_ = [ops.int4_linear if isinstance(w, Int4Weight) else ops.int8_linear for w in weights]

        def stack() -> None:
            for op, x, w in zip(ops_, xs, weights):
                op(x, w)

        ms, best = median_and_min_ms(stack, repeats)
        print(json.dumps({"bench": "matmul_stack", "rows": rows, "median_ms": round(ms, 2), "min_ms": round(best, 2)}))
        print(f"  {rows:>5} rows  {ms:8.2f} ms (min {best:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default="int4", choices=("int4", "int8"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 512, 2048])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--stack", action="store_true", help="all layers back to back, weights streamed from memory")
    args = ap.parse_args()
    if min(args.rows) < 1 or args.repeats < 1:
        ap.error("--rows and --repeats must be positive")

    model = LLM(model=args.model, quantization=args.quantization, kv_cache_memory=0.05).engine.runner.model
    if not 0 <= args.layer < len(model.layers):
        ap.error(f"--layer must be in 0..{len(model.layers) - 1}")
    if args.stack:
        stack_times(model, args.rows, args.repeats)
        return
    linears = {name: model.layers[args.layer].get_submodule(name) for name in PROJECTIONS}
    linears["lm_head"] = model.lm_head
    results = []
    for name, linear in linears.items():
        w = linear.qweight
        op = ops.int4_linear if isinstance(w, Int4Weight) else ops.int8_linear
        for rows in args.rows:
            x = torch.randn(rows, w.in_features).bfloat16()
            us = median_and_min_ms(lambda: op(x, w), args.repeats)[1] * 1e3  # the best call
            row = {"bench": "matmul", "projection": name, "kind": op.name, "rows": rows, "n": w.out_features,
                   "k": w.in_features, "us": round(us, 1), "gmac_s": round(rows * w.out_features * w.in_features / us / 1e3, 1)}
            print(json.dumps(row))
            results.append(row)

    print(f"\nmicroseconds and GMAC/s per row count\n{'projection':<20} {'N x K':>12} "
          + "".join(f"{f'{r} rows':>16}" for r in args.rows))
    for name in linears:
        mine = [r for r in results if r["projection"] == name]
        cells = "".join(f"{r['us']:>8.0f} us {r['gmac_s']:>4.0f}" for r in mine)
        print(f"{name:<20} {mine[0]['n']:>5} x {mine[0]['k']:<5} {cells}")


if __name__ == "__main__":
    main()
