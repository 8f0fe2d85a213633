"""POST /v1/embeddings through the official openai SDK: in-process on the tiny random model (seconds)
for shapes, encodings, batching, pooling, the prefix cache and every bad request; the real default
model (slow) for meaning: related sentences closer than unrelated ones."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from pagoda.engine.async_engine import AsyncEngine
from tests.server_utils import run_in_app as run
from tests.server_utils import ServerProcess, shared_real_server

HIDDEN = 64  # TINY_LLAMA's hidden size




def vectors(response: Any) -> list[np.ndarray]:
    return [np.array(d.embedding, dtype=np.float32) for d in sorted(response.data, key=lambda d: d.index)]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_shapes_encodings_batching_and_token_ids(engine: AsyncEngine, pooling: str) -> None:
    texts = ["the cat sat", "on the mat", "a much longer input that spans several pages of the cache " * 3]

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, ...]:
        batch = await client.embeddings.create(model="tiny", input=texts, encoding_format="float")
        as_b64 = (await http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})).json()
        alone = [await client.embeddings.create(model="tiny", input=t) for t in texts]  # the SDK asks for base64
        ids = [(await http.post("/tokenize", json={"prompt": t})).json()["tokens"] for t in texts]
        by_ids = await client.embeddings.create(model="tiny", input=ids)
        short = await client.embeddings.create(model="tiny", input=texts[0], dimensions=16)
        return batch, as_b64, alone, ids, by_ids, short

    batch, as_b64, alone, ids, by_ids, short = run(engine, go, pooling=pooling)
    assert batch.object == "list" and batch.model == "tiny" and [d.index for d in batch.data] == [0, 1, 2]
    full = vectors(batch)
    assert all(v.shape == (HIDDEN,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in full)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(len(i) for i in ids)
    b64 = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in as_b64["data"]]
    for a, b in zip(b64, full):  # base64: little-endian float32 of the same vectors (computed again, and a
        np.testing.assert_allclose(a, b, atol=1e-6)  # float32 matmul's bits may vary with a step's rows)
    for v, one in zip(full, alone):  # alone or in a batch: the same vector
        np.testing.assert_allclose(vectors(one)[0], v, atol=1e-6)
    for v, w in zip(full, vectors(by_ids)):  # token ids: as the text they encode
        np.testing.assert_allclose(w, v, atol=1e-6)
    cut = vectors(short)[0]  # dimensions: the first d components, normalised again
    assert cut.shape == (16,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    np.testing.assert_allclose(cut, full[0][:16] / np.linalg.norm(full[0][:16]), atol=1e-6)


def test_last_and_mean_pooling_differ_and_last_uses_the_prefix_cache(engine: AsyncEngine) -> None:
    text = "shared prefix of a long enough input to fill a few pages " * 4

    async def go(_: httpx.AsyncClient, client: openai.AsyncOpenAI) -> np.ndarray:
        return vectors(await client.embeddings.create(model="tiny", input=text))[0]

    before = engine.stats().prompt_tokens_cached
    last = [run(engine, go) for _ in range(2)]
    assert engine.stats().prompt_tokens_cached > before  # the second request reused the first's pages
    np.testing.assert_allclose(last[0], last[1], atol=1e-5)
    mean = run(engine, go, pooling="mean")
    assert float(mean @ last[0]) < 0.999


def test_embeddings_share_the_batch_with_generation(engine: AsyncEngine) -> None:
    async def go(_: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, Any]:
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=20, extra_body={"ignore_eos": True})
        emb = client.embeddings.create(model="tiny", input=[f"text {i}" for i in range(8)])
        return await asyncio.gather(chat, emb)

    chat, emb = run(engine, go)
    assert chat.usage.completion_tokens == 20 and len(emb.data) == 8


def test_one_token_embedding_beside_decodes_is_not_served_by_a_decode_graph(tiny_config_path) -> None:
    """A one-token embedding chunk in a step of decodes looks like a decode step; decode graphs
    (here the CPU stand-in) return logits only, so such a step runs eagerly and keeps its vector."""
    from pagoda import LLM, SamplingParams
    from pagoda.engine.graph_runner import EagerGraph

    llm = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02)
    engine = llm.engine
    engine.runner.capture_graphs(4, engine.scheduler.pages_needed(engine.context_length), EagerGraph)
    engine.add_request("gen", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # the prompt; from here on "gen" decodes
    engine.enqueue("emb", engine.make_requests("emb", [9], None, 0, "last"), None)
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    vector = outputs["emb"].embedding
    assert vector is not None and vector.shape == (HIDDEN,)
    alone = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02).engine
    alone.enqueue("emb", alone.make_requests("emb", [9], None, 0, "last"), None)
    (out,) = alone.step()
    torch.testing.assert_close(out.embedding, vector)


BAD = [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty list"),
    ({"input": [[]]}, "input", "input must be"),
    ({"input": {"text": "x"}}, "input", "input must be"),
    ({"input": [1, "a"]}, "input", "input must be"),
    ({"input": [[1, 2, 9999]]}, "input", "[0, 512)"),
    ({"input": "x", "dimensions": 0}, "dimensions", ">= 1"),
    ({"input": "x", "dimensions": 65}, "dimensions", "64"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": [7] * 5000}, "input", "context length"),
    ({"input": "x", "model": "text-embedding-3-small"}, "model", "does not exist"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_requests_are_openai_errors(engine: AsyncEngine, case: int) -> None:
    body, param, words = BAD[case]

    async def go(http: httpx.AsyncClient, _: Any) -> httpx.Response:
        return await http.post("/v1/embeddings", json=body)

    r = run(engine, go)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


# ---- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_related_sentences_are_closer_on_the_default_model() -> None:
    server: ServerProcess = shared_real_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    triples = [("The cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today."),
               ("How do I bake bread at home?", "What is a good recipe for homemade bread?",
                "The train to Berlin leaves at noon."),
               ("He plays football every weekend.", "Soccer is his favourite sport.", "Quantum computers use qubits.")]
    for anchor, related, unrelated in triples:
        a, r, u = vectors(client.embeddings.create(model="SmolLM2-135M-Instruct", input=[anchor, related, unrelated]))
        assert float(a @ r) > float(a @ u), (anchor, float(a @ r), float(a @ u))
    # The default int4 weights run a step of up to 16 rows exactly and a bigger one on bf16-rounded
    # weights (README, --quantization), so a short input alone and in a batch agree closely, not bit for
    # bit (float weights agree exactly: the tiny-model test above).
    alone = vectors(client.embeddings.create(model="SmolLM2-135M-Instruct", input=triples[0][0]))[0]
    batch = vectors(client.embeddings.create(model="SmolLM2-135M-Instruct", input=[t for tr in triples for t in tr]))
    assert float(alone @ batch[0]) > 0.999
