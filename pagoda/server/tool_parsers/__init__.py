"""Tool-call parsers, pluggable per model family (``pagoda serve --tool-call-parser NAME``).

Add a format by subclassing ToolParser and registering it with ``@register_tool_parser("name")``.
"""

from __future__ import annotations

from pagoda.server.tool_parsers.base import (
    TOOL_PARSERS,
    CallProgress,
    CallScanner,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    arguments_object,
    coalesce,
    get_tool_parser,
    merge_calls,
    register_tool_parser,
)
from pagoda.server.tool_parsers.hermes import HermesToolParser

__all__ = [
    "TOOL_PARSERS", "CallProgress", "CallScanner", "HermesToolParser", "ToolCall", "ToolCallDelta", "ToolCallStream", "ToolDelta",
    "ToolParser", "arguments_object", "coalesce", "get_tool_parser", "merge_calls", "register_tool_parser",
]
