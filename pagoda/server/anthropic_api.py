"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path.

A request becomes a ChatCompletionRequest (``system`` a system message, ``tool_use`` blocks an
assistant's tool_calls, ``tool_result`` blocks tool messages, tools functions, tool_choice
``any``/``tool`` "required"/a named function) and runs through OpenAIServing.start_chat like any
chat completion: same sampling, stopping, tool rendering, forced-call grammar and parsers. The
parsed output comes back as content blocks (thinking, text, tool_use), streamed as Anthropic's
events. Errors on these routes are Anthropic-shaped (errors.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.engine.outputs import CompletionOutput
from pagoda.server.chat_output import ChoiceDelta
from pagoda.server.errors import APIError, anthropic_error_body
from pagoda.server.protocol import ChatCompletionRequest, _Strict
from pagoda.server.serving import ChatRun, OpenAIServing
from pagoda.server.streaming import SSEResponse, named_sse
from pagoda.server.tool_parsers import coalesce


class TextBlock(_Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False


class ThinkingBlock(_Strict):
    """Earlier turns' thinking, sent back by clients: dropped, as Anthropic drops it."""

    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]
BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class InputMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content: Any) -> Any:
        for block in content if isinstance(content, list) else []:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in BLOCK_TYPES:
                raise ValueError(f"content block type {kind!r} is not supported; "
                                 "only text, tool_use and tool_result (thinking is accepted and dropped)")
        return content


class AnthropicTool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class OutputFormat(_Strict):
    """Anthropic's structured outputs: the reply is JSON valid against `schema`."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None  # (`effort` is ignored)


class _MessagesInput(_Strict):
    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


class MessagesRequest(_MessagesInput):
    max_tokens: int  # required, as Anthropic requires it
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for output_config.format
    seed: int | None = None  # pagoda's extra (reproducible sampling), as on chat completions


class CountTokensRequest(_MessagesInput):
    pass


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


def chat_fields(req: _MessagesInput) -> dict[str, Any]:
    """The ChatCompletionRequest fields of a Messages request (its conversation, tools and tool_choice)."""
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        texts, calls = [], []
        for block in m.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                if m.role != "assistant":
                    raise APIError(400, f"messages.{i}: tool_use blocks belong in assistant messages")
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input)}})
            elif isinstance(block, ToolResultBlock):
                if m.role != "user":
                    raise APIError(400, f"messages.{i}: tool_result blocks belong in user messages")
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _text(block.content)})
        if m.role == "assistant":
            messages.append({"role": "assistant", "content": "\n".join(texts) or ("" if not calls else None),
                             **({"tool_calls": calls} if calls else {})})
        elif texts:
            messages.append({"role": "user", "content": "\n".join(texts)})
    if req.messages[-1].role == "assistant":
        raise APIError(400, "a final assistant message (prefilling the reply) is not supported")
    fields: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {})}}
            for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name')
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool_use block's input: the arguments object ({} if a cut-off call left them unparseable)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(c: CompletionOutput, made_calls: bool) -> tuple[str | None, str | None]:
    """Anthropic's (stop_reason, stop_sequence) of a finished choice."""
    if c.finish_reason == "length":
        return "max_tokens", None
    if made_calls:
        return "tool_use", None
    if isinstance(c.stop_reason, str):
        return "stop_sequence", c.stop_reason
    return "end_turn", None


class AnthropicMessages:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, Any]:
        chat = ChatCompletionRequest.model_validate(chat_fields(req))
        self.serving.check_model(req.model)
        if self.serving.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat")
        ids = await self.serving.encode_chat(chat.messages, chat.active_tools)
        return {"input_tokens": len(ids)}

    async def create(self, req: MessagesRequest, raw: Request) -> Response:
        if req.max_tokens < 1:
            raise APIError(400, f"max_tokens: must be >= 1 (got {req.max_tokens})")
        fields = {**chat_fields(req), "max_tokens": req.max_tokens, "stop": req.stop_sequences,
                  "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed}
        fmt = req.output_format or (req.output_config.format if req.output_config else None)
        if fmt is not None:
            fields["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": fmt.schema_}}
        chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        run = await self.serving.start_chat(chat, msg_id)
        if req.stream:
            return SSEResponse(self._events(run), on_error=lambda e: named_sse(
                "error", anthropic_error_body(e.status, e.message)))
        final, (parsed,) = await self.serving.collect_chat(run, raw)
        c = final.outputs[0]
        reason, sequence = stop_reason(c, bool(parsed.calls))
        return JSONResponse({**self._message(run), "content": self._blocks(parsed), "stop_reason": reason,
                             "stop_sequence": sequence, "usage": self._usage(run, len(c.token_ids))})

    def _message(self, run: ChatRun) -> dict[str, Any]:
        return {"id": run.request_id, "type": "message", "role": "assistant", "model": self.serving.model_name}

    @staticmethod
    def _usage(run: ChatRun, output_tokens: int) -> dict[str, Any]:
        return {"input_tokens": run.prompt_tokens, "output_tokens": output_tokens}

    @staticmethod
    def _blocks(parsed: ChoiceDelta) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if parsed.reasoning:
            blocks.append({"type": "thinking", "thinking": parsed.reasoning, "signature": ""})
        if parsed.content:
            blocks.append({"type": "text", "text": parsed.content})
        for call in parsed.tool_calls:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)})
        return blocks

    async def _events(self, run: ChatRun) -> AsyncIterator[str]:
        """message_start, then per block content_block_start / _delta... / _stop, message_delta, message_stop."""
        yield named_sse("message_start", {"type": "message_start", "message": {
            **self._message(run), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": self._usage(run, 0)}})
        index, current = -1, None  # the open block: its index, and ("thinking" | "text" | call index)

        def block(key: Any, start: dict[str, Any]) -> list[str]:
            nonlocal index, current
            out = [] if current is None else [named_sse("content_block_stop", {"type": "content_block_stop",
                                                                                "index": index})]
            index, current = index + 1, key
            return out + [named_sse("content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": start})]

        def delta(body: dict[str, Any]) -> str:
            return named_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": body})

        steps = self.serving.chat_steps(run)
        try:
            async for step in steps:
                d = step.delta
                if d.reasoning:
                    if current != "thinking":
                        for e in block("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                            yield e
                    yield delta({"type": "thinking_delta", "thinking": d.reasoning})
                if d.content:
                    if current != "text":
                        for e in block("text", {"type": "text", "text": ""}):
                            yield e
                    yield delta({"type": "text_delta", "text": d.content})
                for call in coalesce(d.calls):
                    if call.name is not None:
                        for e in block(call.index, {"type": "tool_use", "id": call.id, "name": call.name,
                                                    "input": {}}):
                            yield e
                    if call.arguments:
                        yield delta({"type": "input_json_delta", "partial_json": call.arguments})
                c = step.choice
                if c.finished:
                    if current is not None:
                        yield named_sse("content_block_stop", {"type": "content_block_stop", "index": index})
                    reason, sequence = stop_reason(c, step.parser.num_calls > 0)
                    yield named_sse("message_delta", {"type": "message_delta",
                                                      "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                                      "usage": {"output_tokens": len(c.token_ids)}})
                    yield named_sse("message_stop", {"type": "message_stop"})
        finally:
            await steps.aclose()  # type: ignore[attr-defined]
