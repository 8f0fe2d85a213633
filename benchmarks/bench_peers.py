"""pagoda next to its peers on this machine: the same serving load against pagoda, vLLM-CPU and
llama.cpp's server, in interleaved rounds, with each server's peak RSS, then the ratios.

    .venv/bin/python benchmarks/bench_peers.py --concurrency 1 8 32 64 --rounds 2 \\
        --vllm-python ../peers-vllm/bin/python --llama-server ../llama.cpp/build/bin/llama-server

Each server in turn is started on the default model, loaded with benchmarks/bench_serving.py
(streaming /v1/completions, --input-len prompt tokens, exactly --output-len output tokens,
2 x clients requests per level), and stopped; rounds alternate the servers, so a shared host's
drift hits each of them alike. A peer is measured only when given (how they install and start on
this machine: ../shared/ANCHORS.md); without one its columns are left out, never filled from
another run.

- pagoda: `pagoda serve` from this checkout, default options.
- vLLM-CPU: `--vllm-python` is the python of a venv with `vllm-cpu` (and `accelerate`, `gguf` to
  make its model): the default GGUF is dequantized to a bf16 Hugging Face folder (`--vllm-model`,
  made once) and served with `--dtype bfloat16 --max-num-seqs 64`, 1 GiB of KV cache, tcmalloc
  and the venv's Intel OpenMP preloaded, as ANCHORS.md says.
- llama.cpp: `--llama-server` is a `llama-server` binary; the same GGUF, 2 threads, 64 slots.

Peak RSS is the highest sum of resident memory over the server's process tree, sampled every
0.2 s while it starts and serves. Prints one JSON line per server, round and level, then a
table with each level's best round and pagoda's ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MAKE_HF_DIR = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
gguf, out = sys.argv[1], sys.argv[2]
from pathlib import Path
folder, name = str(Path(gguf).parent), Path(gguf).name
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                             quantization_config=GgufConfig(gguf_file=name, dequantize=True))
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
model.save_pretrained(out)
"""


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


class Server:
    """One server process: started in its own process group, watched for peak RSS, stopped."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 ready_s: float = 300.0) -> None:
        self.name, self.cmd, self.port, self.env, self.ready_s = name, cmd, port, env, ready_s
        self.peak_rss = 0
        self._stop = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_peers_{self.name}_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(self.env or {})})
        self._watch = threading.Thread(target=self._sample, daemon=True)
        self._watch.start()
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before answering; see {self.log.name}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not answer within {self.ready_s:.0f} s; see {self.log.name}")

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc.pid))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


def run_load(server: Server, args: argparse.Namespace) -> dict[int, dict]:
    """bench_serving.py against the server: its JSON line per concurrency level."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_serving.py"), "--base-url", server.base_url,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--concurrency", *map(str, args.concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    levels = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {level["concurrency"]: level for level in levels}


def servers(args: argparse.Namespace, gguf: Path) -> list[Server]:
    found = [Server("pagoda", [str(Path(sys.executable).parent / "pagoda"), "serve", "--port", "8301"], 8301)]
    if args.vllm_python:
        venv = Path(args.vllm_python).resolve().parent.parent
        model = Path(args.vllm_model)
        if not (model / "config.json").exists():
            print(f"making vLLM's bf16 folder {model} from {gguf} ...", file=sys.stderr)
            subprocess.run([args.vllm_python, "-c", MAKE_HF_DIR, str(gguf), str(model)], check=True)
        preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(venv / "lib" / "libiomp5.so"))
                   if Path(p).exists()]
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
               "HF_HUB_OFFLINE": "1", "LD_PRELOAD": ":".join(preload)}
        found.append(Server("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                     str(model), "--dtype", "bfloat16", "--max-num-seqs", "64", "--port", "8302"],
                            8302, env, ready_s=600))
    if args.llama_server:
        found.append(Server("llama.cpp", [args.llama_server, "-m", str(gguf), "-t", str(os.cpu_count()), "-np", "64",
                                          "-c", "65536", "--port", "8303"], 8303))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="each server this many times, interleaved")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (omit: no vLLM column)")
    ap.add_argument("--vllm-model", default=str(REPO.parent / "peers-smollm2-bf16"),
                    help="bf16 Hugging Face folder for vLLM (made from the default GGUF when missing)")
    ap.add_argument("--llama-server", default=None, help="a llama-server binary (omit: no llama.cpp column)")
    args = ap.parse_args()
    if args.rounds < 1 or min(args.concurrency) < 1:
        ap.error("rounds and concurrency levels must be positive")
    for flag, path in (("--vllm-python", args.vllm_python), ("--llama-server", args.llama_server)):
        if path and not os.access(path, os.X_OK):
            ap.error(f"{flag} {path}: not an executable file")
    sys.path.insert(0, str(REPO))
    from pagoda.weights.default_model import default_model_path

    gguf = default_model_path()
    best: dict[str, dict[int, dict]] = {}
    rss: dict[str, int] = {}
    for rnd in range(args.rounds):
        for server in servers(args, gguf):
            try:
                with server:
                    levels = run_load(server, args)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # one peer down: say so, go on
                detail = exc.stderr.strip().splitlines()[-1] if getattr(exc, "stderr", None) else str(exc)
                print(f"{server.name}, round {rnd + 1}: not measured: {detail}", file=sys.stderr)
                continue
            rss[server.name] = max(rss.get(server.name, 0), server.peak_rss)
            for c, level in levels.items():
                print(json.dumps({"server": server.name, "round": rnd + 1, "concurrency": c,
                                  "output_tok_s": level["output_tok_s"], "ttft_p50_ms": level["ttft_p50_ms"],
                                  "completed": level["completed"], "wrong_token_count": level["wrong_token_count"],
                                  "peak_rss_mb": round(server.peak_rss / 2**20)}), flush=True)
                kept = best.setdefault(server.name, {}).get(c)
                if kept is None or level["output_tok_s"] > kept["output_tok_s"]:
                    best[server.name][c] = level
    if "pagoda" not in best:
        sys.exit("pagoda was not measured: nothing to compare")
    names = list(best)
    print(f"\nbest of {args.rounds} round(s); output tok/s (TTFT p50 ms); peak RSS over all rounds")
    print(f"{'clients':>7} " + " ".join(f"{n:>22}" for n in names) +
          "".join(f" {'pagoda/' + n:>16}" for n in names[1:]))
    for c in args.concurrency:
        cells = [f"{best[n][c]['output_tok_s']:>10.1f} ({best[n][c]['ttft_p50_ms']:>6.0f} ms)" if c in best[n]
                 else "not measured" for n in names]
        ratios = [f"{best['pagoda'][c]['output_tok_s'] / best[n][c]['output_tok_s']:>15.2f}x"
                  if c in best[n] and c in best["pagoda"] and best[n][c]["output_tok_s"] else "-" for n in names[1:]]
        print(f"{c:>7} " + " ".join(f"{cell:>22}" for cell in cells) + "".join(f" {r:>16}" for r in ratios))
    print(f"{'RSS':>7} " + " ".join(f"{rss[n] / 2**30:>19.2f} GB" for n in names))


if __name__ == "__main__":
    main()
