"""Long-prompt prefill: time, tokens/s and peak memory of one long prompt, chunk by chunk,
with a short stream decoding alongside (its longest inter-token gap is reported).

    python benchmarks/bench_long_prompt.py --prompt-len 8000 --chunk 512
    python benchmarks/bench_long_prompt.py --prompt-len 30000 --context-length 32768 \
        --rope-scaling '{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8192}'

Prints one JSON line (for machines) and a table (for people). Linux only (peak RSS from
/proc/self/status, reset through /proc/self/clear_refs before the prefill).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from pagoda import LLM, SamplingParams


def _status_mib(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-len", type=int, default=8000)
    ap.add_argument("--chunk", type=int, default=512, help="--chunked-prefill-size (0: the whole prompt at once)")
    ap.add_argument("--max-batched-tokens", type=int, default=None, help="default: 2048, or the prompt if chunk is 0")
    ap.add_argument("--kv-cache-memory", type=float, default=1.0)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--context-length", type=int, default=None, help="past the model's: with --rope-scaling")
    ap.add_argument("--rope-scaling", default=None, help="JSON, e.g. YaRN's (see the example above)")
    args = ap.parse_args()
    budget = args.max_batched_tokens or (2048 if args.chunk else args.prompt_len + 16)

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, chunked_prefill_size=args.chunk, max_batched_tokens=budget,
              kv_cache_memory=args.kv_cache_memory, disable_prefix_cache=True,
              num_threads=args.num_threads, context_length=args.context_length, rope_scaling=args.rope_scaling)
    load_s = time.perf_counter() - t0
    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    rng = random.Random(0)
    llm.generate([[rng.randrange(100, vocab) for _ in range(64)]], SamplingParams(max_tokens=1), use_tqdm=False)

    engine.add_request("short", [rng.randrange(100, vocab) for _ in range(16)],
                       SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True))
    engine.step()
    rss_before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    engine.add_request("long", [rng.randrange(100, vocab) for _ in range(args.prompt_len)],
                       SamplingParams(temperature=0, max_tokens=1))
    start = last = time.perf_counter()
    gaps, steps, ttft = [], 0, None
    while ttft is None:
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            if out.request_id == "short" and out.outputs[0].delta_token_ids:
                gaps.append(now - last)
                last = now
            if out.request_id == "long" and out.outputs[0].token_ids:
                ttft = now - start
    peak_growth = _status_mib("VmHWM") - rss_before
    engine.abort("short")
    result = {
        "bench": "long_prompt",
        "model": str(engine.loaded.path),
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "prompt_len": args.prompt_len,
        "chunk": args.chunk,
        "max_batched_tokens": budget,
        "num_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "steps": steps,
        "prefill_s": round(ttft, 2),
        "prefill_tok_s": round(args.prompt_len / ttft, 1),
        "short_stream_tokens": len(gaps),
        "short_stream_max_gap_s": round(max(gaps), 3) if gaps else None,
        "peak_rss_mib": round(_status_mib("VmHWM")),
        "peak_rss_growth_mib": round(peak_growth),
    }
    print(json.dumps(result))
    for key, value in result.items():
        print(f"{key:>24}  {value}")


if __name__ == "__main__":
    main()
