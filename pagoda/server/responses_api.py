"""POST /v1/responses: OpenAI's Responses API (stateless) over the chat path.

A request becomes a ChatCompletionRequest (``instructions`` a system message, message items
messages, ``function_call`` items an assistant's tool_calls, ``function_call_output`` items tool
messages, ``text.format`` a response_format) and runs through OpenAIServing.start_chat like any chat
completion. The parsed output becomes output items (reasoning, message, function_call) built by one
OutputItems machine, fed the whole parse (non-streamed) or each streamed delta, so both agree; the
stream is its typed events. Nothing is stored: ``store: true``, ``previous_response_id`` and
``background`` are refused with a 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.engine.outputs import RequestOutput
from pagoda.server.chat_output import ChoiceDelta
from pagoda.server.errors import APIError
from pagoda.server.protocol import ChatCompletionRequest, _Strict
from pagoda.server.serving import ChatRun, OpenAIServing
from pagoda.server.streaming import SSEResponse, named_sse
from pagoda.server.tool_parsers import coalesce

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
MESSAGE_ROLES = ("user", "assistant", "system", "developer")
RENAMES = {"max_tokens": "max_output_tokens", "prompt": "input", "response_format": "text.format"}  # chat's -> ours


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # effort etc.: the reasoning parser decides what is thinking
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # pagoda's extras, as on chat completions
    top_k: int | None = None

    @model_validator(mode="after")
    def _stateless(self) -> ResponsesRequest:
        if self.store:
            raise ValueError("store: this server is stateless and keeps no responses; send store: false (or omit it)")
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id: this server is stateless and keeps no responses; "
                             "send the whole conversation as input items")
        if self.background:
            raise ValueError("background: background responses need a stored response, which this stateless "
                             "server does not keep")
        return self

    @field_validator("input")
    @classmethod
    def _known_items(cls, items: Any) -> Any:
        if isinstance(items, list):
            if not items:
                raise ValueError("input must not be empty")
            for i, item in enumerate(items):
                kind = item.get("type", "message")
                if kind not in ITEM_TYPES:
                    raise ValueError(f"input[{i}]: item type {kind!r} is not supported; supported: "
                                     f"{', '.join(ITEM_TYPES)} (reasoning items are accepted and dropped)")
                if kind == "message" and item.get("role") not in MESSAGE_ROLES:
                    raise ValueError(f"input[{i}]: unsupported role {item.get('role')!r}; expected one of "
                                     f"{', '.join(MESSAGE_ROLES)}")
        return items


def _content_text(content: Any, where: str) -> str:
    """A message item's content: a string, or input_text / output_text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: content part type {kind!r} is not supported; only input_text "
                           "and output_text", param=f"{where}.content")
        texts.append(part["text"])
    return "\n".join(texts)


def _field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"{where}: a {item.get('type')} item needs a string {name!r}", param=f"{where}.{name}")
    return value


