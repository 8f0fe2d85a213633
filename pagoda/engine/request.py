"""Request: one sequence's state from arrival to finish (shared noun of scheduler and engine)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.cache.radix_tree import RadixNode
    from pagoda.structured.grammar import GrammarState
    from pagoda.tokenizer.detokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what the context length leaves
    eos_ids: frozenset[int] = frozenset()
    priority: int = 0  # lower runs first, as in vLLM
    index: int = 0  # which of the n choices of its group
    group_id: str = ""
    leader: "Request | None" = None  # n > 1: siblings wait for the leader's prompt to be cached
    lora_name: str | None = None  # the LoRA adapter it runs with (None: the base model)
    lora_uid: int = 0  # that adapter's never-reused id: salts its prefix-cache keys (0: base)
    lora_slot: int = -1  # its adapter's pool slot while running (-1: none)
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # KV-cache state, owned by the scheduler.
    pages: list[int] = field(default_factory=list)
    num_shared_pages: int = 0  # leading pages borrowed from the radix tree (no own reference)
    prefix_handle: "RadixNode | None" = None
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache (first admission)
    prompt_cached_in_tree: bool = False
    num_preemptions: int = 0
    # Speculative decoding: this step's proposed continuation (set by the engine, consumed by
    # the scheduler) and the proposer's own per-sequence state (an n-gram index, a draft KV).
    draft: list[int] = field(default_factory=list)
    spec_state: object = None
    # Output state, owned by the engine.
    generator: torch.Generator | None = None
    detokenizer: "IncrementalDetokenizer | None" = None
    grammar: "GrammarState | None" = None  # structured output: the sequence's matcher
    # Embedding requests: prefill only, then the final hidden state pooled ("last" token or "mean").
    pooling: str | None = None
    pooled: torch.Tensor | None = None  # the running sum (mean), then the pooled vector
    text: str = ""
    pending_text: str = ""  # decoded but held back: it may be the start of a stop string
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    sent_tokens: int = 0  # how much of output_ids / text earlier outputs already carried
    sent_text: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def own_pages(self) -> list[int]:
        return self.pages[self.num_shared_pages :]
