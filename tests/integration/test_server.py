"""The HTTP server end to end: a real process, the official openai client, raw SSE where it matters.

The real default model (slow) checks OpenAI semantics; the tiny random model checks load,
metrics, disconnects and graceful shutdown quickly with token-id prompts.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess, shared_real_server, sse_payloads, tiny_server

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
IGNORE_EOS = {"ignore_eos": True}


# ---- the real model, through the openai client -----------------------------------------------------

@pytest.fixture(scope="module")
def real() -> ServerProcess:
    return shared_real_server()


@pytest.fixture(scope="module")
def client(real: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def count_tokens(real: ServerProcess, **body: object) -> int:
    r = httpx.post(real.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["count"]


@pytest.mark.slow
def test_models_health_and_tokenizer_routes(real: ServerProcess, model: str) -> None:
    assert model == "SmolLM2-135M-Instruct"
    assert httpx.get(real.url + "/health").json() == {"status": "ok"}
    tok = httpx.post(real.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 8192
    assert httpx.post(real.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"


@pytest.mark.slow
def test_developer_role_and_text_parts(real: ServerProcess, model: str) -> None:
    """developer is rendered as system; a list of text parts as their joined text."""
    plain = [{"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": "Hi"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."},
                                               {"type": "text", "text": "Be kind."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    tokenize = [httpx.post(real.url + "/tokenize", json={"messages": m}).json()["tokens"] for m in (plain, parts)]
    assert tokenize[0] == tokenize[1]
    assert httpx.get(f"{real.url}/v1/models/{model}").json()["id"] == model


@pytest.mark.slow
def test_chat_usage_matches_tokenize(real: ServerProcess, client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, extra_body=IGNORE_EOS)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == count_tokens(real, messages=MESSAGES)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


@pytest.mark.slow
def test_chat_stream_equals_non_stream(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


@pytest.mark.slow
def test_completions_stream_and_usage(real: ServerProcess, client: openai.OpenAI, model: str) -> None:
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body=IGNORE_EOS)
    assert whole.usage.prompt_tokens == count_tokens(real, prompt=prompt)
    assert whole.usage.completion_tokens == 10
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10


@pytest.mark.slow
def test_n2_streaming_and_not(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, messages=MESSAGES, n=2, max_tokens=6, seed=7, extra_body=IGNORE_EOS)
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.slow
def test_stop_string(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, prompt="List some fruits: apple, banana,", max_tokens=16, temperature=0,
              extra_body=IGNORE_EOS)
    text = client.completions.create(**kw).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    assert "".join(e.token for e in content) == r.choices[0].message.content


@pytest.mark.slow
def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body=IGNORE_EOS).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first or sample(99) != first


@pytest.mark.slow
def test_echo_prompt_logprobs_for_scoring(real: ServerProcess, client: openai.OpenAI, model: str) -> None:
    """lm-eval's loglikelihood request: echo + logprobs, max_tokens 0 (prompt only) or 1."""
    prompt = "The capital of France is Paris"
    n = count_tokens(real, prompt=prompt)
    zero = client.completions.create(model=model, prompt=prompt, echo=True, max_tokens=0, logprobs=1, temperature=0)
    lp = zero.choices[0].logprobs
    assert zero.choices[0].text == prompt and zero.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    one = client.completions.create(model=model, prompt=prompt, echo=True, max_tokens=1, logprobs=1, temperature=0)
    lp1 = one.choices[0].logprobs
    assert len(lp1.token_logprobs) == n + 1 and one.choices[0].text.startswith(prompt)
    assert lp1.token_logprobs[1:n] == pytest.approx(lp.token_logprobs[1:], abs=1e-3)
    greedy = max(lp1.top_logprobs[-1].items(), key=lambda kv: kv[1])[0]
    assert greedy == lp1.tokens[-1]


