"""Per-request sampling parameters: vLLM's field names and defaults, validated up front so a
bad request fails with a 400 naming the field instead of crashing a batch mid-step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from pagoda.errors import InvalidRequestError
from pagoda.structured.params import StructuredOutputs

MAX_LOGPROBS = 20
"""OpenAI's cap on top logprobs; also bounds the per-step top-k the sampler computes."""

MAX_TEMPERATURE = 100.0
"""Beyond this the distribution is uniform to float precision; larger values are mistakes."""

GREEDY_EPS = 1e-5
"""Temperatures below this are treated as greedy (as vLLM does): dividing by them overflows."""

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. See vLLM's SamplingParams for semantics.

    top_k 0 or -1 means off; max_tokens None means up to the context length; logprobs is
    the number of top alternatives to return per token (0 = only the sampled token's).
    `stop` may be given as one string; `logit_bias` keys may be given as strings of digits
    (the OpenAI JSON form). Both are normalised in __post_init__, which also validates.
    `structured` constrains the output to a JSON schema, regex, grammar or choice (a dict of
    StructuredOutputs' fields is accepted too); whether it compiles is checked when the request
    is added to an engine.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~0, or only one candidate)."""
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty differs from neutral (lets the sampler skip the penalty step)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def _normalise(self) -> None:
        """Accept the loose forms clients send; validate() then checks the strict ones."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.structured, dict):
            self.structured = StructuredOutputs(**self.structured)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_digit_key(k): float(v) if _is_int(v) else v for k, v in self.logit_bias.items()}
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, float(value))

    def validate(self) -> None:
        """Raise InvalidRequestError (with `param` set to the field) for the first bad field."""
        _check_int("n", self.n, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        self._validate_logit_bias()
        if self.seed is not None:
            _check_int("seed", self.seed, low=_SEED_RANGE[0], high=_SEED_RANGE[1])
        self._validate_stop()
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens (got min_tokens={self.min_tokens}, max_tokens={self.max_tokens})",
                "min_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=0, high=MAX_LOGPROBS)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean (got {getattr(self, name)!r})", name)
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutputs):
                raise InvalidRequestError(
                    f"structured must be a StructuredOutputs (got {type(self.structured).__name__})", "structured"
                )
            self.structured.validate()

    def validate_token_ids(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (known only once a model is loaded)."""
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise InvalidRequestError(f"stop_token_ids must be < vocab size {vocab_size} (got {tok})", "stop_token_ids")
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise InvalidRequestError(f"logit_bias token ids must be < vocab size {vocab_size} (got {tok})", "logit_bias")

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError(f"logit_bias must be a mapping of token id to bias (got {self.logit_bias!r})", "logit_bias")
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok) or tok < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids >= 0 (got {tok!r})", "logit_bias")
            if not isinstance(bias, numbers.Real) or isinstance(bias, bool) or not (-100.0 <= bias <= 100.0):
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100] (got {bias!r} for token {tok})", "logit_bias")

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError(f"stop must be a string or a list of strings (got {self.stop!r})", "stop")
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop must not contain an empty string", "stop")
        if not isinstance(self.stop_token_ids, list):
            raise InvalidRequestError(f"stop_token_ids must be a list of token ids (got {self.stop_token_ids!r})", "stop_token_ids")
        for tok in self.stop_token_ids:
            if not _is_int(tok) or tok < 0:
                raise InvalidRequestError(f"stop_token_ids must be token ids >= 0 (got {tok!r})", "stop_token_ids")


def _is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never to a request)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _digit_key(key: Any) -> Any:
    """'50256' -> 50256 (JSON object keys are strings); anything else is left for validate()."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return key


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if not _is_int(value):
        raise InvalidRequestError(f"{name} must be an integer (got {value!r})", name)
    if low is not None and value < low:
        raise InvalidRequestError(f"{name} must be >= {low} (got {value})", name)
    if high is not None and value > high:
        raise InvalidRequestError(f"{name} must be <= {high} (got {value})", name)


def _check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    if not (_is_int(value) or isinstance(value, numbers.Real)) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number (got {value!r})", name)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite (got {value})", name)
    if low is not None and (value <= low if low_open else value < low):
        raise InvalidRequestError(f"{name} must be {'>' if low_open else '>='} {_fmt(low)} (got {_fmt(value)})", name)
    if high is not None and value > high:
        raise InvalidRequestError(f"{name} must be <= {_fmt(high)} (got {_fmt(value)})", name)


def _fmt(x: float) -> str:
    """-1.0 -> '-1', 0.5 -> '0.5': messages read like the request the user wrote."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))
