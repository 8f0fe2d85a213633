"""Streaming detokenization: no partial characters, and the deltas add up to the full decode."""

from __future__ import annotations

import pytest

from pagoda.tokenizer import IncrementalDetokenizer, Tokenizer
from pagoda.tokenizer.gguf_vocab import bytes_to_unicode, vocab_from_metadata

TEXT = "héllo 你好 🎉👍🏽 ok<|im_end|>"


def make_tokenizer(meta: dict) -> Tokenizer:
    vocab = vocab_from_metadata(meta)
    return Tokenizer(vocab.backend, bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
                     add_bos_token=vocab.add_bos_token)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    """Byte-level BPE whose only merges join the first two bytes of 你 and of an emoji, so token
    boundaries fall inside characters both between single bytes and after a merged token."""
    spell = bytes_to_unicode()
    merges = [" ".join(spell[b] for b in "你".encode()[:2]), " ".join(spell[b] for b in "🎉".encode()[:2])]
    tokens = ["<|endoftext|>", "<|im_end|>", *spell.values(), *(m.replace(" ", "") for m in merges)]
    return make_tokenizer({"ggml.model": "gpt2", "ggml.pre": "gpt2", "ggml.tokens": tokens,
                           "ggml.token_type": [3, 3] + [1] * (len(tokens) - 2), "ggml.merges": merges,
                           "ggml.eos_token_id": 1})


@pytest.fixture(scope="module")
def spm_tok() -> Tokenizer:
    """SentencePiece with byte fallback: CJK and emoji exist only as <0xXX> byte tokens."""
    pieces = {"\u2581": -3.0, "h": -9.0, "e": -9.0, "l": -9.0, "o": -9.0, "he": -1.0, "ll": -1.1, "hell": -1.2,
              "hello": -1.3, "\u2581hello": -1.4}
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return make_tokenizer({"ggml.model": "llama", "ggml.tokens": tokens,
                           "ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
                           "ggml.scores": [0.0] * 259 + list(pieces.values()), "ggml.bos_token_id": 1,
                           "ggml.eos_token_id": 2, "ggml.unknown_token_id": 0, "ggml.add_bos_token": False})


def stream(tok: Tokenizer, ids: list[int], **kwargs: object) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)  # type: ignore[arg-type]
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("skip", [True, False])
def test_byte_level_stream(byte_tok: Tokenizer, skip: bool) -> None:
    ids = byte_tok.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters really are split
    deltas, detok = stream(byte_tok, ids, skip_special_tokens=skip)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # something was held back mid-character
    assert "".join(deltas) == detok.text == byte_tok.decode(ids, skip_special_tokens=skip)
    assert detok.text == (TEXT.replace("<|im_end|>", "") if skip else TEXT)


def test_byte_level_with_prompt_context(byte_tok: Tokenizer) -> None:
    prompt, generated = byte_tok.encode("prompt 你"), byte_tok.encode("好 🎉 world")
    deltas, detok = stream(byte_tok, generated, prompt_ids=prompt)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.text == byte_tok.decode(generated) == "好 🎉 world"


def test_flush_releases_an_incomplete_character(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("a你")[:-1]  # "a" then the first two bytes of 你
    detok = IncrementalDetokenizer(byte_tok)
    assert [detok.add(i) for i in ids] == ["a", ""]
    assert detok.flush() == "\ufffd" and detok.text == byte_tok.decode(ids)
    assert detok.flush() == ""


def test_sentencepiece_byte_fallback_stream(spm_tok: Tokenizer) -> None:
    ids = spm_tok.encode("hello 你好🎉 hello")
    assert spm_tok.convert_ids_to_tokens(ids)[:3] == ["\u2581hello", "\u2581", "<0xE4>"]
    deltas, detok = stream(spm_tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == spm_tok.decode(ids) == "hello 你好🎉 hello"


def test_sentencepiece_after_prompt_keeps_the_leading_space(spm_tok: Tokenizer) -> None:
    # decode() of the generation alone strips the ▁ of its first token; after a prompt it is a real space.
    ids = spm_tok.encode("hello hello", add_special_tokens=False)
    deltas, _ = stream(spm_tok, ids, prompt_ids=spm_tok.encode("hello"))
    assert "".join(deltas) == " hello hello"
