"""OpenAI-shaped request schemas (plus the vLLM/SGLang extras clients send).

Parsed in pydantic's strict JSON mode so ``"max_tokens": "5"`` is a 400 rather than a guess;
range checks are left to SamplingParams, which names the offending field. Unknown fields are
ignored (as vLLM does): evaluation harnesses send many we have no use for.

Structured output comes as OpenAI's ``response_format`` or as vLLM's/SGLang's extras, each under
its vLLM ``guided_*`` name and its plain name; at most one may be given per request.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pagoda.structured import StructuredOutputs

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_N = 128  # choices per request (n, best_of): more is a mistake or an attack on the KV cache
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

# request field -> StructuredOutputs field
STRUCTURED_FIELDS = {
    "guided_json": "json_schema", "json_schema": "json_schema",
    "guided_regex": "regex", "regex": "regex",
    "guided_grammar": "grammar", "ebnf": "grammar",
    "guided_choice": "choice", "choice": "choice",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema``: OpenAI's wrapper around the schema itself."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self


class _SamplingFields(_Strict):
    """Fields both endpoints share; None means "SamplingParams' default"."""

    model: str | None = None  # the served model, or a LoRA adapter's name
    lora_path: str | None = None  # SGLang's way to name the adapter (by its name, as --lora-paths gave it)
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
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    json_schema: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    regex: str | None = None
    guided_grammar: str | None = None
    ebnf: str | None = None
    guided_choice: list[str] | None = None
    choice: list[str] | None = None

    @model_validator(mode="after")
    def _shared_checks(self) -> _SamplingFields:
        if self.n > MAX_N:
            raise ValueError(f"n must be <= {MAX_N} (got {self.n})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        given = self.structured_fields()
        if len(given) > 1:
            raise ValueError(f"structured output: give only one of {', '.join(given)}")
        return self

    def structured_fields(self) -> list[str]:
        """The structured-output fields this request sets (response_format "text" is none)."""
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    def structured_outputs(self) -> tuple[StructuredOutputs | None, str | None]:
        """The StructuredOutputs asked for, and the request field it came from (errors name it).
        Raises InvalidRequestError (param = that StructuredOutputs field) for a malformed value."""
        given = self.structured_fields()
        if not given:
            return None, None
        field = given[0]
        if field == "response_format":
            fmt = self.response_format
            assert fmt is not None
            if fmt.type == "json_object":
                return StructuredOutputs(json_object=True), field
            assert fmt.json_schema is not None
            return StructuredOutputs(json_schema=fmt.json_schema.schema_), field
        return StructuredOutputs(**{STRUCTURED_FIELDS[field]: getattr(self, field)}), field


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


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not FUNCTION_NAME.match(name):
            raise ValueError(f"function names must match ^[A-Za-z0-9_-]{{1,64}}$ (got {name!r})")
        return name


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are given")
        names = [t.function.name for t in self.tools or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not among the tools")
        if len(set(names)) < len(names):
            raise ValueError("tools must have distinct function names")
        if self.forces_tool_call and self.structured_fields():
            raise ValueError("tool_choice 'required' or a named function cannot be combined with structured output "
                             f"({self.structured_fields()[0]})")
        return self

    @property
    def active_tools(self) -> list[dict[str, Any]]:
        """The tools the model is shown: none when there are none or tool_choice is "none"."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools]

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def forced_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

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
    tools: list[Tool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" or "messages"')
        return self


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Strict):
    """vLLM's POST /v1/unload_lora_adapter body (lora_int_id is accepted and ignored)."""

    lora_name: str
    lora_int_id: int | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# Where a ValueError from a validator belongs, for OpenAI's `param`.
VALIDATOR_PARAMS: dict[str, str] = {
    "top_logprobs requires": "top_logprobs",
    "response_format": "response_format",
    "tool_choice": "tool_choice",
    "tools must": "tools",
    "suffix": "suffix",
    "best_of": "best_of",
    "max_tokens must be": "max_tokens",
    "stream_options": "stream_options",
    "n must be": "n",
    'give exactly one of "prompt"': "prompt",
    "store:": "store",
    "previous_response_id:": "previous_response_id",
    "background:": "background",
}

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
