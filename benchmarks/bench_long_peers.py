"""One long prompt through HTTP beside a decoding stream, on pagoda and llama.cpp's server in turn:
how long the long prompt takes to answer, how long the stream waits for a token meanwhile, and
each server's peak RSS. The server-side twin of bench_long_prompt.py (which drives the engine in
process), so a peer can be measured the same way in the same run.

    .venv/bin/python benchmarks/bench_long_peers.py --prompt-len 30000 --context-length 32768 --yarn 4 \\
        --llama-server /work/llamacpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server

Each server starts on the default GGUF stretched to --context-length with YaRN (--yarn times the
model's 8,192 tokens: pagoda's --rope-scaling, llama.cpp's --rope-scaling yarn --rope-scale
--yarn-orig-ctx), 2 threads. A client streams a long completion (ignore_eos); once it has its
first tokens, another sends --prompt-len random token ids (max_tokens 8, not streamed). The
stream's longest gap between tokens is taken while the long prompt is in flight. Prints one JSON
line per server and round, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import httpx

from bench_peers import REPO, Server  # benchmarks/bench_peers.py, beside this script

ORIGINAL_CONTEXT = 8192  # the default model's


def stream_gaps(base_url: str, model: str, max_tokens: int, stop: threading.Event, arrivals: list[float]) -> None:
    """Stream a completion until `stop`, appending each token chunk's arrival time."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=None) as r:
        for line in r.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                arrivals.append(time.perf_counter())


def measure(server: Server, prompt: list[int], context_length: int) -> dict:
    model = httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"]
    stop, arrivals = threading.Event(), []
    streamer = threading.Thread(target=stream_gaps, args=(server.base_url, model, context_length - 64, stop, arrivals),
                                daemon=True)
    streamer.start()
    while len(arrivals) < 8:  # the stream is decoding
        time.sleep(0.05)
    t0 = time.perf_counter()
    r = httpx.post(f"{server.base_url}/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                           "temperature": 0}, timeout=3600)
    t1 = time.perf_counter()
    r.raise_for_status()
    stop.set()
    during = [t for t in arrivals if t0 <= t <= t1]
    edges = [t0, *during, t1]
    usage = r.json().get("usage", {})
    return {"answer_s": round(t1 - t0, 2), "prompt_tokens": usage.get("prompt_tokens"),
            "stream_tokens_during": len(during), "stream_max_gap_s": round(max(b - a for a, b in zip(edges, edges[1:])), 3),
            "peak_rss_gb": round(server.peak_rss / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=30000)
    ap.add_argument("--context-length", type=int, default=32768)
    ap.add_argument("--yarn", type=float, default=4.0, help="YaRN factor over the model's 8,192 tokens")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--llama-server", default=None, help="a llama-server binary (omit: pagoda only)")
    args = ap.parse_args()
    if args.prompt_len + 16 > args.context_length or args.rounds < 1 or args.yarn < 1:
        ap.error("the prompt must fit the context length; rounds and the YaRN factor must be positive")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        ap.error(f"--llama-server {args.llama_server}: not an executable file")
    sys.path.insert(0, str(REPO))
    from pagoda.weights.default_model import default_model_path

    gguf = str(default_model_path())
    rope = json.dumps({"rope_type": "yarn", "factor": args.yarn, "original_max_position_embeddings": ORIGINAL_CONTEXT})
    servers = [Server("pagoda", [os.path.join(os.path.dirname(sys.executable), "pagoda"), "serve", "--port", "8301",
                                 "--context-length", str(args.context_length), "--rope-scaling", rope], 8301)]
    if args.llama_server:
        servers.append(Server("llama.cpp", [args.llama_server, "-m", gguf, "-t", str(os.cpu_count()), "-np", "2",
                                            "-c", str(2 * args.context_length), "--rope-scaling", "yarn", "--rope-scale",
                                            str(args.yarn), "--yarn-orig-ctx", str(ORIGINAL_CONTEXT), "--port", "8303"],
                              8303))
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49152) for _ in range(args.prompt_len)]  # the default model's vocabulary
    rows = []
    for round_ in range(args.rounds):
        for server in servers:
            with server:
                row = {"bench": "long_peers", "server": server.name, "round": round_ + 1,
                       "prompt_len": args.prompt_len, **measure(server, prompt, args.context_length)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'server':<10} {'round':>5} {'answer s':>9} {'stream max gap s':>17} {'peak RSS GB':>12}")
    for r in rows:
        print(f"{r['server']:<10} {r['round']:>5} {r['answer_s']:>9.1f} {r['stream_max_gap_s']:>17.3f} "
              f"{r['peak_rss_gb']:>12.2f}")


if __name__ == "__main__":
    main()