def chat_fields(req: ResponsesRequest) -> dict[str, Any]:
    """The ChatCompletionRequest fields of a Responses request."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where), "arguments": _field(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                             "content": _field(item, "output", where)})
    fields: dict[str, Any] = {
        "model": req.model, "messages": messages, "max_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed, "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        fields["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                           for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        fields["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                        "function": {"name": choice.name}}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, 'text.format of type "json_schema" needs a schema', param="text.format.schema")
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
    return {k: v for k, v in fields.items() if v is not None}


class OutputItems:
    """Output items from parsed deltas, with the stream events that build them: an item opens when
    its first piece arrives and closes when another kind of piece (or the end) comes."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.key: Any = None  # the open item: "reasoning", "message" or a call's index

    def feed(self, d: ChoiceDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if d.reasoning:
            if self.key != "reasoning":
                events += self._open("reasoning", {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                                                   "content": [{"type": "reasoning_text", "text": ""}]})
            self.items[-1]["content"][0]["text"] += d.reasoning
            events.append({"type": "response.reasoning_text.delta", **self._at(), "content_index": 0,
                           "delta": d.reasoning})
        if d.content:
            if self.key != "message":
                events += self._open_message()
            self.items[-1]["content"][0]["text"] += d.content
            events.append({"type": "response.output_text.delta", **self._at(), "content_index": 0,
                           "delta": d.content, "logprobs": []})
        for call in coalesce(d.calls):
            if call.name is not None:
                events += self._open(call.index, {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                                                  "call_id": call.id, "name": call.name, "arguments": ""})
            if call.arguments:
                self.items[-1]["arguments"] += call.arguments
                events.append({"type": "response.function_call_arguments.delta", **self._at(),
                               "delta": call.arguments})
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the open item; a reply with no output at all gets an empty message."""
        events = [] if self.items else self._open_message()
        return events + self._close(status)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _open_message(self) -> list[dict[str, Any]]:
        return self._open("message", {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                                      "content": [{"type": "output_text", "text": "", "annotations": []}]})

    def _open(self, key: Any, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close("completed")
        self.key = key
        self.items.append({**item, "status": "in_progress"})
        added = {**item, "status": "in_progress"}
        if "content" in item:
            added["content"] = []
        events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": added})
        if item["type"] == "message":
            events.append({"type": "response.content_part.added", **self._at(), "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": []}})
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self.key is None:
            return []
        item, at = self.items[-1], self._at()
        item["status"], self.key = status, None
        events: list[dict[str, Any]] = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", **at, "content_index": 0, "text": part["text"],
                        "logprobs": []},
                       {"type": "response.content_part.done", **at, "content_index": 0, "part": part}]
        elif item["type"] == "reasoning":
            events.append({"type": "response.reasoning_text.done", **at, "content_index": 0,
                           "text": item["content"][0]["text"]})
        else:
            events.append({"type": "response.function_call_arguments.done", **at, "name": item["name"],
                           "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": at["output_index"], "item": item})
        return events


class Responses:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        chat = ChatCompletionRequest.model_validate(chat_fields(req))
        run = await self.serving.start_chat(chat, f"resp_{uuid.uuid4().hex}", RENAMES)
        head = self._head(req, run, int(time.time()))
        if req.stream:
            return SSEResponse(self._events(run, head), on_error=self._stream_error)
        final, (parsed,) = await self.serving.collect_chat(run, raw)
        items = OutputItems()
        items.feed(parsed)
        status = self._status(final)
        items.finish(status)
        return JSONResponse(self._body(head, final, items, status))

    def _head(self, req: ResponsesRequest, run: ChatRun, created: int) -> dict[str, Any]:
        """The response object's fields that echo the request."""
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        return {
            "id": run.request_id, "object": "response", "created_at": created, "model": self.serving.model_name,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls,
            "tool_choice": (req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None
                            else req.tool_choice.model_dump()) or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "text": {"format": fmt},
            "reasoning": req.reasoning, "store": False, "previous_response_id": None, "background": False,
            "metadata": req.metadata or {}, "error": None, "incomplete_details": None, "user": req.user}

    @staticmethod
    def _status(final: RequestOutput) -> str:
        return "incomplete" if final.outputs[0].finish_reason == "length" else "completed"

    @staticmethod
    def _body(head: dict[str, Any], final: RequestOutput, items: OutputItems, status: str) -> dict[str, Any]:
        prompt, completion = len(final.prompt_token_ids), len(final.outputs[0].token_ids)
        return {**head, "status": status, "output": items.items,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": {"input_tokens": prompt,
                          "input_tokens_details": {"cached_tokens": final.num_cached_tokens, "cache_write_tokens": 0},
                          "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": prompt + completion}}

    @staticmethod
    def _stream_error(e: APIError) -> str:
        return named_sse("error", {"type": "error", "code": e.code, "message": e.message, "param": e.param,
                                   "sequence_number": 0})

    async def _events(self, run: ChatRun, head: dict[str, Any]) -> AsyncIterator[str]:
        seq = 0

        def event(body: dict[str, Any]) -> str:
            nonlocal seq
            seq += 1
            return named_sse(body["type"], {**body, "sequence_number": seq - 1})

        pending = {**head, "status": "in_progress", "output": [], "usage": None}
        yield event({"type": "response.created", "response": pending})
        yield event({"type": "response.in_progress", "response": pending})
        items = OutputItems()
        steps = self.serving.chat_steps(run)
        try:
            async for step in steps:
                for body in items.feed(step.delta):
                    yield event(body)
                if step.choice.finished:
                    status = self._status(step.output)
                    for body in items.finish(status):
                        yield event(body)
                    kind = "response.completed" if status == "completed" else "response.incomplete"
                    yield event({"type": kind, "response": self._body(head, step.output, items, status)})
        finally:
            await steps.aclose()  # type: ignore[attr-defined]

