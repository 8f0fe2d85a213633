"""LoRA serving end to end on the tiny random Llama: batches mixing adapters, the prefix
cache per adapter, the slot pool swapping, the server's routes, and loading/unloading
adapters at run time under load."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.engine.async_engine import AsyncEngine
from pagoda.server.app import create_app
from tests.conftest import TINY_LLAMA
from tests.lora_utils import peft_adapter

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
KEY = "sk-lora"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Six PEFT adapters for the tiny Llama's shapes (ranks 2-8, all projections), and one of rank 32."""
    root = tmp_path_factory.mktemp("adapters")
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "architectures"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    paths = {}
    for i, rank in enumerate((2, 4, 8, 8, 4, 2)):
        peft_adapter(hf, root / f"a{i}", rank, seed=i, scale=0.5)
        paths[f"a{i}"] = str(root / f"a{i}")
    peft_adapter(hf, root / "big", 32, seed=99)
    paths["big"] = str(root / "big")
    bad = root / "lm_head"
    peft_adapter(hf, bad, 4, seed=1, modules=["q_proj", "lm_head"])
    paths["lm_head"] = str(bad)
    return paths


def _llm(tiny_config_path, adapters, **kw) -> LLM:
    options = dict(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, seed=1,
                   lora_modules=[f"a{i}={adapters[f'a{i}']}" for i in range(4)], max_loras=2, max_lora_rank=8)
    options.update(kw)
    return LLM(**options)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_mixed_adapters_in_one_batch_match_each_alone(tiny_config_path, adapters) -> None:
    """16 prompts over 4 adapters and the base model, two slots: every row gets what it gets alone."""
    llm = _llm(tiny_config_path, adapters)
    prompts = _prompts(16)
    loras = [None if i % 5 == 4 else f"a{i % 5}" for i in range(16)]
    together = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False, lora=loras))
    llm.engine.check_integrity()
    alone_llm = _llm(tiny_config_path, adapters, disable_prefix_cache=True)
    alone = [_tokens(alone_llm.generate([p], GREEDY, use_tqdm=False, lora=lo))[0] for p, lo in zip(prompts, loras)]
    assert together == alone
    base = _tokens(alone_llm.generate(prompts[:4], GREEDY, use_tqdm=False))
    assert sum(b != t for b, t in zip(base, together[:4])) >= 3  # the adapters change the outputs
    assert llm.engine.lora.loads > 2  # two slots, four adapters: they were swapped


def test_prefix_cache_hits_never_cross_adapters(tiny_config_path, adapters) -> None:
    llm = _llm(tiny_config_path, adapters)
    prompt = _prompts(1, seed=5)[0] + list(range(100, 148))  # several full pages

    def run(lora):
        before = llm.stats().prompt_tokens_cached
        out = _tokens(llm.generate([prompt], GREEDY, use_tqdm=False, lora=lora))[0]
        return out, llm.stats().prompt_tokens_cached - before

    first, hit = run("a0")
    assert hit == 0
    for other in ("a1", None, "a2"):
        _, hit = run(other)
        assert hit == 0, other
    again, hit = run("a0")
    assert hit >= 32 and again == first
    _, hit = run(None)
    assert hit >= 32  # the base model's own entry
    llm.engine.check_integrity()


def test_lora_options_from_the_command_line(tmp_path) -> None:
    from pagoda.cli import _engine_config, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--lora-modules", "a=/x", "b=/y/",
                                      "--lora-paths", "/z/c.gguf", "--max-loras", "2", "--max-lora-rank", "32"])
    cfg = _engine_config(args)
    assert cfg.lora_adapters() == [("a", "/x"), ("b", "/y/"), ("c", "/z/c.gguf")]
    assert cfg.lora_enabled and cfg.max_loras == 2 and cfg.max_lora_rank == 32
    assert not EngineConfig().lora_enabled


# ---- the server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_config_path, adapters):
    eng = AsyncEngine(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.05, seed=1,
                      lora_modules=[f"s{i}={adapters[f'a{i}']}" for i in range(2)], max_loras=3, max_lora_rank=8)
    yield eng
    eng.shutdown()


def _serve(engine: AsyncEngine, coro_fn):
    app = create_app(engine, "tiny", api_key=KEY)

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers,
                                     timeout=60) as http:
            return await coro_fn(http)

    return asyncio.run(main())


def _wait_idle(engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 30
    while engine.num_in_flight or engine.engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)


