"""What the engine hands back: vLLM's shapes (RequestOutput with CompletionOutputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """A chosen token's logprob and the top alternatives at that position (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # new since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    embedding: Any = None  # an embedding request's pooled final hidden state (a float32 torch vector)

    def absorb(self, earlier: "RequestOutput") -> "RequestOutput":
        """This output carrying `earlier`'s deltas as well: one output for the steps a slow reader
        had not taken yet (the cumulative fields are already this output's)."""
        before = {c.index: c for c in earlier.outputs}
        for c in self.outputs:
            e = before.get(c.index)
            if e is not None:
                c.delta_text = e.delta_text + c.delta_text
                c.delta_token_ids = e.delta_token_ids + c.delta_token_ids
                c.delta_logprobs = e.delta_logprobs + c.delta_logprobs
        return self
