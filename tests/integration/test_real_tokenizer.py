"""The default model's GGUF tokenizer (SmolLM2-135M-Instruct) against transformers loading the same file.

One known difference, on purpose: the GGUF says `tokenizer.ggml.pre = "smollm"`, for which llama.cpp
splits every numeric character off before the GPT-2 regex (as the model's original tokenizer.json does
with a `Digits(individual_digits=True)` step). transformers' GGUF loader has no split for "smollm" and
falls back to plain GPT-2, so where whitespace precedes a digit it cuts differently: "\\n\\n1." is
["\\n\\n", "1", "."] for the model (and pagoda) but ["\\n", "\\n", "1", "."] in transformers, and
"x  1" keeps "  " whole only with the digit split. pagoda follows the file. So text with whitespace
before a digit is compared with transformers after giving it the split the file names; everything
else is compared with transformers exactly as it loads the GGUF.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest

from pagoda.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog's back; it's what they'd've done.",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 텍스트.",
    "Emoji: 🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈 and ZWJ sequences, café naïve Ωμέγα жизнь",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n-1)+fib(n-2)\n",
    "tabs\tand\t\tmultiple     spaces   \n\n\n  trailing   ",
    "line one\nline two\r\nline three\n\n\nend",
    "Digits: 3.14159, 2024-01-01, v1.2.3, 1234567890, x²+y³=z½, Ⅻ",
    "<|im_start|>user\nInline special tokens<|im_end|><|endoftext|>not special: <|im_start",
    "<repo_name>pagoda<file_sep>main.py\n<gh_stars>",
    "Numbers after spaces: 1 22 333 and lists:\n\n1. one\n2. two\n   10. ten",
    "    4 spaces then digit, tab\t5, newline\n6, nbsp\u00a07",
    "",
    " ",
    "\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [
        {"role": "user", "content": "Write a haiku about tokenizers."},
        {"role": "assistant", "content": "Bytes merge into words,\nsplitting text like morning rain."},
        {"role": "user", "content": "Now in 中文, with numbers: 1, 2 and 3."},
    ],
]


def has_whitespace_before_numeric(text: str) -> bool:
    return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(text, text[1:]))


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    from pagoda.weights.default_model import default_model_path

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def hf_pair() -> tuple[Any, Any]:
    """transformers as it loads the GGUF, and the same with the file's "smollm" digit split."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    from pagoda.weights.default_model import default_model_path

    path = default_model_path()
    stock = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    split = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return stock, split


def hf_ids(result: Any) -> list[int]:
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def test_special_ids_match(ours: Tokenizer, hf_pair: tuple[Any, Any]) -> None:
    stock, _ = hf_pair
    assert ours.vocab_size == len(stock) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (stock.bos_token_id, stock.eos_token_id) == (1, 2)
    assert ours.add_bos_token is False
    assert ours.stop_token_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert ours.chat_template == stock.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours: Tokenizer, hf_pair: tuple[Any, Any], text: str) -> None:
    stock, split = hf_pair
    reference = split if has_whitespace_before_numeric(text) else stock
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == stock.decode(ids, skip_special_tokens=skip)


def test_the_digit_split_is_the_only_difference(ours: Tokenizer, hf_pair: tuple[Any, Any]) -> None:
    stock, split = hf_pair
    text = "Steps:\n\n1. a\n  2. b"
    assert ours.convert_ids_to_tokens(ours.encode(text))[2:4] == ["ĊĊ", "1"]  # "\n\n" stays whole
    assert ours.encode(text) == split.encode(text)
    assert stock.convert_ids_to_tokens(stock.encode(text))[2:5] == ["Ċ", "Ċ", "1"]  # transformers' GPT-2 split


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, hf_pair: tuple[Any, Any], conversation: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    stock, split = hf_pair
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == stock.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    if conversation[0]["role"] != "system":
        assert "named SmolLM" in text  # the template's default system prompt
    reference = split if has_whitespace_before_numeric(text) else stock
    expected = hf_ids(reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True))
    assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_streaming_detokenizer_on_real_vocab(ours: Tokenizer) -> None:
    text = "Réponse: 你好，世界！🎉👍🏽 👨‍👩‍👧 日本語 and ASCII.<|im_end|>"
    ids = ours.encode(text)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # some characters span several tokens
    prompt = ours.encode_chat([{"role": "user", "content": "Say hi"}])
    for prompt_ids in (None, prompt):
        detok = IncrementalDetokenizer(ours, prompt_ids=prompt_ids)
        deltas = [detok.add(i) for i in ids] + [detok.flush()]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.text == ours.decode(ids) == text.removesuffix("<|im_end|>")
