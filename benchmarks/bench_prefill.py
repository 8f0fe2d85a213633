"""Prefill throughput by prompt length, and time-to-first-token with and without a prefix-cache hit.

    python benchmarks/bench_prefill.py --prompt-lens 512 2048 8192 --chunk 512 --repeats 3

Prefill: per prompt length, one request of fresh random tokens and max_tokens=1, repeated
--repeats times (a new prompt each time, so the prefix cache never hits); the median TTFT
and prompt_len / TTFT are reported. Prefix cache: a --prefix-len shared prefix with a
--suffix-len unique suffix, first cold (miss), then --repeats times with the same prefix and
a new suffix (hit, median), with the engine's cached/computed prompt tokens per hit request.

Prints one JSON line per measurement (for machines) and a table (for people).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

from pagoda import LLM, SamplingParams


def _ttft(llm: LLM, prompt: list[int], params: SamplingParams) -> float:
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return out.metrics.first_token_time - out.metrics.arrival_time


def _per(total: int, n: int) -> float | int:
    return total // n if total % n == 0 else round(total / n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default=None, choices=("bf16", "int8", "int4"))
    ap.add_argument("--chunk", type=int, default=512, help="--chunked-prefill-size (0: the whole prompt at once)")
    ap.add_argument("--max-batched-tokens", type=int, default=None, help="default: the engine's (the platform's)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per prompt length, and prefix-cache hits")
    ap.add_argument("--skip-prefill", action="store_true", help="skip the prefill-throughput part")
    ap.add_argument("--skip-prefix-cache", action="store_true", help="skip the prefix-cache part")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    llm = LLM(model=args.model, quantization=args.quantization, chunked_prefill_size=args.chunk,
              max_batched_tokens=args.max_batched_tokens)
    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    max_prompt = engine.context_length - 1  # leave room for the one generated token
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    _ttft(llm, fresh(64), params)  # warm-up
    rows: list[dict] = []

    if not args.skip_prefill:
        for requested in args.prompt_lens:
            n = min(requested, max_prompt)
            if n != requested:
                print(f"note: prompt length {requested} clamped to {n} (context length {engine.context_length})")
            ttft = statistics.median(_ttft(llm, fresh(n), params) for _ in range(args.repeats))
            row = {
                "bench": "prefill",
                "quantization": args.quantization,
                "prompt_len": n,
                "chunk": args.chunk,
                "ttft_ms": round(ttft * 1000, 1),
                "prefill_tok_s": round(n / ttft, 1),
            }
            print(json.dumps(row))
            rows.append(row)

    if not args.skip_prefix_cache:
        prefix_len, suffix_len = args.prefix_len, args.suffix_len
        if prefix_len + suffix_len > max_prompt:
            prefix_len = max(0, max_prompt - suffix_len)
            print(f"note: prefix length {args.prefix_len} clamped to {prefix_len} (context length {engine.context_length})")
        prefix = fresh(prefix_len)
        miss = _ttft(llm, prefix + fresh(suffix_len), params)
        before = engine.stats()
        hit = statistics.median(_ttft(llm, prefix + fresh(suffix_len), params) for _ in range(args.repeats))
        after = engine.stats()
        row = {
            "bench": "prefix_cache",
            "quantization": args.quantization,
            "prefix_len": prefix_len,
            "suffix_len": suffix_len,
            "miss_ttft_ms": round(miss * 1000, 1),
            "hit_ttft_ms": round(hit * 1000, 1),
            "speedup": round(miss / hit, 2),
            # the engine's counters over the hit requests, per request
            "hit_prompt_tokens_cached": _per(after.prompt_tokens_cached - before.prompt_tokens_cached, args.repeats),
            "hit_prompt_tokens_computed": _per(after.prompt_tokens_computed - before.prompt_tokens_computed,
                                               args.repeats),
        }
        print(json.dumps(row))
        rows.append(row)

    print(f"\nmodel {engine.loaded.path}, quantization {args.quantization}, chunk {args.chunk}, "
          f"max_batched_tokens {engine.scheduler.config.max_batched_tokens}, median of {args.repeats}")
    prefill = [r for r in rows if r["bench"] == "prefill"]
    if prefill:
        print(f"{'prompt_len':>12}  {'ttft_ms':>10}  {'prefill_tok_s':>14}")
        for r in prefill:
            print(f"{r['prompt_len']:>12}  {r['ttft_ms']:>10}  {r['prefill_tok_s']:>14}")
    for r in rows:
        if r["bench"] == "prefix_cache":
            print(f"prefix cache ({r['prefix_len']} + {r['suffix_len']} tokens): miss {r['miss_ttft_ms']} ms, "
                  f"hit {r['hit_ttft_ms']} ms, speedup {r['speedup']}x; per hit {r['hit_prompt_tokens_cached']} prompt "
                  f"tokens cached, {r['hit_prompt_tokens_computed']} computed")


if __name__ == "__main__":
    main()
