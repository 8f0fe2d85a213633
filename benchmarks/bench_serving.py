"""Serving load benchmark against any OpenAI-compatible server (pagoda, vLLM, llama.cpp, ...).

Streams ``/v1/completions`` (``stream: true``, ``ignore_eos: true``, ``max_tokens = --output-len``)
with prompts of about ``--input-len`` tokens, either closed loop at one or more ``--concurrency``
levels or open loop at a Poisson ``--request-rate``. Per request it measures TTFT (first non-empty
text chunk), ITL (gaps between later chunks), end-to-end latency and the completion token count
from ``stream_options.include_usage``. Prints one JSON line per run, then a table.

    .venv/bin/python benchmarks/bench_serving.py --base-url http://127.0.0.1:8011/v1 \\
        --concurrency 1 8 32 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education river mountain garden window table letter music paper market"
).split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    output_tokens: int | None = None
    prompt_tokens: int | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def server_root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def pick_model(client: httpx.AsyncClient, base_url: str) -> str:
    r = await client.get(f"{base_url}/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def count_tokens(client: httpx.AsyncClient, root: str, model: str, text: str) -> int | None:
    """Token count of ``text`` via POST /tokenize (pagoda and vLLM take ``prompt``, llama.cpp's
    server ``content``); None if the server has none."""
    for body in ({"model": model, "prompt": text}, {"content": text}):
        try:
            r = await client.post(f"{root}/tokenize", json=body)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            continue
        answer = r.json()
        count = int(answer["count"]) if "count" in answer else len(answer.get("tokens", ()))
        if count > 0 or not text:
            return count
    return None


async def make_prompts(client: httpx.AsyncClient, root: str, model: str, n: int, input_len: int,
                       seed: int) -> tuple[list[str], bool]:
    """``n`` prompts of random words; trimmed/extended to exactly ``input_len`` tokens when the
    server can tokenize. Returns (prompts, exact)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    exact = True
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(input_len)]
        count = await count_tokens(client, root, model, " ".join(words))
        if count is None:  # no /tokenize: ~1 token per common word
            exact = False
            prompts.append(" ".join(words))
            continue
        for _ in range(8):  # adjust by the difference; converges in a step or two
            if count == input_len:
                break
            if count > input_len:
                del words[max(1, len(words) - (count - input_len)):]
            else:
                words.extend(rng.choice(WORDS) for _ in range(input_len - count))
            count = await count_tokens(client, root, model, " ".join(words))
            assert count is not None
        # Word-level steps can oscillate around the target (BOS, merges); settle on one word at a time.
        while count > input_len and len(words) > 1:
            words.pop()
            count = await count_tokens(client, root, model, " ".join(words))
            assert count is not None
        exact = exact and count == input_len
        prompts.append(" ".join(words))
    return prompts, exact


