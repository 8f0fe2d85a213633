"""Turns prompts and sampling params into requests: tokenize, validate, compile grammars.

The input half of the engine, beside OutputProcessor's output half. It owns the tokenizer
(with any --chat-template override), the eos ids and the structured-output backend, and
knows the engine only through plain facts (InputLimits), so a frontend may call it on its
own thread and report errors before anything is queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pagoda.config import EngineConfig
from pagoda.engine.request import Request
from pagoda.engine.sampler import make_generator
from pagoda.engine.sampling_params import SamplingParams
from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.tokenizer import IncrementalDetokenizer, load_tokenizer

if TYPE_CHECKING:
    from pagoda.structured.backend import StructuredBackend
    from pagoda.tokenizer.tokenizer import Tokenizer


def load_model_tokenizer(
    config: EngineConfig, model_path: Path | None, read_gguf: tuple[Path, dict[str, Any]] | None = None
) -> "Tokenizer | None":
    """The model's tokenizer (or --tokenizer's), with --chat-template applied; None for dummy
    weights from a bare config (token-id prompts only)."""
    source = config.tokenizer or model_path
    if source is None:
        return None
    tok = load_tokenizer(source, read_gguf)
    if config.chat_template:
        try:
            with open(config.chat_template) as f:
                tok.chat_template = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read chat template {config.chat_template!r}: {e.strerror}") from None
    return tok


def check_token_ids(tokens: list[int], vocab_size: int, param: str) -> None:
    """Every id must be in the vocabulary (prompts, /tokenize and /detokenize alike)."""
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}): {bad} is outside the vocabulary", param)


POOLING = ("last", "mean")  # how an embedding request reduces its final hidden states


@dataclass(frozen=True)
class InputLimits:
    """What a request is checked against: the engine's facts, not the engine."""

    context_length: int
    vocab_size: int
    kv_tokens: int  # the KV cache's capacity
    kv_pages: int
    pages_needed: Callable[[int], int]  # pages a sequence of so many tokens holds
    device: torch.device  # where requests' sampling generators live


class InputProcessor:
    def __init__(self, tokenizer: "Tokenizer | None", model_eos_ids: list[int], limits: InputLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        ids = set(model_eos_ids)
        if tokenizer is not None:
            ids |= set(tokenizer.stop_token_ids)
        self.eos_ids = frozenset(ids)
        self._structured: StructuredBackend | None = None
        self._structured_lock = threading.Lock()

    @property
    def structured(self) -> "StructuredBackend":
        """The grammar backend, built on the first constrained request (xgrammar reads the vocabulary)."""
        if self._structured is None:
            with self._structured_lock:
                if self._structured is None:
                    from pagoda.structured.backend import StructuredBackend

                    self._structured = StructuredBackend(self.tokenizer, self.limits.vocab_size, self.eos_ids)
        return self._structured

    def make_requests(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0,
        pooling: str | None = None,
    ) -> list[Request]:
        """Tokenize and validate into the n sequences of one request (no engine state touched).
        `pooling` makes it an embedding request: one prefill, nothing sampled."""
        if pooling is not None:
            if pooling not in POOLING:
                raise InvalidRequestError(f"pooling must be one of {', '.join(POOLING)} (got {pooling!r})", "pooling")
            params = SamplingParams(max_tokens=1)
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        max_tokens = self._check_lengths(prompt_ids, params)
        vocab = self.limits.vocab_size
        params.validate_token_ids(vocab)
        check_token_ids(prompt_ids, vocab, "prompt")
        grammar = None
        if params.structured is not None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured output needs a tokenizer; this model has none",
                                          params.structured.kind)
            grammar = self.structured.compile(params.structured)
        group: list[Request] = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            req = Request(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_ids=prompt_ids,
                params=params,
                max_tokens=max_tokens,
                eos_ids=self.eos_ids,
                priority=priority,
                index=i,
                group_id=request_id,
                leader=group[0] if group else None,
                generator=make_generator(seed, self.limits.device),
                grammar=None if grammar is None else self.structured.new_state(grammar),
                pooling=pooling,
            )
            if self.tokenizer is not None and pooling is None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            group.append(req)
        return group

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids", "prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    def _check_lengths(self, prompt_ids: list[int], params: SamplingParams) -> int:
        ctx, kv_tokens = self.limits.context_length, self.limits.kv_tokens
        if len(prompt_ids) >= ctx:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {ctx}; "
                "leave room for at least one generated token",
                "prompt",
            )
        room = min(ctx, kv_tokens) - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(prompt_ids) + max_tokens > ctx:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context length "
                f"({ctx})",
                "max_tokens",
            )
        if self.limits.pages_needed(len(prompt_ids) + max_tokens) > self.limits.kv_pages:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) can never fit in the KV cache "
                f"({kv_tokens} tokens); raise --kv-cache-memory",
                "max_tokens",
            )
        return max_tokens
