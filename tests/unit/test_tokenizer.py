"""Tokenizer loading from tiny GGUF files (byte-level BPE and SentencePiece) and HF directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import processors

from pagoda.errors import ConfigError, ModelLoadError
from pagoda.tokenizer import Tokenizer, load_tokenizer
from pagoda.tokenizer.gguf_vocab import bytes_to_unicode, read_tokenizer_metadata, vocab_from_metadata

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ 1", "1 2", "12 3"]


def byte_level_meta(pre: str = "smollm", **extra: Any) -> dict[str, Any]:
    """Three control tokens, one user-defined, the 256 byte characters, then one token per merge."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in BYTE_MERGES]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    meta = {"ggml.model": "gpt2", "ggml.pre": pre, "ggml.tokens": tokens, "ggml.token_type": types,
            "ggml.merges": BYTE_MERGES, "ggml.bos_token_id": 1, "ggml.eos_token_id": 2,
            "ggml.add_bos_token": False, "chat_template": CHATML}
    return {**meta, **extra}


def spm_meta(**extra: Any) -> dict[str, Any]:
    """A llama.cpp SentencePiece vocabulary: <unk> <s> </s>, 256 <0xXX> byte tokens, scored pieces."""
    pieces = {"\u2581": -3.0, "h": -10, "e": -10, "l": -10, "o": -10, "w": -10, "r": -10, "d": -10,
              "he": -1.0, "ll": -1.1, "hell": -1.2, "hello": -1.3, "\u2581hello": -1.4, "\u2581h": -5,
              "or": -1.0, "wor": -1.1, "ld": -1.05, "world": -1.3, "\u2581world": -1.4, "\u2581w": -5}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces) + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [float(s) for s in pieces.values()] + [0.0]
    meta = {"ggml.model": "llama", "ggml.tokens": tokens, "ggml.token_type": types, "ggml.scores": scores,
            "ggml.bos_token_id": 1, "ggml.eos_token_id": 2, "ggml.unknown_token_id": 0}
    return {**meta, **extra}


