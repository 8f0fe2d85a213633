"""Structured output and tool calls with the real default model (SmolLM2-135M) through the openai
client: what the issue promises, at the scale it names. Requests go out concurrently so the whole
module stays within a couple of minutes on two cores."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import openai
import pytest

from tests.server_utils import ServerProcess, shared_real_server

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["engineer", "designer", "manager", "analyst"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16},
                           "zip": {"type": "string", "pattern": r"^\d{5}$"}},
            "required": ["city", "zip"],
        },
        "remote": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "skills", "address", "remote"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CONVERT = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount between currencies",
    "parameters": {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 10**6},
                                                    "from": {"enum": ["USD", "EUR", "GBP"]},
                                                    "to": {"enum": ["USD", "EUR", "GBP"]}},
                   "required": ["amount", "from", "to"]}}}
TOOLS = [WEATHER, CONVERT]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What's the weather like in Paris?", "How much is 20 dollars in euros?", "Is it raining in Tokyo?",
             "Convert 15 GBP to USD.", "Weather in Berlin, in fahrenheit please."]


@pytest.fixture(scope="module")
def real() -> ServerProcess:
    return shared_real_server()


@pytest.fixture(scope="module")
def model(real: ServerProcess) -> str:
    return openai.OpenAI(base_url=real.url + "/v1", api_key="unused").models.list().data[0].id


def concurrently(real: ServerProcess, requests: Callable[[openai.AsyncOpenAI], list[Awaitable[Any]]]) -> list[Any]:
    """Send the requests at once (one event loop and client per call) and return their results."""
    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=real.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*requests(client))

    return asyncio.run(main())


def test_50_json_schema_requests_all_validate(real: ServerProcess, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    results = concurrently(real, lambda client: [client.chat.completions.create(
        model=model, response_format=fmt, max_tokens=160, temperature=0.8, seed=i,
        messages=[{"role": "user", "content": f"Invent employee number {i} of a small company, as JSON."}])
        for i in range(50)])
    texts = set()
    for r in results:
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
        texts.add(c.message.content)
    assert len(texts) > 10  # seeded sampling: not one answer 50 times


def test_regex_and_choice_always_match(real: ServerProcess, model: str) -> None:
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    labels = ["positive", "negative", "neutral"]
    reviews = ["I loved it!", "Terrible service.", "It was fine, I guess.", "Never again.", "Best pizza in town."]

    def requests(client: openai.AsyncOpenAI) -> list[Awaitable[Any]]:
        jobs: list[Awaitable[Any]] = []
        for i, review in enumerate(reviews):
            jobs.append(client.completions.create(model=model, prompt="Call us at ", max_tokens=30, seed=i,
                                                  temperature=1.0, extra_body={"guided_regex": phone}))
            jobs.append(client.chat.completions.create(
                model=model, max_tokens=10, temperature=1.0, seed=i, extra_body={"guided_choice": labels},
                messages=[{"role": "user", "content": f"Sentiment of this review: {review}"}]))
        return jobs

    for i, r in enumerate(concurrently(real, requests)):
        c = r.choices[0]
        text = c.text if i % 2 == 0 else c.message.content
        assert c.finish_reason == "stop"
        assert re.fullmatch(phone, text) if i % 2 == 0 else text in labels, text


def _valid_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_always_yields_valid_calls(real: ServerProcess, model: str, choice: str) -> None:
    named = {"type": "function", "function": {"name": "convert_currency"}}
    tool_choice = "required" if choice == "required" else named
    names = set(PARAMS) if choice == "required" else {"convert_currency"}
    results = concurrently(real, lambda client: [client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], tools=TOOLS, tool_choice=tool_choice, max_tokens=100,
        temperature=0.7, seed=i, parallel_tool_calls=False) for i, q in enumerate(QUESTIONS)])
    for r in results:
        c = r.choices[0]
        # a named function ends with "stop", as OpenAI's do
        assert c.finish_reason == ("tool_calls" if choice == "required" else "stop") and c.message.content is None, \
            c.message
        assert len(c.message.tool_calls) == 1
        _valid_calls(c.message.tool_calls, names)


def _stream_message(stream: Any) -> tuple[str, list[dict[str, str]], str | None, int]:
    """Accumulate an openai chat stream: content, tool calls by index, finish reason, and the number
    of argument pieces that followed each call's first delta."""
    content, calls, finish, pieces = "", {}, None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            pieces += d.index in calls
            entry = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += d.id or ""
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, pieces


def test_tool_round_trip_streaming_and_not(real: ServerProcess, model: str) -> None:
    client = openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "What's the weather in Paris? Use celsius."}]
    kw = dict(model=model, tools=TOOLS, temperature=0, max_tokens=100)

    first = client.chat.completions.create(messages=question, tool_choice="required", parallel_tool_calls=False, **kw)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    _valid_calls([call], set(PARAMS))
    content, calls, finish, pieces = _stream_message(client.chat.completions.create(
        messages=question, tool_choice="required", parallel_tool_calls=False, stream=True, **kw))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]
    assert calls[0]["id"].startswith("call_") and pieces >= 3  # the arguments streamed

    history = question + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})},
    ]
    final = client.chat.completions.create(messages=history, **kw)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    s_content, s_calls, s_finish, _ = _stream_message(client.chat.completions.create(messages=history, stream=True, **kw))
    assert (s_content or None, s_finish) == (answer.message.content, answer.finish_reason)
    assert [c["arguments"] for c in s_calls] == [c.function.arguments for c in answer.message.tool_calls or []]
