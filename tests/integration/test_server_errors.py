"""Bad requests get OpenAI-shaped errors with the right status and `param`, and never hurt the server.

Runs against the tiny random model (fast to start, token-id prompts) with an API key set.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server_utils import API_KEY, ServerProcess, tiny_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
ANY = object()  # any param (including none)


def chat(**kw: Any) -> dict[str, Any]:
    return {"messages": MSG, **kw}


def cmpl(**kw: Any) -> dict[str, Any]:
    return {"prompt": [1, 2, 3], "max_tokens": 4, **kw}


# (id, method, path, body (dict -> JSON, str/bytes -> raw), status, param, code)
CASES: list[tuple[str, str, str, Any, int, Any, Any]] = [
    ("invalid-json", "POST", CHAT, b"{not json", 400, None, "invalid_json"),
    ("empty-body", "POST", CMPL, b"", 400, None, "invalid_json"),
    ("json-array", "POST", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("missing-messages", "POST", CHAT, {"model": "dummy"}, 400, "messages", None),
    ("empty-messages", "POST", CHAT, {"messages": []}, 400, "messages", None),
    ("messages-not-list", "POST", CHAT, {"messages": "hi"}, 400, "messages", None),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role", None),
    ("missing-role", "POST", CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role", None),
    ("missing-content", "POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0]", None),
    ("image-part", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", None),
    ("part-without-text", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0].content", None),
    ("content-number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("temperature-huge", "POST", CMPL, cmpl(temperature=1000), 400, "temperature", None),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top-p-above-one", "POST", CMPL, cmpl(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", "POST", CMPL, cmpl(top_k=-5), 400, "top_k", None),
    ("min-p-two", "POST", CHAT, chat(min_p=2), 400, "min_p", None),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n", None),
    ("n-string", "POST", CMPL, cmpl(n="2"), 400, "n", None),
    ("n-float", "POST", CMPL, cmpl(n=1.5), 400, "n", None),
    ("n-too-large", "POST", CHAT, chat(n=1000), 400, "n", None),
    ("best-of-too-large", "POST", CMPL, cmpl(best_of=1000), 400, "best_of", None),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens", None),
    ("max-completion-tokens-zero", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("frequency-penalty", "POST", CHAT, chat(frequency_penalty=3), 400, "frequency_penalty", None),
    ("presence-penalty", "POST", CMPL, cmpl(presence_penalty=-3), 400, "presence_penalty", None),
    ("repetition-penalty-zero", "POST", CMPL, cmpl(repetition_penalty=0), 400, "repetition_penalty", None),
    ("logit-bias-key", "POST", CMPL, cmpl(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit-bias-value", "POST", CMPL, cmpl(logit_bias={"5": 500}), 400, "logit_bias", None),
    ("logit-bias-out-of-vocab", "POST", CMPL, cmpl(logit_bias={"999999": 1}), 400, "logit_bias", None),
    ("stop-numbers", "POST", CHAT, chat(stop=[1, 2]), 400, "stop", None),
    ("stop-empty-string", "POST", CMPL, cmpl(stop=[""]), 400, "stop", None),
    ("stop-token-ids-negative", "POST", CMPL, cmpl(stop_token_ids=[-1]), 400, "stop_token_ids", None),
    ("seed-string", "POST", CHAT, chat(seed="x"), 400, "seed", None),
    ("min-tokens-above-max", "POST", CMPL, cmpl(min_tokens=10, max_tokens=2), 400, "min_tokens", None),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("stream-not-bool", "POST", CHAT, chat(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", "POST", CMPL, cmpl(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("structured-output-without-tokenizer", "POST", CMPL, cmpl(response_format={"type": "json_object"}), 400,
     "response_format", None),
    ("response-format-unknown-type", "POST", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type",
     None),
    ("unknown-model", "POST", CHAT, chat(model="gpt-9"), 404, "model", "model_not_found"),
    ("unknown-model-completions", "POST", CMPL, cmpl(model="gpt-9"), 404, "model", "model_not_found"),
    ("no-tokenizer-chat", "POST", CHAT, chat(), 400, "messages", None),
    ("missing-prompt", "POST", CMPL, {"max_tokens": 3}, 400, "prompt", None),
    ("prompt-empty-list", "POST", CMPL, cmpl(prompt=[]), 400, "prompt", None),
    ("prompt-empty-token-list", "POST", CMPL, cmpl(prompt=[[]]), 400, "prompt", None),
    ("prompt-mixed", "POST", CMPL, cmpl(prompt=[1, "a"]), 400, "prompt", None),
    ("prompt-object", "POST", CMPL, cmpl(prompt={"a": 1}), 400, "prompt", None),
    ("prompt-out-of-vocab", "POST", CMPL, cmpl(prompt=[999999]), 400, "prompt", None),
    ("prompt-text-without-tokenizer", "POST", CMPL, cmpl(prompt="hello"), 400, "prompt", None),
    ("prompt-plus-max-tokens-too-long", "POST", CMPL, cmpl(prompt=[1] * 10, max_tokens=5000), 400, "max_tokens",
     None),
    ("prompt-longer-than-context", "POST", CMPL, cmpl(prompt=[1] * 4100), 400, "prompt", None),
    ("best-of-below-n", "POST", CMPL, cmpl(n=3, best_of=2), 400, "best_of", None),
    ("best-of-streamed", "POST", CMPL, cmpl(n=1, best_of=2, stream=True), 400, "best_of", None),
    ("suffix", "POST", CMPL, cmpl(suffix="x"), 400, "suffix", None),
    ("logprobs-too-many", "POST", CMPL, cmpl(logprobs=50), 400, "logprobs", None),
    ("echo-not-bool", "POST", CMPL, cmpl(echo="no"), 400, "echo", None),
    ("max-tokens-zero-without-echo", "POST", CMPL, cmpl(max_tokens=0), 400, "max_tokens", None),
    ("tokenize-nothing", "POST", "/tokenize", {}, 400, "prompt", None),
    ("tokenize-text-without-tokenizer", "POST", "/tokenize", {"prompt": "hi"}, 400, "prompt", None),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [1, 999999]}, 400, "tokens", None),
    ("detokenize-strings", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens[0]", None),
    ("unknown-route", "POST", "/v1/nothing", {}, 404, None, "not_found"),
    ("unknown-get-route", "GET", "/v2/models", None, 404, None, "not_found"),
    ("wrong-method", "GET", CMPL, None, 405, None, "method_not_allowed"),
    ("unknown-model-get", "GET", "/v1/models/gpt-9", None, 404, "model", "model_not_found"),
]


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    srv = tiny_server("--api-key", API_KEY)
    yield srv
    srv.terminate()


def check_error_body(response: httpx.Response, status: int, param: Any = ANY, code: Any = ANY) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not ANY:
        assert err["param"] == param, err
    if code is not ANY:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server: ServerProcess, case: tuple) -> None:
    _, method, path, body, status, param, code = case
    content = body if isinstance(body, (bytes, str)) else None if body is None else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.request(method, server.url + path, content=content, headers=headers, timeout=30)
    err = check_error_body(r, status, param, code)
    if status == 400:
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
                         ids=["missing", "wrong", "no-bearer"])
def test_api_key_required(server: ServerProcess, headers: dict[str, str]) -> None:
    r = httpx.post(server.url + CMPL, json=cmpl(), headers=headers, timeout=30)
    check_error_body(r, 401, code="invalid_api_key")
    assert httpx.get(server.url + "/v1/models", headers=headers, timeout=30).status_code == 401


def test_open_paths_need_no_key(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert "pagoda_num_requests_running" in httpx.get(server.url + "/metrics", timeout=30).text
    preflight = httpx.options(server.url + CHAT, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=30)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://example.test")


def test_oversized_body(server: ServerProcess) -> None:
    """Over 16 MiB: refused from Content-Length, and while reading a chunked body that has none."""
    big = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'

    def chunks():
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    refused = 0
    for content in (big, chunks()):
        try:
            r = httpx.post(server.url + CMPL, content=content, headers={**AUTH, "Content-Type": "application/json"},
                           timeout=60)
        except httpx.TransportError:  # the server may close before the client finished sending
            continue
        check_error_body(r, 413, code="request_too_large")
        refused += 1
    assert refused >= 1


def test_server_still_serves_after_the_battery(server: ServerProcess) -> None:
    r = httpx.post(server.url + CMPL, json=cmpl(max_tokens=5, ignore_eos=True), headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_overloaded_is_503_with_retry_after() -> None:
    """One running slot and a queue of one: with both taken, the next request is refused with 503."""
    import asyncio

    srv = tiny_server("--max-queued-requests", "1", "--max-running-requests", "1")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            body = cmpl(max_tokens=3000, ignore_eos=True, stream=True)
            async with client.stream("POST", CMPL, json=body) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()  # keep a reference: a dropped iterator closes the response
                await lines.__anext__()  # it is decoding now
                queued = asyncio.create_task(client.post(CMPL, json=cmpl(max_tokens=3)))
                for _ in range(100):
                    if srv.metrics()["pagoda_num_requests_waiting"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                refused = await client.post(CMPL, json=cmpl())
                check_error_body(refused, 503, code="server_overloaded")
                assert refused.headers["Retry-After"].isdigit()
            # closing the stream aborted the long request, so the queued one runs
            assert (await queued).status_code == 200

    try:
        asyncio.run(scenario())
    finally:
        assert srv.terminate() == 0


def test_unexpected_exception_is_a_500_body(tiny_config_path) -> None:
    """In-process: a handler that crashes yields OpenAI's 500 body, not a traceback or a dead server."""
    import asyncio

    from pagoda.engine.async_engine import AsyncEngine
    from pagoda.server.app import create_app

    engine = AsyncEngine(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01)
    try:
        app = create_app(engine, "dummy")

        async def boom() -> None:
            raise RuntimeError("kaboom")

        app.add_api_route("/boom", boom)

        async def call() -> tuple[httpx.Response, httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get("/boom"), await client.get("/health")

        crashed, health = asyncio.run(call())
        err = check_error_body(crashed, 500)
        assert err["type"] == "server_error" and "kaboom" in err["message"]
        assert health.status_code == 200
    finally:
        engine.shutdown()
