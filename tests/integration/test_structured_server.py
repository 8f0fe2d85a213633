"""Structured output, tool calls and reasoning through the HTTP API, in-process (ASGI transport, the
official openai client) on the tiny random model with the tiny byte-level tokenizer: a random model
only ever produces what the grammar allows, so every guarantee is tested at its edge, in seconds."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from pagoda.engine.async_engine import AsyncEngine
from tests.server_utils import run_in_app as run
from tests.server_utils import sse_payloads
from tests.unit.test_structured import SCHEMA, loads
from tests.unit.test_tool_parsers import ADD, WEATHER

MSG = [{"role": "user", "content": "hi"}]
# a random model never closes a string by choice: bound it
BOUNDED = json.loads(json.dumps(WEATHER))
BOUNDED["function"]["parameters"]["properties"]["city"]["maxLength"] = 8
TOOLS = [BOUNDED, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}




ERRORS = [
    ({"guided_json": {"type": 5}}, "guided_json", "invalid JSON schema: Type should be a string"),
    ({"json_schema": '{"type": "object", "properties": 3}'}, "json_schema", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", 'invalid JSON schema: Unsupported type "nope"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"guided_regex": "(abc"}, "guided_regex", "invalid regex: Regex parsing error at position 5: The parenthesis"),
    ({"regex": "[z-a]"}, "regex", "invalid regex"),
    ({"ebnf": "root ::= missing"}, "ebnf", 'invalid grammar: EBNF parser error at line 1, column 10: Rule "missing"'),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "choice": ["a"]}, None, "give only one of guided_regex, choice"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "must match"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}], "tool_choice": "required"},
     "tools", "invalid structural tag"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_invalid_structured_requests_are_400_with_the_parsers_message(engine: AsyncEngine, case: int) -> None:
    extra, param, message = ERRORS[case]

    async def go(http: httpx.AsyncClient, _: Any) -> httpx.Response:
        return await http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **extra})

    r = run(engine, go)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_completions_regex_choice_and_schema_always_match(engine: AsyncEngine) -> None:
    regex = r"\d{3}-[a-c]{2,4}"
    choices = ["red", "green", "blue <b>"]

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> list[Any]:
        jobs = []
        for i in range(6):
            kw = dict(model="tiny", prompt=[1, 2, 3 + i], max_tokens=100, temperature=1.0, seed=i)
            jobs += [client.completions.create(**kw, extra_body={"guided_regex": regex}),
                     client.completions.create(**kw, extra_body={"choice": choices}),
                     client.completions.create(**kw, extra_body={"json_schema": SCHEMA})]
        return await asyncio.gather(*jobs)

    results = run(engine, go)
    for i, r in enumerate(results):
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        if i % 3 == 0:
            assert re.fullmatch(regex, c.text)
        elif i % 3 == 1:
            assert c.text in choices
        else:
            jsonschema.validate(loads(c.text), SCHEMA)


def test_chat_response_format_json_schema_and_object(engine: AsyncEngine) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> Any:
        a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=150, seed=1, response_format=fmt)
        b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=150, seed=2,
                                           response_format={"type": "json_object"})
        return await asyncio.gather(a, b)

    a, b = run(engine, go)
    jsonschema.validate(loads(a.choices[0].message.content), SCHEMA)
    if b.choices[0].finish_reason == "stop":
        assert isinstance(loads(b.choices[0].message.content), dict)


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_always_parse_and_validate(engine: AsyncEngine, choice: str) -> None:
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "add"}}
    names = {"get_weather", "add"} if choice == "required" else {"add"}

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> list[Any]:
        kw = dict(model="tiny", messages=MSG, tools=TOOLS, tool_choice=tool_choice, max_tokens=120,
                  parallel_tool_calls=False)
        return await asyncio.gather(*[client.chat.completions.create(**kw, seed=s) for s in range(6)])

    for r in run(engine, go):
        c = r.choices[0]  # OpenAI ends a call to a named function with "stop"
        assert c.finish_reason == ("tool_calls" if choice == "required" else "stop") and c.message.content is None, c
        assert len(c.message.tool_calls) == 1
        _check_calls(c.message.tool_calls, names)


@pytest.mark.parametrize("seed", [11, 12])
def test_streamed_tool_call_deltas_add_up_to_the_message(engine: AsyncEngine, seed: int) -> None:
    """Arguments stream in pieces: the first delta of a call carries id, type and name, later ones only
    arguments; the pieces add up to exactly the non-streamed call, with the same finish reason."""
    body = {"model": "tiny", "messages": MSG, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200,
            "seed": seed, "temperature": 1.0}

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, list[Any]]:
        whole = (await http.post("/v1/chat/completions", json=body)).json()
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}})
        return whole, sse_payloads(streamed.text.splitlines())

    whole, events = run(engine, go)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == \
        (whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"])
    events = events[:-2] + events[-1:]
    message = whole["choices"][0]["message"]
    calls: dict[int, dict[str, Any]] = {}
    pieces = 0
    for event in events[:-1]:
        delta = event["choices"][0]["delta"]
        assert not delta.get("content"), "a forced call has no content"
        for d in delta.get("tool_calls", []):
            if d["index"] not in calls:
                assert set(d) == {"index", "id", "type", "function"} and d["type"] == "function"
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                pieces += 1
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert pieces >= 3, "the arguments arrive in pieces"
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def test_tool_round_trip_renders_for_a_template_without_tools(engine: AsyncEngine) -> None:
    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> Any:
        first = await client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, max_tokens=120,
                                                     tool_choice={"type": "function", "function": {"name": "add"}})
        call = first.choices[0].message.tool_calls[0]
        history = MSG + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "3"}]
        final = await client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5,
                                                     extra_body={"ignore_eos": True})
        prompt = (await http.post("/tokenize", json={"messages": history, "tools": TOOLS})).json()
        return call, final, prompt

    call, final, prompt = run(engine, go)
    assert final.choices[0].finish_reason == "length"
    assert final.usage.prompt_tokens == prompt["count"]
    text = engine.tokenizer.decode(prompt["tokens"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(BOUNDED) in text
    call_json = json.dumps({"name": "add", "arguments": json.loads(call.function.arguments)})
    assert f"<|im_start|>assistant\n<tool_call>\n{call_json}\n</tool_call><|im_end|>" in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_reasoning_parser_splits_thinking(engine: AsyncEngine) -> None:
    grammar = 'root ::= "<think>" [a-c]{2,5} "</think>" [x-z]{2,5}'
    body = {"model": "tiny", "messages": MSG, "max_tokens": 60, "seed": 3, "temperature": 1.0, "ebnf": grammar}

    async def go(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> tuple[Any, list[Any], Any]:
        whole = (await http.post("/v1/chat/completions", json=body)).json()
        streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
        return whole, sse_payloads(streamed.text.splitlines())

    whole, events = run(engine, go, reasoning_parser="deepseek_r1")
    message = whole["choices"][0]["message"]
    assert re.fullmatch("[a-c]{2,5}", message["reasoning_content"]) and re.fullmatch("[x-z]{2,5}", message["content"])
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    # without a reasoning parser the thinking is plain content
    plain = run(engine, lambda http, _: http.post("/v1/chat/completions", json=body)).json()
    assert plain["choices"][0]["message"]["content"].startswith("<think>")
    assert "reasoning_content" not in plain["choices"][0]["message"]
