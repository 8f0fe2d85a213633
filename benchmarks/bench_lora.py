"""Multi-LoRA throughput: 32 concurrent requests spread over 1, 4 and 16 adapters against the
base model alone, offline through LLM.generate (one engine, continuous batching; the
running cap of --concurrency makes it a closed loop of that many clients).

Adapters are PEFT directories written here with random A and B (rank --rank on every
q/k/v/o/gate/up/down projection); requests take adapters round-robin. Prints one JSON line
per configuration, then a table with each throughput relative to the base model.

    python benchmarks/bench_lora.py --adapters 0 1 4 16 0 4 --num-prompts 64 --input-len 128 --output-len 64

"vs base" is against the mean of the base runs (repeat 0, as above, to interleave them on a
shared machine).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagoda import LLM, SamplingParams

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(path: Path, targets: dict[str, tuple[str, int, int, int]], rank: int, seed: int) -> None:
    """A PEFT adapter for the model's projections (targets: HF module -> (path, row0, rows, inputs))."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (_, _, rows, inputs) in targets.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inputs, generator=gen) / inputs**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(MODULES), "bias": "none",
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M GGUF, int4 on CPU)")
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4, 16], help="0: the base model alone")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()

    most = max(max(args.adapters), 1)
    llm = LLM(model=args.model, max_running_requests=args.concurrency, enable_lora=True, max_loras=most,
              max_lora_rank=args.rank)
    targets = llm.engine.loaded.model.lora_targets()
    tmp = Path(tempfile.mkdtemp(prefix="pagoda-bench-lora-"))
    for i in range(most):
        write_adapter(tmp / f"lora{i}", targets, args.rank, seed=i)
        llm.load_lora(f"lora{i}", str(tmp / f"lora{i}"))

    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    warm = [[rng.randrange(100, vocab) for _ in range(16)] for _ in range(4)]
    llm.generate(warm, SamplingParams(max_tokens=4), use_tqdm=False, lora=[None, "lora0", None, "lora0"])
    rows = []
    for n in args.adapters:
        prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        loras = [None if n == 0 else f"lora{i % n}" for i in range(args.num_prompts)]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora=loras)
        elapsed = time.perf_counter() - t
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        row = {"bench": "lora", "adapters": n, "rank": args.rank, "concurrency": args.concurrency,
               "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
               "quantization": llm.engine.loaded.quantization, "seconds": round(elapsed, 2),
               "output_tok_s": round(generated / elapsed, 1),
               "total_tok_s": round((generated + args.num_prompts * args.input_len) / elapsed, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    bases = [r["output_tok_s"] for r in rows if r["adapters"] == 0]
    base = sum(bases) / len(bases) if bases else None  # repeat 0 in --adapters to interleave base runs
    print(f"\n{'adapters':>8} {'output tok/s':>13} {'total tok/s':>12} {'vs base':>8}")
    for r in rows:
        rel = f"{r['output_tok_s'] / base:.2f}x" if base else "-"
        print(f"{r['adapters']:>8} {r['output_tok_s']:>13} {r['total_tok_s']:>12} {rel:>8}")


if __name__ == "__main__":
    main()
