"""Chat templates render like transformers' apply_chat_template, and fail as one-line ConfigErrors."""

from __future__ import annotations

from typing import Any

import pytest

from pagoda.errors import ConfigError
from pagoda.tokenizer.chat_template import compile_chat_template, render_chat_template

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Grüße, 你好 🎉"},
    {"role": "assistant", "content": "Hi!", "reasoning_content": "say hi"},
    {"role": "user", "content": "Weather in Paris?"},
]
WEATHER = {"name": "get_weather", "description": "Météo",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]

# Exercises trim_blocks/lstrip_blocks, loop controls, tojson (non-ASCII, indent), tools, extra kwargs,
# reasoning aliases, {% generation %} and the special token variables.
TEMPLATE = """{{ bos_token }}
{% if tools %}
    Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    <{{ message['role'] }}>{{ message['content'] | tojson }}
    {% if message.thinking is defined %}[think:{{ message.thinking }}]{% endif %}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% endif %}
    {% if loop.index > 10 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}nothink{% endif %}
{% endif %}"""


def render(template: str = TEMPLATE, messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any) -> str:
    kwargs.setdefault("bos_token", "<s>")
    kwargs.setdefault("eos_token", "</s>")
    return render_chat_template(template, messages, **kwargs)


def test_render_features() -> None:
    text = render(tools=TOOLS, enable_thinking=False)
    assert text.startswith("<s>\n    Tools: [\n  {\n")  # lstrip_blocks strips before {% %}, not {{ }}
    assert '"description": "Météo"' in text  # tojson keeps non-ASCII
    assert '<user>"Grüße, 你好 🎉"' in text and "Be brief" not in text
    assert "[think:say hi]" in text and "Hi!</s>" in text
    assert text.endswith("</s>    <user>\"Weather in Paris?\"\n<assistant>nothink")
    assert not render(add_generation_prompt=False).endswith("<assistant>")


def test_none_values_are_dropped() -> None:
    template = "{% for m in messages %}{{ m.content if m.content is defined else 'none' }};{% endfor %}"
    assert render(template, [{"role": "assistant", "content": None, "tool_calls": []}]) == "none;"


def test_matches_transformers_rendering() -> None:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    for generation_prompt in (True, False):
        for tools in (None, TOOLS):
            ours = render(add_generation_prompt=generation_prompt, tools=tools, enable_thinking=True)
            theirs, _ = utils.render_jinja_template(
                conversations=[MESSAGES], tools=tools, chat_template=TEMPLATE,
                add_generation_prompt=generation_prompt, bos_token="<s>", eos_token="</s>", enable_thinking=True,
            )
            assert ours == theirs[0]


def test_strftime_now() -> None:
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10


def test_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="chat template error: Conversation roles must alternate"):
        render("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ConfigError, match="invalid chat template"):
        render("{% for m in messages %}")
    with pytest.raises(ConfigError, match="chat template error"):
        render("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ConfigError, match="chat template error"):  # the sandbox forbids mutation
        render("{{ messages.append(1) }}")
    with pytest.raises(ConfigError, match="no chat template; use a completions prompt or pass --chat-template"):
        render_chat_template(None, MESSAGES)


def test_templates_are_compiled_once() -> None:
    assert compile_chat_template(TEMPLATE) is compile_chat_template(TEMPLATE)
