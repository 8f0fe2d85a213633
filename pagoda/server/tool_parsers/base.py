"""Tool-call parsers: one per output format a model family was trained on.

A parser knows its format both ways: how a model writes calls (parsing, streaming or not; the
grammar that forces well-formed calls for tool_choice "required" or a named function), and how a
conversation shows tools, calls and results to a model whose chat template knows nothing of tools.

Formats that wrap each call between a start and an end marker (Hermes' ``<tool_call>...</tool_call>``)
only implement ``parse_call``, ``call_scanner`` and the prompt side; the streaming machine here does
the rest, and the non-streaming parse runs the same machine over the whole text, so both agree exactly.

Arguments stream: once a call's head (its name, the start of its arguments) is written, the call's
first delta carries its id and name, and each later piece of the arguments follows as it is written.
A CallScanner's progress depends only on the call's text so far, and its arguments only ever grow,
so the pieces add up to the same arguments however the output was chunked.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pagoda.errors import ConfigError
from pagoda.server.markers import partial_marker


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A piece of the call at position `index` of its choice: the first one carries id and name."""

    index: int
    arguments: str = ""
    name: str | None = None
    id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``delta.tool_calls`` entry."""
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def merge_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from their deltas, in index order."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        if d.name is not None:
            calls[d.index] = ToolCall(d.name, d.arguments, d.id or new_call_id())
        else:
            calls[d.index].arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


def coalesce(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive pieces of one call as one delta (what a single streamed chunk carries)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.name is None:
            out[-1] = ToolCallDelta(d.index, out[-1].arguments + d.arguments, out[-1].name, out[-1].id)
        else:
            out.append(d)
    return out


@dataclass
class CallProgress:
    """A call's head and the arguments text written so far (`complete` once their value closed)."""

    name: str
    arguments: str
    complete: bool


class CallScanner(ABC):
    """Follows one call's text (after the start marker) as it grows."""

    @abstractmethod
    def progress(self, body: str) -> CallProgress | None:
        """The call whose text so far is `body` (each call passes a longer one), once its name and
        the start of its arguments are written; None before that. Once a head is found the text
        is a call, whatever follows; the arguments must only ever grow."""


