"""Hermes / Qwen2.5 / Qwen3 tool calls: each call is a JSON object between markers,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and results come back in the user turn as ``<tool_response>...</tool_response>``. The system
prompt is the one Qwen2.5's chat template writes.
"""

from __future__ import annotations

import json
from typing import Any

from pagoda.server.tool_parsers.base import ToolCall, ToolParser, arguments_object, register_tool_parser

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
