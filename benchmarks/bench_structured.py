"""Throughput cost of a JSON-schema constraint: N concurrent streams, constrained vs not.

    python benchmarks/bench_structured.py --streams 32 --output-len 128 --repeats 3

Both runs decode exactly output-len tokens per stream (the unconstrained one with ignore_eos; the
schema's required 20-line array is longer than output-len, so the constrained one never ends
early), so the two differ only by the grammar work: a batched bitmask fill, its application to
the logits, and one matcher advance per token. Runs alternate (noisy shared machines) and the
medians are compared. Because a shared machine's load swings more than the effect, it also
times the grammar work itself inside the constrained runs (its share of the engine's step time,
load-independent to first order) and the masking alone for one step of N rows.

Prints one JSON line (for machines) and a table (for people).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict

import torch

from pagoda import LLM, SamplingParams, StructuredOutputs
from pagoda.engine.engine import Engine
from pagoda.engine.sampler import Sampler
from pagoda.structured.grammar import GrammarState

TIMERS: dict[str, float] = defaultdict(float)


def timed(cls: type, name: str, key: str) -> None:
    """Accumulate the wall time of cls.name into TIMERS[key]."""
    fn = getattr(cls, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS[key] += time.perf_counter() - t

    setattr(cls, name, wrapper)

LINE = {  # an order line: nested object, enum, pattern, bounded numbers and strings
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"},
        "product": {"type": "string", "maxLength": 32},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
        "price": {"type": "number", "minimum": 0},
        "status": {"enum": ["pending", "shipped", "delivered", "returned"]},
        "warehouse": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                       "shelf": {"type": "integer"}}, "required": ["city", "shelf"]},
    },
    "required": ["sku", "product", "quantity", "price", "status", "warehouse"],
}
SCHEMA = {"type": "object", "properties": {"customer": {"type": "string", "maxLength": 40},
                                           "lines": {"type": "array", "items": LINE, "minItems": 20}},
          "required": ["customer", "lines"]}


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == len(prompts) * params.max_tokens, "a stream ended early: the comparison would be unfair"
    return tokens / elapsed


def mask_step_us(llm: LLM, rows: int, steps: int = 50) -> float:
    """Microseconds of grammar work (bitmask fill + apply) for one step of `rows` constrained rows."""
    from pagoda.structured.backend import GrammarMasker

    backend = llm.engine.inputs.structured
    compiled = backend.compile(StructuredOutputs(json_schema=SCHEMA))
    states = [backend.new_state(compiled) for _ in range(rows)]
    masker = GrammarMasker()
    logits = torch.randn(rows, llm.engine.model_config.vocab_size)
    idx = list(range(rows))
    masker(logits, states, idx)
    t = time.perf_counter()
    for _ in range(steps):
        masker(logits, states, idx)
    return (time.perf_counter() - t) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    timed(Engine, "step", "step")
    timed(Sampler, "_apply_grammars", "grammar")  # bitmask fill + apply (+ the logits copy it needs)
    timed(GrammarState, "accept", "grammar")  # advancing the matchers
    llm = LLM(model=args.model, max_running_requests=args.streams)
    tok = llm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write order number {i} of our shop as JSON."}])
               for i in range(args.streams)]
    plain = SamplingParams(temperature=0.7, seed=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.7, seed=0, max_tokens=args.output_len,
                                 structured=StructuredOutputs(json_schema=SCHEMA))
    run(llm, prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up (and grammar compile below)
    run(llm, prompts[:4], SamplingParams(max_tokens=8, structured=constrained.structured))
    speeds: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    shares = []
    for _ in range(args.repeats):
        speeds["unconstrained"].append(run(llm, prompts, plain))
        TIMERS.clear()
        speeds["json_schema"].append(run(llm, prompts, constrained))
        shares.append(TIMERS["grammar"] / TIMERS["step"])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    slowdown = 1 - med["json_schema"] / med["unconstrained"]
    result = {
        "bench": "structured", "streams": args.streams, "output_len": args.output_len,
        "unconstrained_tok_s": [round(s, 1) for s in speeds["unconstrained"]],
        "json_schema_tok_s": [round(s, 1) for s in speeds["json_schema"]],
        "median_slowdown_pct": round(100 * slowdown, 1),
        "grammar_share_of_step_pct": [round(100 * s, 2) for s in shares],
        "mask_step_us": round(mask_step_us(llm, args.streams)),
    }
    print(json.dumps(result))
    print(f"| {args.streams} streams x {args.output_len} tokens | output tok/s (median of {args.repeats}) |")
    print("|---|---|")
    print(f"| unconstrained | {med['unconstrained']:.1f} |")
    print(f"| JSON schema | {med['json_schema']:.1f} ({100 * slowdown:+.1f}% slower) |")
    print(f"| grammar work inside the constrained runs | {100 * statistics.median(shares):.2f}% of step time |")
    print(f"| grammar masking alone, one step of {args.streams} rows | {result['mask_step_us']} us |")


if __name__ == "__main__":
    main()
