"""Tool-call and reasoning parsers on crafted outputs: whole, and streamed in every chunking (the
streamed deltas must add up to exactly the whole parse); the Hermes grammar for forced calls; the
prompt rendering for chat templates without a tools section."""

from __future__ import annotations

import json
import random

import pytest
import xgrammar as xgr

from pagoda.errors import ConfigError
from pagoda.server.chat_output import ChoiceDelta, ChoiceParser, chat_message, finish_reason
from pagoda.server.reasoning_parsers import get_reasoning_parser
from pagoda.server.tool_parsers import TOOL_PARSERS, get_tool_parser, merge_calls

HERMES = get_tool_parser("hermes")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"},
                                                                          "unit": {"enum": ["c", "f"]}},
                                                           "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CASES = [
    # (output, content, [(name, arguments)])
    ("Just text, no tools.", "Just text, no tools.", []),
    ("  spaced out  \n", "  spaced out  \n", []),
    (CALL, None, [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"), "Let me check.",
     [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_weather", '{"city": "Oslo", "unit": "c"}')]),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', None,
     [("add", '{"a": 1, "b": 2}')]),
    ('<tool_call>{"name": "add", "parameters": {"a": 1}}</tool_call> done', "done", [("add", '{"a": 1}')]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', None, [("add", '{"a": 1}')]),  # unterminated at the end
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    # a call cut off (max_tokens) after its head: a call with the arguments written so far, as OpenAI's
    ('<tool_call>{"name": "add", "arguments": {"a": 1', None, [("add", '{"a": 1')]),
    ('<tool_call>{"name": "ad', '<tool_call>{"name": "ad', []),  # no head yet: text
    ('<tool_call>\n{"name": "f", "arguments": {"s": "x\ty \\"} {"}} </tool_call>', None,
     [("f", '{"s": "x\\ty \\"} {"}')]),  # a raw tab re-escaped; braces in strings are text
    ('<tool_call>{"name": "f", "arguments": "{\\"s\\": \\"\\u00e9\\ud83d\\ude00\\"}"}</tool_call>', None,
     [("f", '{"s": "é😀"}')]),  # arguments as a JSON string: decoded
    ('<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>', None, [("add", '{"a": 1}')]),  # parsed whole
    ("a < b and <tool_ but no call", "a < b and <tool_ but no call", []),
    ("héllo 😀 <tool_call>[1]</tool_call>", "héllo 😀 <tool_call>[1]</tool_call>", []),
]


def chunkings(text: str, seed: int) -> list[list[str]]:
    """The whole text, one character at a time, and random splits."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 8)))) if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_hermes_whole_and_streamed(case: int) -> None:
    text, content, calls = CASES[case]
    got_content, got_calls = HERMES.extract(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls) and len({c.id for c in got_calls}) == len(got_calls)
    for pieces in chunkings(text, case):
        stream = HERMES.stream()
        deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
        streamed = "".join(d.content for d in deltas)
        assert (streamed or None if calls else streamed) == content
        assert [(c.name, c.arguments) for c in merge_calls([c for d in deltas for c in d.calls])] == calls
        if calls:  # nothing of a call's markup ever leaks into the content
            assert all("<tool_call" not in d.content and "</tool" not in d.content for d in deltas)


def test_arguments_stream_in_pieces() -> None:
    """Fed a character at a time, a call's first delta has its id and name, the arguments follow
    piece by piece, and nothing of the markup or the closing brace of the call leaks into them."""
    stream = HERMES.stream()
    deltas = [d for ch in CALL + "\n" + CALL for d in stream.feed(ch).calls] + stream.finish().calls
    heads = [d for d in deltas if d.name is not None]
    assert [(d.index, d.name) for d in heads] == [(0, "get_weather"), (1, "get_weather")]
    assert all(d.id.startswith("call_") for d in heads) and heads[0].id != heads[1].id
    pieces = [d.arguments for d in deltas if d.index == 0]
    assert len(pieces) == len('{"city": "Paris", "unit": "c"}') and "".join(pieces) == '{"city": "Paris", "unit": "c"}'


def test_registry() -> None:
    assert {"hermes", "qwen"} <= set(TOOL_PARSERS)
    with pytest.raises(ConfigError, match="unknown tool-call parser 'nope'"):
        get_tool_parser("nope")
    with pytest.raises(ConfigError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


def test_hermes_prompt_for_templates_without_tools() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    out = HERMES.render_without_template_support(messages, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and json.dumps(WEATHER) in out[0]["content"]
    assert out[2]["content"] == CALL and "tool_calls" not in out[2]
    assert out[3]["content"] == "<tool_response>\n18\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    assert messages[2]["tool_calls"]  # the caller's messages are not modified
    # no system message: the tool prompt becomes one; no tools: no prompt
    assert HERMES.render_without_template_support(messages[1:2], [WEATHER])[0]["role"] == "system"
    assert HERMES.render_without_template_support(messages[1:2], []) == messages[1:2]


@pytest.fixture(scope="module")
def compiler(tmp_path_factory) -> xgr.GrammarCompiler:
    from pagoda.structured.grammar import tokenizer_info
    from pagoda.tokenizer import load_tokenizer
    from tests.tiny_tokenizer import VOCAB_SIZE, write_tiny_tokenizer

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    return xgr.GrammarCompiler(tokenizer_info(tok, VOCAB_SIZE, [511]))


def accepts(compiler: xgr.GrammarCompiler, tag: dict, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(json.dumps(tag)))
    return matcher.accept_string(text) and matcher.is_completed()


def test_hermes_forced_call_grammar(compiler: xgr.GrammarCompiler) -> None:
    named = HERMES.structural_tag([WEATHER, ADD], "get_weather", parallel=True)
    assert accepts(compiler, named, CALL)
    assert not accepts(compiler, named, CALL.replace('"c"', '"kelvin"'))  # enum violated
    assert not accepts(compiler, named, CALL.replace('"get_weather"', '"add"'))  # another function
    assert not accepts(compiler, named, "Sure! " + CALL)  # no text around a forced call
    add = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    required = HERMES.structural_tag([WEATHER, ADD], None, parallel=True)
    assert accepts(compiler, required, CALL) and accepts(compiler, required, add)
    assert accepts(compiler, required, CALL + "\n" + add)
    assert not accepts(compiler, required, "")  # at least one call
    assert not accepts(compiler, required, add.replace("2}", '"2"}'))  # b must be an integer
    single = HERMES.structural_tag([WEATHER, ADD], None, parallel=False)
    assert accepts(compiler, single, add) and not accepts(compiler, single, CALL + "\n" + add)
    # whatever the grammar accepts, the parser parses
    assert [c.name for c in HERMES.extract(CALL + "\n" + add)[1]] == ["get_weather", "add"]


# ---- reasoning -----------------------------------------------------------------------------------

REASONING_CASES = [
    # (parser, output, reasoning, content)
    ("deepseek_r1", "<think>Hmm, 2+2.</think>\n\nIt is 4.", "Hmm, 2+2.", "It is 4."),
    ("deepseek_r1", "Hmm, the template opened it.</think>It is 4.", "Hmm, the template opened it.", "It is 4."),
    ("deepseek_r1", "Still thinking when cut off", "Still thinking when cut off", ""),
    ("qwen3", "<think>\nplan\n</think>\n\nAnswer.", "\nplan\n", "Answer."),
    ("qwen3", "No thinking at all.", None, "No thinking at all."),
    ("qwen3", "  <thin", None, "  <thin"),
    ("qwen3", "<think>a < b </thin", "a < b </thin", ""),
    ("qwen3", "<think></think>Direct.", None, "Direct."),
]


@pytest.mark.parametrize("case", range(len(REASONING_CASES)))
def test_reasoning_whole_and_streamed(case: int) -> None:
    name, text, reasoning, content = REASONING_CASES[case]
    parser = get_reasoning_parser(name)
    assert parser.extract(text) == (reasoning, content)
    for pieces in chunkings(text, case):
        stream = parser.stream()
        deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
        streamed = ("".join(d.reasoning for d in deltas) or None, "".join(d.content for d in deltas))
        assert streamed == (reasoning, content)
        assert all("think>" not in d.content for d in deltas)


def test_reasoning_then_tool_call_in_one_choice() -> None:
    text = "<think>The user wants weather.</think>\n" + CALL
    whole = ChoiceParser(get_reasoning_parser("qwen3"), HERMES).parse(text)
    assert whole.reasoning == "The user wants weather." and whole.content == "" and len(whole.calls) == 1
    message = chat_message(whole, with_reasoning=True)
    assert message["content"] is None and message["reasoning_content"] == "The user wants weather."
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": '{"city": "Paris", "unit": "c"}'}
    assert finish_reason("stop", True) == "tool_calls" and finish_reason("length", True) == "length"
    parser = ChoiceParser(get_reasoning_parser("qwen3"), HERMES)
    total = ChoiceDelta()
    for ch in text:
        total += parser.feed(ch)
    total += parser.finish()
    assert (total.reasoning, total.content, [c.arguments for c in total.tool_calls]) == \
        (whole.reasoning, whole.content, [c.arguments for c in whole.tool_calls])
    # neither parser: the text passes through untouched
    assert ChoiceParser(None, None).parse(text).content == text