@pytest.mark.slow
def test_batch_prompts(real: ServerProcess, client: openai.OpenAI, model: str) -> None:
    prompts = ["Hello", "Goodbye, my friend"]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=3, extra_body=IGNORE_EOS)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.prompt_tokens == sum(count_tokens(real, prompt=p) for p in prompts)
    assert r.usage.completion_tokens == 6
    ids = httpx.post(real.url + "/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    r = client.completions.create(model=model, prompt=[ids, ids], max_tokens=2, extra_body=IGNORE_EOS)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 2 * len(ids)


# ---- the tiny model: load, metrics, disconnects, shutdown --------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> ServerProcess:
    srv = tiny_server()
    yield srv
    assert srv.terminate() == 0


def test_64_concurrent_streams(tiny: ServerProcess) -> None:
    clients, max_tokens = 64, 16
    before = tiny.metrics()
    rng = random.Random(0)
    prompts = [[rng.randrange(500) for _ in range(rng.randrange(4, 40))] for _ in range(clients)]

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> tuple[int, int]:
        stream = await client.completions.create(
            model="dummy", prompt=prompt, max_tokens=max_tokens, logprobs=0, stream=True,
            stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
        streamed, usage = 0, None
        async for chunk in stream:
            for choice in chunk.choices:
                streamed += len(choice.logprobs.tokens) if choice.logprobs else 0
            usage = chunk.usage or usage
        return streamed, usage.completion_tokens

    async def run_all() -> list[tuple[int, int]]:
        client = openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key="x", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run_all())
    assert results == [(max_tokens, max_tokens)] * clients
    after = tiny.metrics()
    assert after["pagoda_generation_tokens_total"] - before["pagoda_generation_tokens_total"] == clients * max_tokens
    key = 'pagoda_request_finished_total{finish_reason="length"}'
    assert after[key] - before.get(key, 0.0) == clients
    assert after["pagoda_num_requests_running"] == 0
    assert after["pagoda_e2e_request_latency_seconds_count"] - before.get(
        "pagoda_e2e_request_latency_seconds_count", 0.0) == clients


def wait_for_idle(srv: ServerProcess, timeout: float = 3.0) -> dict[str, float]:
    """Until nothing runs and every KV page is free or held by the prefix cache."""
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        idle = m["pagoda_num_requests_running"] == 0 and m["pagoda_num_requests_in_flight"] == 0
        if idle and m["pagoda_kv_cache_free_pages"] + m["pagoda_kv_cache_cached_pages"] == m[
                "pagoda_kv_cache_total_pages"]:
            return m
        assert time.monotonic() < deadline, f"KV pages not returned: {m}"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_aborts_and_frees_pages(tiny: ServerProcess, stream: bool) -> None:
    wait_for_idle(tiny)
    body = {"prompt": list(range(1, 40)), "max_tokens": 4000, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", tiny.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = sum(1 for _, line in zip(range(6), lines) if line.startswith("data:"))
            assert got >= 3
            assert tiny.metrics()["pagoda_kv_cache_free_pages"] < tiny.metrics()["pagoda_kv_cache_total_pages"]
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny.url + "/v1/completions", json=body, timeout=0.5)
    m = wait_for_idle(tiny)
    time.sleep(0.3)  # the request is gone, not merely between steps
    assert tiny.metrics()["pagoda_generation_tokens_total"] == m["pagoda_generation_tokens_total"]
    assert httpx.post(tiny.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0() -> None:
    srv = tiny_server("--shutdown-timeout", "60")
    body = {"prompt": [5, 6, 7], "max_tokens": 800, "ignore_eos": True, "stream": True, "logprobs": 0}
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            srv.proc.send_signal(15)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no longer accepting connections
                httpx.get(srv.url + "/health", timeout=2)
            events = sse_payloads([first, *lines])
        assert events[-1] == "[DONE]"
        tokens = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1])
        assert tokens == 800
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0
        assert "finished (length)" in srv.stderr_tail()
    finally:
        srv.kill()
