"""POST /v1/responses through the official openai SDK, in-process on the tiny random model with the
tiny tokenizer (seconds): the streamed events of a seeded request build exactly the non-streamed
response (text, function calls, reasoning, usage), schemas and forced calls hold, input items render
as chat renders them, and every bad request is an OpenAI-shaped 400; the real model (slow) checks a
plain conversation over a real server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from pagoda.engine.async_engine import AsyncEngine
from tests.server_utils import run_in_app as run
from tests.integration.test_structured_server import BOUNDED, PARAMS
from tests.server_utils import ServerProcess, shared_real_server
from tests.unit.test_structured import SCHEMA, loads
from tests.unit.test_tool_parsers import ADD

TOOLS = [{"type": "function", **t["function"]} for t in (BOUNDED, ADD)]




def streamed_and_whole(
    engine: AsyncEngine, app_options: dict[str, Any] | None = None, **kw: Any
) -> tuple[Any, list[Any]]:
    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, list[Any]]:
        whole = await client.responses.create(model="tiny", **kw)
        events = [e async for e in await client.responses.create(model="tiny", stream=True, **kw)]
        if whole.status == "completed":  # the SDK's accumulating helper (it knows no response.incomplete)
            async with client.responses.stream(model="tiny", **kw) as stream:
                helper = await stream.get_final_response()
            assert comparable(helper.model_dump(exclude_none=True)) == comparable(whole.model_dump(exclude_none=True))
        return whole, events

    return run(engine, go, **(app_options or {}))


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """A response less what differs between two runs of one request (ids, time, prefix-cache hits)."""
    out = {k: v for k, v in response.items() if k not in ("id", "created_at")}
    out["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    out["usage"] = {k: v for k, v in response["usage"].items() if k != "input_tokens_details"}
    return out


def check_stream(whole: Any, events: list[Any]) -> dict[str, Any]:
    """The stream's events are well-ordered and its final response is the non-streamed one."""
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response.model_dump(exclude_none=True)
    assert comparable(final) == comparable(whole.model_dump(exclude_none=True))
    done = [e.item.model_dump(exclude_none=True) for e in events if e.type == "response.output_item.done"]
    assert done == final["output"]
    return final


def test_text_stream_equals_whole_and_usage(engine: AsyncEngine) -> None:
    kw = dict(input="hi", instructions="be brief", max_output_tokens=12, temperature=1.0, extra_body={"seed": 5})
    whole, events = streamed_and_whole(engine, **kw)
    assert whole.object == "response" and whole.status in ("completed", "incomplete") and whole.store is False
    check_stream(whole, events)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and [o.type for o in whole.output] == ["message"]

    async def count(http: httpx.AsyncClient, _: Any) -> int:
        r = await http.post("/tokenize", json={"messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}]})
        return r.json()["count"]

    assert whole.usage.input_tokens == run(engine, count) and whole.usage.output_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "add"}])
def test_forced_function_call_streams_arguments(engine: AsyncEngine, choice: Any) -> None:
    kw = dict(input="hi", tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_output_tokens=150,
              temperature=1.0, extra_body={"seed": 4})
    whole, events = streamed_and_whole(engine, **kw)
    check_stream(whole, events)
    assert [o.type for o in whole.output] == ["function_call"] and whole.status == "completed"
    call = whole.output[0]
    assert call.call_id.startswith("call_") and call.name in ({"add"} if choice != "required" else set(PARAMS))
    jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) >= 3 and "".join(pieces) == call.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]


def test_text_format_json_schema_and_object(engine: AsyncEngine) -> None:
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}}
    whole, events = streamed_and_whole(engine, input="hi", text=fmt, max_output_tokens=150, temperature=1.0,
                                       extra_body={"seed": 2})
    check_stream(whole, events)
    jsonschema.validate(loads(whole.output_text), SCHEMA)
    assert whole.text.format.type == "json_schema"


def test_function_call_items_render_like_chat(engine: AsyncEngine) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "add 1 and 2"}]},
             {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "3"}]
    chat = [{"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"}]

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, Any]:
        r = await client.responses.create(model="tiny", input=items, tools=TOOLS, max_output_tokens=2)
        tokens = await http.post("/tokenize", json={"messages": chat, "tools": [BOUNDED, ADD]})
        return r, tokens.json()

    r, tokens = run(engine, go)
    assert r.usage.input_tokens == tokens["count"]


def test_reasoning_items(engine: AsyncEngine) -> None:
    """deepseek_r1 reads output without </think> as thinking: a random model's reply is all reasoning."""
    kw = dict(input="hi", max_output_tokens=10, temperature=1.0, extra_body={"seed": 8, "ignore_eos": True})
    whole, events = streamed_and_whole(engine, {"reasoning_parser": "deepseek_r1"}, **kw)
    check_stream(whole, events)
    assert [o.type for o in whole.output] == ["reasoning"]
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text and text == whole.output[0].content[0].text


BAD = [
    ({"store": True}, "store", "stateless"),
    ({"previous_response_id": "resp_123"}, "previous_response_id", "stateless"),
    ({"background": True}, "background", "stateless"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input", "item type 'web_search_call' is not supported"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input", "unsupported role 'robot'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content",
     "'input_image' is not supported"),
    ({"input": [{"type": "function_call_output", "output": "3"}]}, "input[0].call_id", "call_id"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": None}, "input", None),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "needs a schema"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
    ({"temperature": -1.0}, "temperature", "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens", ">= 1"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format",
     "invalid JSON schema"),
    ({"model": "gpt-5"}, "model", "does not exist"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_requests_are_openai_errors(engine: AsyncEngine, case: int) -> None:
    extra, param, words = BAD[case]

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> Any:
        try:
            await client.responses.create(**{"model": "tiny", "input": "hi", "max_output_tokens": 4, **extra})
        except openai.APIStatusError as e:
            return e
        raise AssertionError("no error")

    e = run(engine, go)
    assert e.status_code == (404 if param == "model" else 400)
    err = e.body
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert words is None or words in err["message"], err


@pytest.mark.slow
def test_real_model_conversation() -> None:
    server: ServerProcess = shared_real_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kw = dict(model="SmolLM2-135M-Instruct", instructions="You are terse.", input="Name three colors.",
              max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    final = check_stream(whole, events)
    assert whole.output_text and final["usage"]["output_tokens"] == whole.usage.output_tokens
