"""Speculative decoding at one stream: output tokens/s with and without it, greedy, default model.

    python benchmarks/bench_speculative.py                       # n-gram, k=8
    python benchmarks/bench_speculative.py --num-draft-tokens 12 --max-tokens 256

Tasks (built here, deterministic): `quote` (repeat a ~2,000-token document), `code`
(edit a function and return the file) and `chat` (little to copy). Each task runs once without
speculation and once with it; the outputs must be identical (greedy). tok/s counts output
tokens over the decode time (the steps after the first token; the prompt's prefill is the same in
both runs; their CPU seconds too, the fairer measure on a shared host with --num-threads 1), e2e over the
whole request.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pagoda import LLM, SamplingParams

NAMES = ["Anna Berg", "Tomas Reed", "Lena Ortiz", "Paul Novak", "Mira Chen", "Oskar Lind", "Ruth Adams",
         "Ivan Petrov", "Sara Holm", "David Kerr", "Nora Quinn", "Emil Sato"]
PLACES = ["Alderbrook", "Westmere", "Kingsford", "Redcliff", "Marrow Bay", "Eastholm", "Pine Hollow", "Stonebridge"]
THINGS = ["a new water mill", "the first telegraph office", "a stone bridge over the river", "a public library",
          "a small hospital", "the town's first school", "a brewery", "a lighthouse on the point",
          "a railway station", "a covered market"]


def document(rng: random.Random, sentences: int = 60) -> str:
    """A ~2,000-token chronicle (every sentence distinct), in paragraphs of five sentences."""
    out = []
    for _ in range(sentences):
        out.append(f"In {rng.randrange(1820, 1960)}, {rng.choice(NAMES)} of {rng.choice(PLACES)} built "
                   f"{rng.choice(THINGS)}, which cost {rng.randrange(100, 9000)} pounds and was finished "
                   f"{rng.randrange(2, 30)} months later.")
    return "\n\n".join(" ".join(out[i : i + 5]) for i in range(0, sentences, 5))


CODE = '''import json
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int


def load_items(path):
    with open(path) as f:
        data = json.load(f)
    return [Item(d["name"], d["price"], d["quantity"]) for d in data]


def total_value(items):
    total = 0.0
    for item in items:
        total += item.price * item.quantity
    return total


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best


def by_name(items):
    return {item.name: item for item in items}


def restock(items, amount):
    for item in items:
        if item.quantity < 10:
            item.quantity += amount
    return items


def report(items):
    lines = []
    for item in sorted(items, key=lambda i: i.name):
        lines.append(f"{item.name}: {item.quantity} at {item.price:.2f}")
    lines.append(f"total: {total_value(items):.2f}")
    return "\\n".join(lines)
'''


def tasks(rng: random.Random) -> dict[str, list[dict]]:
    doc = document(rng)
    return {
        "quote": [{"role": "user", "content": f"{doc}\n\nRepeat the text above exactly."}],
        "code": [{"role": "system", "content": "You are a coding assistant. Reply with code only."},
                 {"role": "user", "content": f"```python\n{CODE}```\nRename `total_value` to `inventory_value` in "
                  "this file and show the complete file."}],
        "chat": [{"role": "user", "content": "Write a short story about a fox who learns to play the violin."}],
    }


def run(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float, float]:
    """Output ids, and the decode's wall and CPU seconds (steps after the first token), and e2e wall."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine = llm.engine
    rid = engine.new_request_id()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    wall = cpu = 0.0
    ids: list[int] = []
    while engine.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        outs = engine.step()
        if ids:  # the first token (after the prompt's prefill) is out: this was a decode step
            wall, cpu = wall + time.perf_counter() - t, cpu + time.process_time() - c
        for out in outs:
            ids = out.outputs[0].token_ids
    return ids, wall, cpu, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--algorithm", default="ngram", choices=("ngram", "draft"))
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--num-draft-tokens", type=int, default=8)
    ap.add_argument("--ngram-min-match", type=int, default=None, help="shortest suffix to look up (default: the engine's)")
    ap.add_argument("--ngram-max-match", type=int, default=None, help="longest suffix to look up (default: the engine's)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--tasks", default="quote,code,chat")
    ap.add_argument("--repeats", type=int, default=2, help="runs per task and mode, interleaved; the fastest counts")
    ap.add_argument("--num-threads", type=int, default=None,
                    help="compute threads (1 makes CPU seconds a fair measure on a shared host)")
    args = ap.parse_args()

    base = LLM(model=args.model, num_threads=args.num_threads)
    spec = LLM(model=args.model, num_threads=args.num_threads, speculative_algorithm=args.algorithm,
               speculative_draft_model=args.draft_model, speculative_num_draft_tokens=args.num_draft_tokens,
               **{f"speculative_ngram_{side}_match": value for side, value in
                  (("min", args.ngram_min_match), ("max", args.ngram_max_match)) if value is not None})
    chats = tasks(random.Random(0))
    warm = base.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    run(base, warm, 8), run(spec, warm, 8)
    results = []
    for name in args.tasks.split(","):
        prompt = base.tokenizer.encode_chat(chats[name])
        before = spec.stats()
        off = [float("inf")] * 3
        on = [float("inf")] * 3
        for _ in range(args.repeats):  # interleaved: a shared host's load drifts; the fastest run counts
            off_ids, *t = run(base, prompt, args.max_tokens)
            off = [min(a, b) for a, b in zip(off, t)]
            on_ids, *t = run(spec, prompt, args.max_tokens)
            on = [min(a, b) for a, b in zip(on, t)]
        after = spec.stats()
        steps = after.spec_num_steps - before.spec_num_steps
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        n = len(off_ids) - 1  # decoded after the first token
        results.append(dict(
            task=name, prompt_tokens=len(prompt), output_tokens=len(off_ids), identical=off_ids == on_ids,
            tok_s_off=round(n / off[0], 1), tok_s_on=round(n / on[0], 1), speedup=round(off[0] / on[0], 2),
            cpu_speedup=round(off[1] / on[1], 2), e2e_speedup=round(off[2] / on[2], 2),
            mean_acceptance_length=round(1 + accepted / steps, 2) if steps else 0.0,
            acceptance_rate=round(accepted / drafted, 3) if drafted else 0.0,
        ))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'task':<6} {'prompt':>6} {'out':>5} {'off tok/s':>9} {'on tok/s':>9} {'speedup':>7} {'cpu':>6} "
          f"{'e2e':>6} {'acc.len':>7} {'acc.rate':>8} identical")
    for r in results:
        print(f"{r['task']:<6} {r['prompt_tokens']:>6} {r['output_tokens']:>5} {r['tok_s_off']:>9} {r['tok_s_on']:>9} "
              f"{r['speedup']:>6}x {r['cpu_speedup']:>5}x {r['e2e_speedup']:>5}x {r['mean_acceptance_length']:>7} "
              f"{r['acceptance_rate']:>8} {r['identical']}")


if __name__ == "__main__":
    main()