def write_gguf(path: Path, meta: dict[str, Any]) -> Path:
    """Write tokenizer metadata as a GGUF file with no tensors."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    setters = {"ggml.model": writer.add_tokenizer_model, "ggml.pre": writer.add_tokenizer_pre,
               "ggml.tokens": writer.add_token_list, "ggml.token_type": writer.add_token_types,
               "ggml.merges": writer.add_token_merges, "ggml.scores": writer.add_token_scores,
               "ggml.bos_token_id": writer.add_bos_token_id, "ggml.eos_token_id": writer.add_eos_token_id,
               "ggml.unknown_token_id": writer.add_unk_token_id, "ggml.eot_token_id": writer.add_eot_token_id,
               "ggml.add_bos_token": writer.add_add_bos_token, "ggml.add_space_prefix": writer.add_add_space_prefix,
               "chat_template": writer.add_chat_template}
    for key, value in meta.items():
        setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def from_meta(meta: dict[str, Any]) -> Tokenizer:
    vocab = vocab_from_metadata(meta)
    return Tokenizer(vocab.backend, bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
                     chat_template=vocab.chat_template, add_bos_token=vocab.add_bos_token,
                     extra_stop_ids=vocab.extra_stop_ids)


@pytest.fixture(scope="module")
def byte_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-bpe.gguf", byte_level_meta())


def test_gguf_byte_level_roundtrip_and_specials(byte_gguf: Path) -> None:
    tok = load_tokenizer(byte_gguf)
    assert tok.vocab_size == 260 + len(BYTE_MERGES)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, False)
    assert tok.stop_token_ids == {0, 2}  # eos <|im_end|> plus <|endoftext|>
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    text = "<|im_start|>user\nhé 你好 🎉<think><|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids  # each special and <think> is one id
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhé 你好 🎉<think>"  # user-defined tokens are not special


def test_gguf_pre_tokenizer_follows_ggml_pre() -> None:
    # smollm isolates every digit (llama.cpp's "\p{N}" split); gpt2 keeps " 123"; llama3 groups 1-3 digits.
    smollm, gpt2 = from_meta(byte_level_meta("smollm")), from_meta(byte_level_meta("gpt2"))
    llama3 = from_meta(byte_level_meta("llama-bpe"))
    assert smollm.convert_ids_to_tokens(smollm.encode(" 1234")) == ["Ġ", "1", "2", "3", "4"]
    assert gpt2.convert_ids_to_tokens(gpt2.encode(" 1234")) == ["Ġ1", "2", "3", "4"]
    assert llama3.convert_ids_to_tokens(llama3.encode("x 1234")) == ["x", "Ġ", "123", "4"]
    assert from_meta(byte_level_meta("some-new-pre")).encode(" 1234") == gpt2.encode(" 1234")


def test_bos_is_added_only_when_the_model_asks() -> None:
    tok = from_meta(byte_level_meta(**{"ggml.add_bos_token": True}))
    assert tok.encode("hello") == [1, tok.token_to_id("hello")]
    assert tok.encode("hello", add_special_tokens=False) == [tok.token_to_id("hello")]
    messages = [{"role": "user", "content": "hello"}]
    assert tok.encode_chat(messages) == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def test_gguf_chat_template_and_encode_chat(byte_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(byte_gguf)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n"
    )
    ids = tok.encode_chat(messages[:1])
    assert ids[0] == 1 and ids.count(1) == 2 and tok.decode(ids, False).endswith("<|im_start|>assistant\n")


def test_gguf_sentencepiece_with_byte_fallback(tmp_path: Path) -> None:
    tok = load_tokenizer(write_gguf(tmp_path / "tiny-spm.gguf", spm_meta()))
    assert tok.add_bos_token  # llama vocabularies add BOS unless the file says otherwise
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "\u2581hello", "\u2581world"]
    ids = tok.encode("hello é<|user|>")
    assert tok.convert_ids_to_tokens(ids)[2:] == ["\u2581", "<0xC3>", "<0xA9>", "<|user|>"]
    assert tok.decode(ids) == "hello é<|user|>"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> hello é<|user|>"
    assert tok.stop_token_ids == {2}


def test_sentencepiece_without_space_prefix() -> None:
    tok = from_meta(spm_meta(**{"ggml.add_space_prefix": False, "ggml.add_bos_token": False}))
    assert tok.convert_ids_to_tokens(tok.encode("hello world")) == ["hello", "\u2581world"]
    assert tok.decode(tok.encode(" hello")) == " hello"


def test_unsupported_gguf_tokenizer_model(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bert.gguf", {"ggml.model": "bert", "ggml.tokens": ["[CLS]", "a"]})
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        load_tokenizer(path)
    with pytest.raises(ModelLoadError, match="no tokenizer vocabulary"):
        load_tokenizer(write_gguf(tmp_path / "none.gguf", {"chat_template": "x"}))


def save_hf_dir(path: Path, config: dict[str, Any], post_processor: Any = None) -> Path:
    backend = vocab_from_metadata(spm_meta()).backend
    if post_processor is not None:
        backend.post_processor = post_processor
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_from_hf_dir(tmp_path: Path) -> None:
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True,
              "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"}
    root = save_hf_dir(tmp_path / "model", config)
    tok = load_tokenizer(root)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    # The template writes <s>; no second BOS, and no ▁ prefix after a special token (legacy=False).
    assert tok.encode_chat([{"role": "user", "content": "hello"}]) == [1, tok.token_to_id("hello"), 2]
    (root / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_hf_dir(root).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_hf_dir(root).stop_token_ids == {0, 2}


def test_from_hf_dir_reads_bos_from_post_processor(tmp_path: Path) -> None:
    adds_bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with_bos = save_hf_dir(tmp_path / "a", {"bos_token": "<s>", "eos_token": "</s>"}, adds_bos)
    without = save_hf_dir(tmp_path / "b", {"bos_token": "<s>", "eos_token": "</s>"})
    hello = Tokenizer.from_hf_dir(without).token_to_id("\u2581hello")
    assert Tokenizer.from_hf_dir(with_bos).encode("hello") == [1, hello]
    assert Tokenizer.from_hf_dir(without).encode("hello") == [hello]
    with pytest.raises(ConfigError, match="this model has no chat template; use a completions prompt"):
        Tokenizer.from_hf_dir(without).apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a model directory or a .gguf file"):
        load_tokenizer(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_tokenizer(tmp_path / "broken.gguf")


def test_directory_holding_only_a_gguf(tmp_path: Path) -> None:
    write_gguf(tmp_path / "model.gguf", byte_level_meta())
    assert load_tokenizer(tmp_path).encode("hello world") == from_meta(byte_level_meta()).encode("hello world")


def test_gguf_keys_read_with_the_weights_are_not_parsed_again(tmp_path: Path, monkeypatch) -> None:
    path = write_gguf(tmp_path / "model.gguf", byte_level_meta())
    metadata = read_tokenizer_metadata(path)
    expected = load_tokenizer(path).encode("hello world")

    def no_second_parse(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_second_parse)
    assert load_tokenizer(path, (path, metadata)).encode("hello world") == expected
    assert load_tokenizer(tmp_path, (path, metadata)).encode("hello world") == expected  # its directory
    with pytest.raises(ModelLoadError, match="parsed again"):  # keys of another file are not used
        load_tokenizer(path, (tmp_path / "other.gguf", metadata))


PARITY_TEXTS = ["hello world", "hello  world é 你好", " hello", "<|user|>hello", "hello<|user|> world", "<s>hello",
                "he llo\nworld", "", "x 1234 12", "<|im_start|>hello<think> 12<|im_end|>"]


@pytest.mark.parametrize("name", ["spm", "gpt2", "llama-bpe"])
def test_tiny_gguf_matches_transformers(tmp_path: Path, name: str) -> None:
    """transformers reads the same files the same way (it ignores add_space_prefix=False, so that stays out)."""
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / f"{name}.gguf", spm_meta() if name == "spm" else byte_level_meta(name))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in PARITY_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
