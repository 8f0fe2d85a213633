"""A chat choice's text -> reasoning, content and tool calls; whole or delta by delta.

The reasoning parser (if the server has one) splits off the thinking first; what remains goes to
the tool-call parser (if the request has tools). A whole response is parsed by feeding the same
machine its whole text, so streamed deltas always add up to the non-streamed message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagoda.server.reasoning_parsers import ReasoningDelta, ReasoningParser
from pagoda.server.tool_parsers import ToolCall, ToolCallDelta, ToolDelta, ToolParser, merge_calls


@dataclass
class ChoiceDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)  # pieces of tool calls (see ToolCallStream)

    def __add__(self, other: ChoiceDelta) -> ChoiceDelta:
        return ChoiceDelta(self.reasoning + other.reasoning, self.content + other.content, self.calls + other.calls)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The whole calls (of a whole output: a sum of all its deltas)."""
        return merge_calls(self.calls)


class ChoiceParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning = reasoning.stream() if reasoning else None
        self.tools = tools.stream() if tools else None
        self.num_calls = 0

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def feed(self, text: str) -> ChoiceDelta:
        r = self.reasoning.feed(text) if self.reasoning else ReasoningDelta(content=text)
        return self._tools(r, final=False)

    def finish(self) -> ChoiceDelta:
        r = self.reasoning.finish() if self.reasoning else ReasoningDelta()
        return self._tools(r, final=True)

    def _tools(self, r: ReasoningDelta, final: bool) -> ChoiceDelta:
        if self.tools is None:
            return ChoiceDelta(r.reasoning, r.content)
        t = self.tools.feed(r.content) if r.content else ToolDelta()
        if final:
            last = self.tools.finish()
            t = ToolDelta(t.content + last.content, t.calls + last.calls)
        self.num_calls += sum(1 for c in t.calls if c.name is not None)
        return ChoiceDelta(r.reasoning, t.content, t.calls)

    def parse(self, text: str) -> ChoiceDelta:
        """A whole output (use a fresh parser)."""
        return self.feed(text) + self.finish()


def chat_message(parsed: ChoiceDelta, with_reasoning: bool) -> dict[str, Any]:
    """The non-streamed assistant message: content None when the reply is only tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if parsed.calls else "")}
    if with_reasoning:
        message["reasoning_content"] = parsed.reasoning or None
    if parsed.calls:
        message["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
    return message


def finish_reason(reason: str | None, made_calls: bool, forced_named: bool = False) -> str | None:
    """OpenAI's "tool_calls" for a reply that ended by itself after calling tools; a call forced
    by naming the function ends with "stop", as OpenAI's do."""
    return "tool_calls" if made_calls and reason == "stop" and not forced_named else reason
