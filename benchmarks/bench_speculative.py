"""Speculative decoding at one stream: output tokens/s with and without it, greedy, default model.

    python benchmarks/bench_speculative.py                       # n-gram, k=8
    python benchmarks/bench_speculative.py --num-draft-tokens 12 --max-tokens 256

Tasks (built here, deterministic): `quote` (repeat a ~2,000-token document's passage), `code`
(edit a function and return the file) and `chat` (little to copy). Each task runs once without
speculation and once with it; the outputs must be identical (greedy). tok/s counts output
tokens over the decode time (first token to last; the prompt's prefill is the same in both
runs), e2e tok/s over the whole request.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pagoda import LLM, SamplingParams

TOPICS = ["the harbour", "the old mill", "the railway", "the school", "the market", "the lighthouse", "the bridge",
          "the library", "the orchard", "the town council"]
VERBS = ["was rebuilt", "was extended", "was closed for repairs", "was opened to visitors", "was painted",
         "was sold to a cooperative", "was surveyed", "was flooded", "was renamed", "was restored"]
WHEN = ["in the spring of 1921", "after the long winter", "during the summer fair", "in 1898", "before the war",
        "two years later", "in the autumn", "at the turn of the century", "in 1954", "soon afterwards"]
WHY = ["because the old one had become unsafe", "so that more families could use it", "after a vote of the residents",
       "thanks to a gift from a local merchant", "although many people objected", "to attract travellers",
       "when the river changed its course", "as the population grew", "at great expense", "with volunteer labour"]


def document(rng: random.Random, paragraphs: int = 24) -> str:
    out = []
    for p in range(paragraphs):
        sentences = []
        for _ in range(4):
            sentences.append(f"{rng.choice(TOPICS).capitalize()} {rng.choice(VERBS)} {rng.choice(WHEN)}, "
                             f"{rng.choice(WHY)}.")
        out.append(f"Section {p + 1}. " + " ".join(sentences))
    return "\n\n".join(out)


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
        "quote": [{"role": "user", "content": f"Here is a document.\n\n{doc}\n\nCopy the document above exactly, "
                   "word for word, starting from Section 1."}],
        "code": [{"role": "user", "content": f"{CODE}\nRename the function `total_value` to `inventory_value` "
                  "everywhere in the code above and print the whole updated file."}],
        "chat": [{"role": "user", "content": "Write a short story about a fox who learns to play the violin."}],
    }


def run(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    e2e = time.perf_counter() - t
    m = out.metrics
    first = m.first_token_time - m.arrival_time
    return out.outputs[0].token_ids, e2e - first, e2e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--algorithm", default="ngram", choices=("ngram", "draft"))
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--num-draft-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--tasks", default="quote,code,chat")
    args = ap.parse_args()

    base = LLM(model=args.model)
    spec = LLM(model=args.model, speculative_algorithm=args.algorithm, speculative_draft_model=args.draft_model,
               speculative_num_draft_tokens=args.num_draft_tokens)
    chats = tasks(random.Random(0))
    warm = base.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    run(base, warm, 8), run(spec, warm, 8)
    results = []
    for name in args.tasks.split(","):
        prompt = base.tokenizer.encode_chat(chats[name])
        off_ids, off_decode, off_e2e = run(base, prompt, args.max_tokens)
        before = spec.stats()
        on_ids, on_decode, on_e2e = run(spec, prompt, args.max_tokens)
        after = spec.stats()
        steps = after.spec_num_steps - before.spec_num_steps
        accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
        drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
        n = len(off_ids)
        results.append(dict(
            task=name, prompt_tokens=len(prompt), output_tokens=n, identical=off_ids == on_ids,
            tok_s_off=round((n - 1) / off_decode, 1), tok_s_on=round((len(on_ids) - 1) / on_decode, 1),
            speedup=round(off_decode / on_decode * (len(on_ids) - 1) / (n - 1), 2),
            e2e_speedup=round(off_e2e / on_e2e, 2),
            mean_acceptance_length=round(1 + accepted / steps, 2) if steps else 0.0,
            acceptance_rate=round(accepted / drafted, 3) if drafted else 0.0,
        ))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'task':<6} {'prompt':>6} {'out':>5} {'off tok/s':>9} {'on tok/s':>9} {'speedup':>7} {'e2e':>5} "
          f"{'acc.len':>7} {'acc.rate':>8} identical")
    for r in results:
        print(f"{r['task']:<6} {r['prompt_tokens']:>6} {r['output_tokens']:>5} {r['tok_s_off']:>9} {r['tok_s_on']:>9} "
              f"{r['speedup']:>6}x {r['e2e_speedup']:>4}x {r['mean_acceptance_length']:>7} {r['acceptance_rate']:>8} "
              f"{r['identical']}")


if __name__ == "__main__":
    main()
