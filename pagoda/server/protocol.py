"""OpenAI-shaped request schemas (plus the vLLM/SGLang extras clients send).

Parsed in pydantic's strict JSON mode so ``"max_tokens": "5"`` is a 400 rather than a guess;
range checks are left to SamplingParams, which names the offending field. Unknown fields are
ignored (as vLLM does): evaluation harnesses send many we have no use for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_N = 128  # choices per request (n, best_of): more is a mistake or an attack on the KV cache


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields both endpoints share; None means "SamplingParams' default"."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    request_id: str | None = None

    @model_validator(mode="after")
    def _shared_checks(self) -> _SamplingFields:
        if self.n > MAX_N:
            raise ValueError(f"n must be <= {MAX_N} (got {self.n})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_calls, tool_call_id, ...) pass through to the template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: Any = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"unsupported role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        return role

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: Any) -> str | None:
        """A string, or a list of text parts joined by newlines (as vLLM does); images etc. are refused."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("content must be a string or a list of content parts")
        texts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError('each content part must be an object with a "type"')
            if part["type"] != "text":
                raise ValueError(f"content part type {part['type']!r} is not supported; only 'text' is")
            if not isinstance(part.get("text"), str):
                raise ValueError('a text content part needs a string "text"')
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and getattr(self, "tool_calls", None)):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template reads; developer is the newer name for system."""
        data = self.model_dump(exclude_none=True)
        if data["role"] == "developer":
            data["role"] = "system"
        return data


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(f"response_format type {self.response_format.type!r} is not supported; only 'text' is")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = str | list[int]


class CompletionRequest(_SamplingFields):
    prompt: Any
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    max_tokens: int | None = 16

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> list[Prompt]:
        """Normalise the four OpenAI forms into a batch: str, [str], [int], [[int]]."""
        bad = "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(bad if not isinstance(prompt, list) else "prompt must not be an empty list")
        if all(_is_token(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
        raise ValueError(bad)

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None:
            if self.best_of > MAX_N:
                raise ValueError(f"best_of must be <= {MAX_N} (got {self.best_of})")
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
            if self.best_of > self.n and self.stream:
                raise ValueError("best_of > n cannot be streamed")
        if self.max_tokens is not None and self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 is allowed only with echo, to score the prompt)")
        return self

    @property
    def prompts(self) -> list[Prompt]:
        return self.prompt


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" or "messages"')
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# Where a ValueError from a validator belongs, for OpenAI's `param`.
VALIDATOR_PARAMS: dict[str, str] = {
    "top_logprobs requires": "top_logprobs",
    "response_format": "response_format",
    "suffix": "suffix",
    "best_of": "best_of",
    "max_tokens must be": "max_tokens",
    "stream_options": "stream_options",
    "n must be": "n",
    'give exactly one of "prompt"': "prompt",
}

FinishReason = Literal["stop", "length", "abort"]
