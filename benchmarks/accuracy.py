"""Accuracy of pagoda's fast paths against float32 on the same model file.

    python benchmarks/accuracy.py --quantization bf16 int4 int4:int8

A mode is a --quantization value, optionally with a --kv-cache-dtype after a colon
(``int4:int8``: int4 linears over an int8 KV cache).

For each mode: mean KL(float32 || mode) of next-token distributions and top-1 agreement
over a fixed text (this repo's README, first 1,024 tokens), perplexity of that text, and
how many of six standard chat prompts give the same 48 greedy tokens as float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pagoda import LLM, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "List three primes."}],
    [{"role": "user", "content": "Explain what a CPU cache is in one sentence."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "def fibonacci(n):\n    # complete this Python function"}],
]


def text_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    runner = llm.engine.runner
    pages = llm.engine.allocator.alloc((len(ids) + runner.page_size - 1) // runner.page_size)
    try:
        return runner.forward(runner.prepare([(ids, 0, pages)], all_logits=[0])).all_logits[0]
    finally:
        llm.engine.allocator.decref(pages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", nargs="+", default=["bf16", "int4"], help="modes: QUANTIZATION[:KV_CACHE_DTYPE]")
    args = ap.parse_args()
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    greedy = SamplingParams(temperature=0, max_tokens=48)
    base = LLM(model=args.model, dtype="float32")
    ids = base.tokenizer.encode(text)[:1024]
    ref_logits = text_logits(base, ids)
    ref_lp = torch.log_softmax(ref_logits, -1)
    ref_out = [o.outputs[0].token_ids for o in base.chat(CHATS, greedy, use_tqdm=False)]
    del base
    targets = torch.tensor(ids[1:])
    rows = [{"mode": "float32", "mean_kl": 0.0, "top1_agreement": 1.0,
             "perplexity": round(torch.exp(-ref_lp[:-1].gather(1, targets[:, None]).mean()).item(), 3),
             "greedy_identical": f"{len(CHATS)}/{len(CHATS)}"}]
    for mode in args.quantization:
        quantization, _, kv = mode.partition(":")
        llm = LLM(model=args.model, dtype="float32", quantization=quantization, kv_cache_dtype=kv or "auto")
        lp = torch.log_softmax(text_logits(llm, ids), -1)
        kl = F.kl_div(lp, ref_lp, log_target=True, reduction="batchmean").item()
        outs = [o.outputs[0].token_ids for o in llm.chat(CHATS, greedy, use_tqdm=False)]
        rows.append({
            "mode": mode,
            "mean_kl": round(kl, 6),
            "top1_agreement": round((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item(), 4),
            "perplexity": round(torch.exp(-lp[:-1].gather(1, targets[:, None]).mean()).item(), 3),
            "greedy_identical": f"{sum(a == b for a, b in zip(outs, ref_out))}/{len(CHATS)}",
        })
        del llm
    for row in rows:
        print(json.dumps({"bench": "accuracy", **row}))
    print(f"\n  {'mode':<10} {'mean KL':>10} {'top-1 agree':>12} {'perplexity':>11} {'greedy same':>12}")
    for r in rows:
        print(f"  {r['mode']:<10} {r['mean_kl']:>10} {r['top1_agreement']:>12} {r['perplexity']:>11} {r['greedy_identical']:>12}")


if __name__ == "__main__":
    main()
