"""Hermes / Qwen2.5 / Qwen3 tool calls: each call is a JSON object between markers,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and results come back in the user turn as ``<tool_response>...</tool_response>``. The system
prompt is the one Qwen2.5's chat template writes.

Arguments stream once ``{"name": "...", "arguments": `` and the value's first character are
written: an object as the model writes it (raw control characters in its strings escaped), or a
JSON string (some models double-encode) decoded as it arrives.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pagoda.server.tool_parsers.base import (
    CallProgress,
    CallScanner,
    ToolCall,
    ToolParser,
    arguments_object,
    register_tool_parser,
)

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

CALL_PREFIX = '<tool_call>\n{"name": '
ARGUMENTS_PREFIX = ', "arguments": '
CALL_END = "}\n</tool_call>"
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=[{"])')
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@register_tool_parser("hermes", "qwen")
class HermesToolParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_call(self, body: str) -> list[ToolCall] | None:
        try:  # lenient: raw control characters in strings are re-escaped in the arguments we return
            obj = json.loads(body, strict=False)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args, strict=False)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return [ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))]

    def call_scanner(self) -> HermesCallScanner:
        return HermesCallScanner()

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        return SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))

    def format_call(self, name: str, arguments: Any) -> str:
        call = {"name": name, "arguments": arguments_object(arguments)}
        return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"

    def format_results(self, results: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)

    def structural_tag(self, tools: list[dict[str, Any]], forced: str | None, parallel: bool) -> dict[str, Any]:
        def tag(function: dict[str, Any]) -> dict[str, Any]:
            schema = function.get("parameters") or {"type": "object"}
            return {
                "type": "tag",
                "begin": CALL_PREFIX + json.dumps(function["name"]) + ARGUMENTS_PREFIX,
                # at most one whitespace character in a row: small models otherwise pad forever
                "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1},
                "end": CALL_END,
            }

        functions = [t["function"] for t in tools]
        if forced is not None:
            fmt = tag(next(f for f in functions if f["name"] == forced))
        else:
            fmt = {"type": "tags_with_separator", "tags": [tag(f) for f in functions], "separator": "\n",
                   "at_least_one": True, "stop_after_first": not parallel}
        return {"type": "structural_tag", "format": fmt}


class HermesCallScanner(CallScanner):
    """The head ``{"name": "...", "arguments": `` then the arguments value, scanned once: each call
    resumes where the last stopped (a body only grows), so a long call costs linear time."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.is_string = False  # arguments sent as a JSON string (decoded) rather than an object
        self.pos = 0  # where scanning resumes in the body
        self.out: list[str] = []
        self.complete = False
        self.depth, self.in_string, self.escaped = 0, False, False  # the object scan's state

    def progress(self, body: str) -> CallProgress | None:
        if self.name is None:
            head = HEAD.match(body)
            if head is None:
                return None
            self.name, self.pos = head.group(1), head.end()
            self.is_string = body[self.pos] == '"'
            self.pos += self.is_string  # a string's contents start after its quote
        if not self.complete:
            self._scan_string(body) if self.is_string else self._scan_object(body)
        return CallProgress(self.name, "".join(self.out), self.complete)

    def _scan_object(self, text: str) -> None:
        """The JSON value as written, up to where it closes."""
        for ch in text[self.pos :]:
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                elif ch < " ":  # strict JSON parsers refuse raw control characters
                    ch = json.dumps(ch)[1:-1]
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
            self.out.append(ch)
            if self.depth == 0 and not self.in_string:
                self.complete = True
                return

    def _scan_string(self, text: str) -> None:
        """The string's decoded contents, up to its closing quote; an escape not yet complete waits."""
        j, n = self.pos, len(text)
        while j < n:
            ch = text[j]
            if ch == '"':
                self.complete = True
                break
            if ch != "\\":
                self.out.append(ch)
                j += 1
                continue
            if j + 1 >= n:
                break
            kind = text[j + 1]
            if kind != "u":
                self.out.append(ESCAPES.get(kind, kind))
                j += 2
                continue
            code = _hex4(text, j + 2)
            if code is None:
                break
            if 0xD800 <= code < 0xDC00:  # a high surrogate: wait for its low half
                if j + 12 > n:
                    break
                low = _hex4(text, j + 8) if text[j + 6 : j + 8] == "\\u" else None
                if low is not None and 0xDC00 <= low < 0xE000:
                    self.out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    j += 12
                    continue
            self.out.append(chr(code) if not 0xD800 <= code < 0xE000 else "\ufffd")
            j += 6
        self.pos = j


def _hex4(text: str, i: int) -> int | None:
    digits = text[i : i + 4]
    if len(digits) < 4:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return 0xFFFD
