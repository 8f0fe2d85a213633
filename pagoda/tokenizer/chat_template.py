"""Render chat templates exactly as transformers' apply_chat_template does.

Templates come from model files (untrusted), so they run in jinja's immutable sandbox, with the same
whitespace rules, filters and globals transformers gives them; a template written for transformers
renders byte for byte the same here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagoda.errors import ConfigError

NO_TEMPLATE_MESSAGE = "this model has no chat template; use a completions prompt or pass --chat-template"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; serving only
    needs the text, so the block renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text; compiling costs far more than rendering."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"invalid chat template: {exc}") from exc


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What transformers does before rendering: drop keys whose value is None (OpenAI clients send
    `content: null` beside tool calls, which templates would print as "None"), and expose a message's
    reasoning under both names templates read, `reasoning_content` and `thinking`."""
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise ConfigError(f"chat messages must be objects, got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` into the prompt text; any template failure is a ConfigError carrying jinja's message."""
    if not template:
        raise ConfigError(NO_TEMPLATE_MESSAGE)
    compiled = compile_chat_template(template)
    variables = {"bos_token": bos_token, "eos_token": eos_token, "documents": None, **template_kwargs}
    try:
        return compiled.render(
            messages=normalize_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise ConfigError(f"chat template error: {exc.message or exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # e.g. `'text' + 1` or a message missing a key the template indexes
        raise ConfigError(f"chat template error: {type(exc).__name__}: {exc}") from exc
