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

from pagoda.server.tool_parsers.base import CallProgress, ToolCall, ToolParser, arguments_object, register_tool_parser

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

    def call_progress(self, body: str) -> CallProgress | None:
        head = HEAD.match(body)
        if head is None:
            return None
        scan = scan_string if body[head.end()] == '"' else scan_object
        arguments, complete = scan(body, head.end())
        return CallProgress(head.group(1), arguments, complete)

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


def scan_object(text: str, i: int) -> tuple[str, bool]:
    """The JSON value opening at text[i] as written, up to where it closes (True) or the text ends."""
    out: list[str] = []
    depth, in_string, escaped = 0, False, False
    for ch in text[i:]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            elif ch < " ":  # strict JSON parsers refuse raw control characters
                ch = json.dumps(ch)[1:-1]
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        out.append(ch)
        if depth == 0 and not in_string:
            return "".join(out), True
    return "".join(out), False


def scan_string(text: str, i: int) -> tuple[str, bool]:
    """The decoded contents of the JSON string opening at text[i]: up to its closing quote (True), or
    to the end of the text less an escape not yet complete."""
    out: list[str] = []
    j, n = i + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == '"':
            return "".join(out), True
        if ch != "\\":
            out.append(ch)
            j += 1
            continue
        if j + 1 >= n:
            break
        kind = text[j + 1]
        if kind != "u":
            out.append(ESCAPES.get(kind, kind))
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
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                j += 12
                continue
            code = 0xFFFD
        out.append(chr(code) if not 0xD800 <= code < 0xE000 else "\ufffd")
        j += 6
    return "".join(out), False


def _hex4(text: str, i: int) -> int | None:
    digits = text[i : i + 4]
    if len(digits) < 4:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return 0xFFFD