@dataclass
class ToolDelta:
    """What a piece of output turned into: plain text, and pieces of calls."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ToolParser(ABC):
    name: ClassVar[str]
    start: ClassVar[str]  # the marker opening a call
    end: ClassVar[str]  # the marker closing it

    @abstractmethod
    def parse_call(self, body: str) -> list[ToolCall] | None:
        """The calls in the text between the markers, or None if it is not a well-formed call
        (then it stays in the content, markers and all)."""

    @abstractmethod
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """The tool description for a system message, for templates without a tools section."""

    @abstractmethod
    def format_call(self, name: str, arguments: Any) -> str:
        """An earlier assistant call as the model writes it (``arguments`` is a dict or JSON text)."""

    @abstractmethod
    def format_results(self, results: list[str]) -> str:
        """Consecutive tool results, as the user turn that shows them to the model."""

    @abstractmethod
    def structural_tag(self, tools: list[dict[str, Any]], forced: str | None, parallel: bool) -> dict[str, Any]:
        """An xgrammar structural tag whose language is well-formed calls only: to the function
        named `forced`, or (None) at least one call to any of `tools` (exactly one unless `parallel`),
        with arguments matching each function's parameters schema."""

    def call_scanner(self) -> CallScanner | None:
        """A scanner for one call's arguments as they are written; None for a format that does not
        stream them (its calls then arrive whole, at the end marker)."""
        return None

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Content (None when empty and there are calls) and calls of a whole output."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        calls = merge_calls(first.calls + last.calls)
        content = first.content + last.content
        return (content or None) if calls else content, calls

    # ---- the prompt side ---------------------------------------------------------------

    def render_without_template_support(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Messages for a chat template with no tools section: the tool prompt joins (or becomes)
        the system message, earlier calls become assistant text, tool results a user turn."""
        out: list[dict[str, Any]] = []
        for message in messages:
            role = message["role"]
            if role == "tool":
                result = message.get("content") or ""
                if out and out[-1].get("_tool_results") is not None:
                    out[-1]["_tool_results"].append(result)
                else:
                    out.append({"role": "user", "_tool_results": [result]})
                continue
            message = dict(message)
            calls = message.pop("tool_calls", None)
            if role == "assistant" and calls:
                text = [message["content"]] if message.get("content") else []
                for call in calls:
                    fn = call.get("function", call) if isinstance(call, dict) else {}
                    text.append(self.format_call(fn.get("name", ""), fn.get("arguments", {})))
                message["content"] = "\n".join(text)
            out.append(message)
        for message in out:
            results = message.pop("_tool_results", None)
            if results is not None:
                message["content"] = self.format_results(results)
        if tools:
            prompt = self.system_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out


class ToolCallStream:
    """One choice's output, fed as it is generated. Content is released as soon as it cannot be
    the start of a call; a call's arguments as they are written (see CallScanner), or the
    whole call at its end marker for a format that does not stream them. Whitespace next to a
    call is not content (so a reply that is only calls has content None)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.buf = ""
        self.in_call = False
        self.open: ToolCallDelta | None = None  # the call being streamed: index, id, name, arguments sent
        self.scanner: CallScanner | None = None  # the current call's
        self.pending_ws = ""  # trailing whitespace of the content: kept only if more content follows
        self.after_call = False  # whitespace right after a call is dropped
        self.num_calls = 0

    def feed(self, text: str) -> ToolDelta:
        out = ToolDelta()
        self.buf += text
        start, end = self.parser.start, self.parser.end
        while True:
            if not self.in_call:
                i = self.buf.find(start)
                if i < 0:
                    keep = partial_marker(self.buf, start)
                    self._content(self.buf[: len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._content(self.buf[:i], out)
                self.buf, self.in_call = self.buf[i + len(start) :], True
                self.scanner = self.parser.call_scanner()
            else:
                j = self.buf.find(end)
                if j < 0:  # stream what is written, less what may be the end marker's start
                    self._progress(self.buf[: len(self.buf) - partial_marker(self.buf, end)], out)
                    return out
                body, self.buf, self.in_call = self.buf[:j], self.buf[j + len(end) :], False
                self._call(body, start + body + end, out)

    def finish(self) -> ToolDelta:
        """The end of the output: an unterminated call still counts if it has a head or parses."""
        out = ToolDelta()
        if self.in_call:
            self._call(self.buf, self.parser.start + self.buf, out)
        else:
            self._content(self.buf, out)
        self.buf = ""
        if not self.num_calls:
            out.content += self.pending_ws
        self.pending_ws = ""
        return out

    def _progress(self, body: str, out: ToolDelta) -> bool:
        """Send what is new of the call being written; False while it has no head."""
        p = self.scanner.progress(body) if self.scanner is not None else None
        if p is None:
            return False
        if self.open is None:
            self.open = ToolCallDelta(self.num_calls, p.arguments, p.name, new_call_id())
            out.calls.append(ToolCallDelta(self.open.index, p.arguments, p.name, self.open.id))
        elif len(p.arguments) > len(self.open.arguments):
            out.calls.append(ToolCallDelta(self.open.index, p.arguments[len(self.open.arguments) :]))
            self.open.arguments = p.arguments
        return True

    def _call(self, body: str, raw: str, out: ToolDelta) -> None:
        if self._progress(body, out):
            calls = 1
        else:
            parsed = self.parser.parse_call(body)
            if parsed is None:
                self._content(raw, out)
                return
            out.calls.extend(ToolCallDelta(self.num_calls + k, c.arguments, c.name, c.id) for k, c in enumerate(parsed))
            calls = len(parsed)
        self.open, self.scanner, self.pending_ws, self.after_call = None, None, "", True
        self.num_calls += calls

    def _content(self, text: str, out: ToolDelta) -> None:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body) :]
        out.content += body


# ---- the registry ------------------------------------------------------------------------

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(*names: str):
    def decorator(cls: type[ToolParser]) -> type[ToolParser]:
        for name in names:
            TOOL_PARSERS[name] = cls
        return cls

    return decorator


def get_tool_parser(name: str) -> ToolParser:
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}")
    return cls()


def arguments_object(arguments: Any) -> Any:
    """Arguments as templates want them: OpenAI sends JSON text, templates print objects."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
