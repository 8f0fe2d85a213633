"""Tool-call parsers, pluggable per model family (``pagoda serve --tool-call-parser NAME``).

Add a format by subclassing ToolParser and registering it with ``@register_tool_parser("name")``.
"""

from __future__ import annotations

from pagoda.server.tool_parsers.base import (
    TOOL_PARSERS,
    ToolCall,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    arguments_object,
    get_tool_parser,
    register_tool_parser,
)
from pagoda.server.tool_parsers.hermes import HermesToolParser

__all__ = [
    "TOOL_PARSERS", "HermesToolParser", "ToolCall", "ToolCallStream", "ToolDelta", "ToolParser", "arguments_object",
    "get_tool_parser", "register_tool_parser",
]
