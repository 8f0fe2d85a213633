"""Finding markers (``<tool_call>``, ``</think>``) in text that arrives a few characters at a time."""

from __future__ import annotations


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``: text a stream
    must hold back, since the next delta may complete the marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
