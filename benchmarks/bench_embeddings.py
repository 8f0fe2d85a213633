"""Embedding throughput against any OpenAI-compatible server: ``--num-inputs`` texts of about
``--input-len`` words, sent as requests of ``--batch`` inputs with ``--concurrency`` requests in
flight. Prints one JSON line: inputs/s and prompt tokens/s (from each response's usage).

    .venv/bin/python benchmarks/bench_embeddings.py --base-url http://127.0.0.1:8011/v1 \\
        --num-inputs 512 --input-len 32 --batch 32 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work number night point home water "
         "room mother area money story fact month lot right study book eye job word business issue side").split()


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(args.input_len)) for _ in range(args.num_inputs)]
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    headers = {"Authorization": f"Bearer {args.api_key}"}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=600) as http:
        model = (await http.get("/models")).json()["data"][0]["id"]
        await http.post("/embeddings", json={"model": model, "input": texts[0]})  # warm-up
        queue: asyncio.Queue[list[str]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                batch = queue.get_nowait()
                r = await http.post("/embeddings", json={"model": model, "input": batch, "encoding_format": "base64"})
                r.raise_for_status()
                tokens += r.json()["usage"]["prompt_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - start
    print(json.dumps({"inputs": len(texts), "batch": args.batch, "concurrency": args.concurrency,
                      "prompt_tokens": tokens, "seconds": round(elapsed, 2),
                      "inputs_per_s": round(len(texts) / elapsed, 1), "tokens_per_s": round(tokens / elapsed)}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--num-inputs", type=int, default=512)
    p.add_argument("--input-len", type=int, default=32, help="words per input")
    p.add_argument("--batch", type=int, default=32, help="inputs per request")
    p.add_argument("--concurrency", type=int, default=4)
    asyncio.run(main(p.parse_args()))