async def one_request(client: httpx.AsyncClient, base_url: str, model: str, prompt: str,
                      output_len: int, deadline: float) -> Result:
    res = Result()
    payload = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", f"{base_url}/completions", json=payload) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:200]}"
                return res
            async for line in r.aiter_lines():
                if time.perf_counter() > deadline:
                    res.error = "deadline (--max-seconds) reached"
                    return res
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {str(chunk['error'])[:200]}"
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens")
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompts: list[str],
                    concurrency: int | None, num_requests: int) -> dict[str, Any]:
    deadline = time.perf_counter() + args.max_seconds
    results: list[Result] = []
    start = time.perf_counter()
    if concurrency is not None:  # closed loop: `concurrency` clients, each sends the next request
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            while next_i < num_requests and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                results.append(await one_request(client, args.base_url, model, prompts[i % len(prompts)],
                                                 args.output_len, deadline))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:  # open loop: Poisson arrivals at --request-rate
        rng = random.Random(args.seed + 1)
        tasks = []
        for i in range(num_requests):
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one_request(client, args.base_url, model, prompts[i % len(prompts)],
                                                         args.output_len, deadline)))
            await asyncio.sleep(rng.expovariate(args.request_rate))
        results = list(await asyncio.gather(*tasks))
    wall = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    ttft = [r.ttft for r in ok if not math.isnan(r.ttft)]
    itl = [g for r in ok for g in r.itl]
    e2e = [r.e2e for r in ok]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "mode": "closed" if concurrency is not None else "open",
        "concurrency": concurrency,
        "request_rate": args.request_rate if concurrency is None else None,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "not_sent": num_requests - len(results),
        "wrong_token_count": sum(1 for r in ok if r.output_tokens != args.output_len),
        "prompt_tokens_mean": (sum(r.prompt_tokens or 0 for r in ok) / len(ok)) if ok else None,
        "wall_s": round(wall, 3),
        "output_tok_s": round(out_tokens / wall, 2) if wall > 0 else None,
        "request_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1),
        "ttft_p90_ms": round(percentile(ttft, 90) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itl, 50) * 1e3, 2),
        "itl_p99_ms": round(percentile(itl, 99) * 1e3, 2),
        "e2e_p50_s": round(percentile(e2e, 50), 3),
        "errors": errors[:5],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("load", 10), ("ok/req", 9), ("bad len", 7), ("out tok/s", 9), ("req/s", 7), ("TTFT p50", 9),
            ("p90", 9), ("p99", 9), ("ITL p50", 8), ("ITL p99", 8), ("E2E p50", 8)]
    print("  ".join(name.rjust(w) for name, w in cols))
    for r in rows:
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['request_rate']}/s"

        def ms(v: float) -> str:
            return "-" if v is None or math.isnan(v) else (f"{v / 1e3:.2f}s" if v >= 1e4 else f"{v:.0f}ms")

        cells = [load, f"{r['completed']}/{r['requests']}", str(r["wrong_token_count"]), f"{r['output_tok_s']}",
                 f"{r['request_s']}", ms(r["ttft_p50_ms"]), ms(r["ttft_p90_ms"]), ms(r["ttft_p99_ms"]),
                 f"{r['itl_p50_ms']:.1f}ms", f"{r['itl_p99_ms']:.1f}ms", f"{r['e2e_p50_s']:.2f}s"]
        print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, cols)))


async def main(args: argparse.Namespace) -> int:
    args.base_url = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.max_seconds + 60, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers(args.api_key)) as client:
        model = args.model or await pick_model(client, args.base_url)
        levels: list[int | None] = [None] if args.request_rate else list(args.concurrency)
        counts = {c: args.num_requests or 2 * (c or 1) for c in levels}
        if args.request_rate and not args.num_requests:
            counts = {None: 100}
        t = time.perf_counter()
        prompts, exact = await make_prompts(client, server_root(args.base_url), model,
                                            max(counts.values()), args.input_len, args.seed)
        print(f"# model={model} prompts={len(prompts)} input_len={args.input_len} "
              f"({'exact via /tokenize' if exact else 'approximate: no /tokenize'}, {time.perf_counter() - t:.1f}s)",
              file=sys.stderr)
        if args.warmup:
            await one_request(client, args.base_url, model, prompts[0], min(args.output_len, 8), math.inf)
        rows = []
        for c in levels:
            row = {"model": model, **await run_level(client, args, model, prompts, c, counts[c])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print_table(rows)
    return 0 if all(r["failed"] == 0 and r["not_sent"] == 0 for r in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8011/v1")
    p.add_argument("--model", default=None, help="default: the first model of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1], help="closed-loop clients; several levels allowed")
    p.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=None, help="default 2 x concurrency (100 in open loop)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=600.0, help="safety cap per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one short warm-up request")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        p.error("--concurrency must be >= 1")
    if args.request_rate is not None and args.request_rate <= 0:
        p.error("--request-rate must be > 0")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
