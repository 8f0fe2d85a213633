"""Offline throughput, single-stream decode, load time and peak memory of pagoda.

    python benchmarks/bench_offline.py --num-prompts 256 --input-len 128 --output-len 128

Prints one JSON line (for machines) and a table (for people).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

from pagoda import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, choices=("bf16", "int8", "int4"))
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128, help="single-stream decode length")
    args = ap.parse_args()

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization,
              max_running_requests=args.max_running_requests)
    load_s = time.perf_counter() - t0
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    one = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    llm.generate([[rng.randrange(100, vocab) for _ in range(16)]], one, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    out = llm.generate([[rng.randrange(100, vocab) for _ in range(16)]], one, use_tqdm=False)[0]
    first = out.metrics.first_token_time - out.metrics.arrival_time
    decode_tps = (args.decode_tokens - 1) / (time.perf_counter() - t - first)

    prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "bench": "offline",
        "model": str(llm.engine.loaded.path),
        "dtype": str(llm.engine.loaded.dtype).removeprefix("torch."),
        "quantization": args.quantization,
        "load_s": round(load_s, 2),
        "rss_after_load_mb": round(rss_after_load),
        "single_stream_decode_tok_s": round(decode_tps, 1),
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_running_requests": args.max_running_requests,
        "output_tok_s": round(generated / elapsed, 1),
        "total_tok_s": round((generated + args.num_prompts * args.input_len) / elapsed, 1),
        "elapsed_s": round(elapsed, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    for key, value in result.items():
        print(f"  {key:<28} {value}")


if __name__ == "__main__":
    main()
