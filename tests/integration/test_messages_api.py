"""POST /v1/messages and /v1/messages/count_tokens through the official anthropic SDK, in-process on
the tiny random model with the tiny tokenizer (seconds): streamed and non-streamed replies of a seeded
request agree block for block, tools and schemas hold, every bad request is an Anthropic-shaped 4xx;
the real model (slow) checks a plain conversation over a real server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's own httpx fork: an in-process client must be one of its
import jsonschema
import pytest

from pagoda.engine.async_engine import AsyncEngine
from pagoda.server.app import create_app
from tests.integration.test_structured_server import BOUNDED, PARAMS
from tests.server_utils import ServerProcess, shared_real_server
from tests.unit.test_structured import SCHEMA, loads
from tests.unit.test_tool_parsers import ADD

TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"],
          **({"description": t["function"]["description"]} if "description" in t["function"] else {})}
         for t in (BOUNDED, ADD)]
MSG = [{"role": "user", "content": "hi"}]


def run(engine: AsyncEngine, coro_fn, **app_options: Any) -> Any:
    """coro_fn(http, client) against a fresh app around the shared engine."""
    app = create_app(engine, "tiny", **app_options)

    async def main() -> Any:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
            client = anthropic.AsyncAnthropic(base_url="http://t", api_key="x", http_client=http, max_retries=0)
            return await coro_fn(http, client)

    return asyncio.run(main())


def streamed_and_whole(engine: AsyncEngine, **kw: Any) -> tuple[Any, Any, list[Any]]:
    async def go(http: httpx2.AsyncClient, client: anthropic.AsyncAnthropic) -> tuple[Any, Any, list[Any]]:
        whole = await client.messages.create(model="tiny", **kw)
        events = []
        async with client.messages.stream(model="tiny", **kw) as stream:
            async for event in stream:
                events.append(event)
            final = await stream.get_final_message()
        return whole, final, events

    return run(engine, go)


def same(a: Any, b: Any) -> None:
    """Two messages alike but for ids (tool_use ids are minted per request)."""
    def strip(m: Any) -> dict[str, Any]:
        d = m.model_dump(exclude_none=True)
        d.pop("id")
        for block in d["content"]:
            block.pop("id", None)
        return d

    assert strip(a) == strip(b)


def test_text_stream_equals_whole_and_usage(engine: AsyncEngine) -> None:
    kw = dict(max_tokens=12, messages=MSG, system="be brief", extra_body={"temperature": 1.0, "seed": 5})
    whole, final, events = streamed_and_whole(engine, **kw)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "tiny"
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.content[0].type == "text"
    same(whole, final)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds

    async def count(http: httpx2.AsyncClient, client: anthropic.AsyncAnthropic) -> Any:
        return await client.messages.count_tokens(model="tiny", messages=MSG, system="be brief")

    assert whole.usage.input_tokens == run(engine, count).input_tokens
    assert whole.usage.output_tokens <= 12


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "add"}])
def test_forced_tool_use_streams_input_json(engine: AsyncEngine, choice: dict[str, Any]) -> None:
    kw = dict(max_tokens=150, messages=MSG, tools=TOOLS, tool_choice={**choice, "disable_parallel_tool_use": True},
              extra_body={"temperature": 1.0, "seed": 3})
    whole, final, events = streamed_and_whole(engine, **kw)
    same(whole, final)
    assert whole.stop_reason == "tool_use" and [b.type for b in whole.content] == ["tool_use"]
    call = whole.content[0]
    assert call.name in ({"add"} if choice["type"] == "tool" else {"add", "get_weather"})
    jsonschema.validate(call.input, PARAMS[call.name])
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert len(pieces) >= 3 and json.loads("".join(pieces)) == call.input


def test_tool_round_trip_renders_like_chat_completions(engine: AsyncEngine) -> None:
    history = MSG + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me add."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "add",
                                           "input": {"a": 1, "b": 2}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "3"},
                                     {"type": "text", "text": "thanks"}]}]
    chat = MSG + [
        {"role": "assistant", "content": "Let me add.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "3"}, {"role": "user", "content": "thanks"}]

    async def go(http: httpx2.AsyncClient, client: anthropic.AsyncAnthropic) -> tuple[Any, Any]:
        count = await client.messages.count_tokens(model="tiny", messages=history, tools=TOOLS, system="sys")
        tokens = await http.post("/tokenize", json={"messages": [{"role": "system", "content": "sys"}, *chat],
                                                    "tools": [BOUNDED, ADD]})
        return count, tokens.json()

    count, tokens = run(engine, go)
    assert count.input_tokens == tokens["count"]


def test_output_format_json_schema(engine: AsyncEngine) -> None:
    kw = dict(max_tokens=150, messages=MSG, output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
              extra_body={"temperature": 1.0, "seed": 2})
    whole, final, _ = streamed_and_whole(engine, **kw)
    same(whole, final)
    jsonschema.validate(loads(whole.content[0].text), SCHEMA)


def test_thinking_blocks(engine: AsyncEngine) -> None:
    """deepseek_r1 reads output without </think> as thinking: a random model's reply is all thinking."""
    kw = dict(max_tokens=10, messages=MSG, extra_body={"temperature": 1.0, "seed": 8, "ignore_eos": True})

    async def go(http: httpx2.AsyncClient, client: anthropic.AsyncAnthropic) -> tuple[Any, Any, list[Any]]:
        whole = await client.messages.create(model="tiny", **kw)
        async with client.messages.stream(model="tiny", **kw) as stream:
            events = [e async for e in stream]
            final = await stream.get_final_message()
        return whole, final, events

    whole, final, events = run(engine, go, reasoning_parser="deepseek_r1")
    same(whole, final)
    assert [b.type for b in whole.content] == ["thinking"] and whole.content[0].thinking
    deltas = [e.delta.thinking for e in events if e.type == "content_block_delta"]
    assert "".join(deltas) == whole.content[0].thinking


