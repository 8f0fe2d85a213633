"""Reasoning parsers (``pagoda serve --reasoning-parser NAME``): split a model's thinking out of its
answer into ``reasoning_content``, in whole responses and in streamed deltas alike.

Both built-in styles wrap the thinking in ``<think>...</think>``; they differ on output that does
not open with ``<think>``:

- ``deepseek_r1``: the chat template already opened the block, so everything up to ``</think>`` is
  reasoning (all of it, while ``</think>`` has not come);
- ``qwen3``: thinking can be switched off, so only output that opens with ``<think>`` has any.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.errors import ConfigError
from pagoda.server.markers import partial_marker


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    name = ""
    start = "<think>"
    end = "</think>"
    opens_in_reasoning = False  # output that does not start with `start` is reasoning anyway

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def extract(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole output."""
        stream = self.stream()
        first, last = stream.feed(text), stream.finish()
        return (first.reasoning + last.reasoning) or None, first.content + last.content


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    opens_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class ReasoningStream:
    """States: "open" (is the output starting with <think>?), "reasoning", "after" (whitespace
    between </think> and the answer, dropped), "content"."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.state = "open"
        self.buf = ""

    def feed(self, text: str) -> ReasoningDelta:
        out = ReasoningDelta()
        self.buf += text
        p = self.parser
        while self.buf:
            if self.state == "open":
                head = self.buf.lstrip()
                if head.startswith(p.start):
                    self.buf, self.state = head[len(p.start) :], "reasoning"
                elif p.start.startswith(head):  # still could be "<think>" (or only whitespace so far)
                    return out
                else:
                    self.state = "reasoning" if p.opens_in_reasoning else "content"
            elif self.state == "reasoning":
                j = self.buf.find(p.end)
                if j < 0:
                    keep = partial_marker(self.buf, p.end)
                    out.reasoning += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                out.reasoning += self.buf[:j]
                self.buf, self.state = self.buf[j + len(p.end) :], "after"
            elif self.state == "after":
                self.buf = self.buf.lstrip()
                if self.buf:
                    self.state = "content"
            else:
                out.content += self.buf
                self.buf = ""
        return out

    def finish(self) -> ReasoningDelta:
        out = ReasoningDelta()
        if self.state == "open":
            self.state = "reasoning" if self.parser.opens_in_reasoning else "content"
        if self.state == "reasoning":
            out.reasoning = self.buf
        elif self.state == "content":
            out.content = self.buf
        self.buf = ""
        return out


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(REASONING_PARSERS))}")
    return cls()


__all__ = [
    "REASONING_PARSERS", "DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningDelta", "ReasoningParser",
    "ReasoningStream", "get_reasoning_parser",
]
