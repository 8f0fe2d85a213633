"""A 35B-class model on one box: start-up, memory, TTFT and decode with dummy int4 weights.

    python benchmarks/bench_big_model.py --model-config jiutian35b.json

The config is the Jiutian-35B shape from shared/JIUTIAN.md (hidden 7168, intermediate
21504, 56 layers, 56 heads / 8 KV heads, vocab 152064); weights are random, made and
quantized to int4 one block of rows at a time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from pagoda import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--int4-group-size", type=int, default=128)
    ap.add_argument("--kv-cache-memory", type=float, default=0.5)
    ap.add_argument("--long-prompt", type=int, default=1024, help="TTFT prompt length (0 to skip)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(model_config=args.model_config, load_format="dummy", quantization="int4",
              int4_group_size=args.int4_group_size, dtype="bfloat16", kv_cache_memory=args.kv_cache_memory,
              max_running_requests=8)
    result = {"bench": "big_model", "startup_s": round(time.perf_counter() - t0, 1),
              "weight_gib": round(llm.engine.loaded.weight_bytes / 2**30, 2)}
    print(json.dumps(result), flush=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([[5] * 128], one, use_tqdm=False)
    result["ttft_128_s"] = round(time.perf_counter() - t, 1)
    eight = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([[7] * 16], eight, use_tqdm=False)[0]
    m = out.metrics
    result["decode_1_tok_s"] = round(7 / (m.finish_time - m.first_token_time), 2)
    outs = llm.generate([[9 + i] * 16 for i in range(8)], eight, use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finish_time for o in outs)
    result["decode_8_tok_s"] = round(8 * 7 / (last - first), 2)
    print(json.dumps(result), flush=True)
    if args.long_prompt:
        t = time.perf_counter()
        llm.generate([[11] * args.long_prompt], one, use_tqdm=False)
        result[f"ttft_{args.long_prompt}_s"] = round(time.perf_counter() - t, 1)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