BAD = [
    ({"messages": MSG}, 400, "max_tokens"),  # Anthropic requires it
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, 400, "messages[0].role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "image"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "add",
                                                                  "input": {}}]}]}, 400, "assistant messages"),
    ({"max_tokens": 4, "messages": MSG + [{"role": "assistant", "content": "Sure"}]}, 400, "prefill"),
    ({"max_tokens": 0, "messages": MSG}, 400, "max_tokens"),
    ({"max_tokens": 4, "messages": MSG, "temperature": -1}, 400, "temperature"),
    ({"max_tokens": 4, "messages": MSG, "tool_choice": {"type": "any"}}, 400, "tools"),
    ({"max_tokens": 4, "messages": MSG, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, 400, "nope"),
    ({"max_tokens": 4, "messages": MSG, "model": "claude-opus-4"}, 404, "does not exist"),
    ({"max_tokens": 4, "messages": []}, 400, "messages"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_requests_are_anthropic_errors(engine: AsyncEngine, case: int) -> None:
    body, status, words = BAD[case]

    async def go(http: httpx2.AsyncClient, _: Any) -> httpx2.Response:
        return await http.post("/v1/messages", json={"model": "tiny", **body} if "model" not in body else body)

    r = run(engine, go)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err
    assert err["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert words in err["error"]["message"], err


def test_sdk_errors_and_x_api_key(engine: AsyncEngine) -> None:
    async def go(http: httpx2.AsyncClient, client: anthropic.AsyncAnthropic) -> list[Any]:
        out = []
        try:
            await client.messages.create(model="tiny", max_tokens=4, messages=MSG)
        except anthropic.AuthenticationError as e:
            out.append(e.body)
        good = client.with_options(api_key="k")  # the SDK sends it as x-api-key
        out.append(await good.messages.create(model="tiny", max_tokens=2, messages=MSG))
        try:
            await good.messages.create(model="tiny", max_tokens=4, messages=[{"role": "bot", "content": "x"}])
        except anthropic.BadRequestError as e:
            out.append(e.body)
        out.append((await http.post("/v1/messages/nope", headers={"x-api-key": "k"})).json())
        return out

    denied, ok, bad_role, no_route = run(engine, go, api_key="k")
    assert denied["error"]["type"] == "authentication_error"
    assert ok.usage.output_tokens <= 2
    assert bad_role["error"]["type"] == "invalid_request_error" and "role" in bad_role["error"]["message"]
    assert no_route["type"] == "error" and no_route["error"]["type"] == "not_found_error"


# ---- the real model over a real server ------------------------------------------------------------

@pytest.mark.slow
def test_real_model_conversation() -> None:
    server: ServerProcess = shared_real_server()
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    kw = dict(model="SmolLM2-135M-Instruct", max_tokens=16, system="You are terse.", extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "Name three colors."}])
    # Warm the prefix cache first, so that the two requests compared below both find the prompt
    # cached and run the same kernels: a cache miss attends the prompt's last token with the
    # chunk kernel (bf16 probabilities), a hit with the decode kernel (float32), and greedy
    # output can differ between the two on a near-tie, which this prompt meets.
    client.messages.create(**kw)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert whole.content[0].text and text == whole.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens, final.stop_reason) == \
        (whole.usage.input_tokens, whole.usage.output_tokens, whole.stop_reason)
    stop = whole.content[0].text.split()[1]
    cut = client.messages.create(**{**kw, "stop_sequences": [stop]})
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