def test_models_lists_adapters_and_requests_name_them(engine) -> None:
    async def go(http):
        models = (await http.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["tiny", "s0", "s1"]
        assert [m["parent"] for m in models] == [None, "tiny", "tiny"]
        assert (await http.get("/v1/models/s1")).json()["parent"] == "tiny"
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        outs = {}
        for name, extra in (("tiny", {}), ("s0", {}), ("s1", {}), ("s1-sglang", {"lora_path": "s1"})):
            r = await http.post("/v1/completions", json={**body, "model": name.removesuffix("-sglang"), **extra}
                                if not extra else {**body, "model": "tiny", **extra})
            assert r.status_code == 200, r.text
            outs[name] = r.json()
        assert outs["s1"]["model"] == "s1"
        assert outs["s1"]["choices"][0]["text"] == outs["s1-sglang"]["choices"][0]["text"]
        r = await http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    _serve(engine, go)


def test_bad_load_and_unload_calls_are_4xx(engine, adapters, tmp_path) -> None:
    async def go(http):
        async def load(name, path, **kw):
            return await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, **kw)

        cases = [
            (await load("x", str(tmp_path / "missing")), 400, "does not exist"),
            (await load("x", adapters["big"]), 400, "rank 32 exceeds --max-lora-rank 8"),
            (await load("x", adapters["lm_head"]), 400, "lm_head"),
            (await load("s0", adapters["a2"]), 400, "already loaded"),
            (await load("tiny", adapters["a2"]), 400, "base model"),
            (await http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path"),
            (await http.post("/v1/unload_lora_adapter", json={"lora_name": "ghost"}), 404, "does not exist"),
            (await load("x", adapters["a2"], headers={"Authorization": "Bearer wrong"}), 401, "API key"),
            (await http.post("/v1/completions", json={"model": "tiny", "lora_path": "ghost", "prompt": [1]}), 404,
             "ghost"),
        ]
        for r, status, text in cases:
            assert r.status_code == status, r.text
            assert text in r.json()["error"]["message"], r.text
        assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["tiny", "s0", "s1"]

        # unloading an adapter in use: it answers so, and goes when its request ends
        assert (await load("busy", adapters["a3"])).status_code == 200
        long = asyncio.create_task(http.post("/v1/completions", json={
            "model": "busy", "prompt": [1, 2, 3], "max_tokens": 300, "ignore_eos": True}))
        while not engine.engine.lora.users.get("busy"):
            await asyncio.sleep(0.01)
        r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"})
        assert r.status_code == 200 and r.json()["status"] == "unloading", r.text
        r2 = await http.post("/v1/completions", json={"model": "busy", "prompt": [1], "max_tokens": 2})
        assert r2.status_code == 404
        assert (await long).status_code == 200
        assert "busy" not in {m["id"] for m in (await http.get("/v1/models")).json()["data"]}

    _serve(engine, go)
    _wait_idle(engine)
    engine.engine.check_integrity()


def test_load_and_unload_under_load(engine, adapters) -> None:
    """16 clients on the base model, two fixed adapters and the swapped ones, while an adapter is
    unloaded and another loaded every second (max_loras 3: slots swap too)."""
    swap_names = [f"x{i}" for i in range(6)]
    errors: list[str] = []
    counts = {"ok": 0, "gone": 0}

    async def go(http):
        loaded: list[str] = []
        stop = time.monotonic() + 4.0

        async def client(c: int) -> None:
            rng = random.Random(c)
            while time.monotonic() < stop:
                model = rng.choice(["tiny", "s0", "s1", *loaded] if loaded else ["tiny", "s0", "s1"])
                body = {"model": model, "prompt": [rng.randrange(500) for _ in range(rng.randrange(4, 40))],
                        "max_tokens": rng.randrange(1, 12), "ignore_eos": True, "temperature": 0.7}
                r = await http.post("/v1/completions", json=body)
                if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length":
                    counts["ok"] += 1
                elif r.status_code == 404 and model.startswith("x"):
                    counts["gone"] += 1  # unloaded between the client's choice and its request
                else:
                    errors.append(f"{model}: {r.status_code} {r.text[:200]}")

        async def swapper() -> None:
            i = 0
            while time.monotonic() < stop:
                name = swap_names[i % len(swap_names)]
                r = await http.post("/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": adapters[f"a{2 + i % 4}"]})
                if r.status_code == 200:
                    loaded.append(name)
                elif "already loaded" not in r.text:  # its deferred unload may not have ended yet
                    errors.append(f"load {name}: {r.status_code} {r.text[:200]}")
                if len(loaded) > 2:
                    victim = loaded.pop(0)
                    r = await http.post("/v1/unload_lora_adapter", json={"lora_name": victim})
                    if r.status_code != 200:
                        errors.append(f"unload {victim}: {r.status_code} {r.text[:200]}")
                i += 1
                await asyncio.sleep(1.0)
            for name in loaded:
                await http.post("/v1/unload_lora_adapter", json={"lora_name": name})

        await asyncio.gather(swapper(), *(client(c) for c in range(16)))

    _serve(engine, go)
    assert not errors, errors[:5]
    assert counts["ok"] > 50
    _wait_idle(engine)
    engine.engine.check_integrity()  # no leaked KV page, no pinned or referenced adapter slot
    lora = engine.engine.lora
    assert set(lora.adapters) == {"s0", "s1"} and lora.loads > 3


def test_async_generate_runs_the_named_adapter(engine) -> None:
    """AsyncEngine.generate(..., lora=name) runs that adapter, as the HTTP routes do; an unknown
    name is refused."""
    from pagoda.errors import ModelNotFoundError

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def tokens(lora):
        out = None
        async for out in engine.generate([5, 6, 7, 8], params, lora=lora):
            pass
        return out.outputs[0].token_ids

    base, adapted = asyncio.run(tokens(None)), asyncio.run(tokens("s0"))
    assert len(base) == len(adapted) == 6 and adapted != base
    with pytest.raises(ModelNotFoundError):
        asyncio.run(tokens("nope"))
