"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file carries in its metadata.

A GGUF has no tokenizer.json: it stores tokens, merges or scores, token types and special ids under
llama.cpp's key names. We rebuild the tokenizer the file describes the way transformers does when it
loads a GGUF (so token ids match it), and take the pre-tokenizer split from `tokenizer.ggml.pre` the
way llama.cpp does (so numbers and whitespace are cut as the merges were learned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pagoda.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")

# Split regexes, as llama.cpp uses them for each `tokenizer.ggml.pre` value (llama-vocab.cpp).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# llama.cpp cuts every digit apart (`\p{N}`) before the GPT-2 regex for these; the original
# tokenizer.json files (StarCoder, SmolLM) say the same with a `Digits(individual_digits)` step.
_DIGITS_THEN_GPT2 = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}
# The plain GPT-2 regex, which ByteLevel(use_regex=True) applies itself.
_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
# llama.cpp matches a pre-token found whole in the vocabulary without merging for these (as does
# Llama 3's tokenizer.json, `ignore_merges`).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}


@dataclass
class GGUFVocab:
    """What a GGUF says about its tokenizer, with the rebuilt backend."""

    backend: Backend
    bos_token_id: int | None
    eos_token_id: int | None
    extra_stop_ids: set[int]
    add_bos_token: bool
    chat_template: str | None


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, the alphabet byte-level tokens are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def read_tokenizer_metadata(path: str | Path, reader: Any = None) -> dict[str, Any]:
    """The `tokenizer.*` keys of a GGUF file (prefix stripped), plus `general.architecture`.

    Pass the file's open `gguf.GGUFReader` when there is one: parsing the file again costs
    ~3 s for a 49K-token vocabulary, reading the keys from a reader ~0.1 s."""
    import gguf

    if reader is None:
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # a truncated or non-GGUF file raises all sorts
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            meta[key.removeprefix("tokenizer.")] = field.contents()
        elif key == "general.architecture":
            meta["architecture"] = field.contents()
    return meta


def load_gguf_vocab(path: str | Path, metadata: dict[str, Any] | None = None) -> GGUFVocab:
    """Rebuild a GGUF file's tokenizer from its metadata (`metadata`: those keys already read
    by read_tokenizer_metadata, which spares a second parse of the file)."""
    return vocab_from_metadata(read_tokenizer_metadata(path) if metadata is None else metadata, source=str(path))


def vocab_from_metadata(meta: dict[str, Any], source: str = "GGUF file") -> GGUFVocab:
    """Rebuild the tokenizer from already-read metadata (keys without the `tokenizer.` prefix)."""
    model = meta.get("ggml.model")
    if model is None or "ggml.tokens" not in meta:
        raise ModelLoadError(f"{source} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if model not in SUPPORTED_MODELS:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer model {model!r} in {source} (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    backend = _byte_level(meta) if model == "gpt2" else _sentencepiece(meta)
    _add_special_tokens(backend, meta)

    def token_id(key: str) -> int | None:
        value = meta.get(f"ggml.{key}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(meta["ggml.tokens"]) else None

    extra = {i for i in (token_id("eot"), token_id("eom")) if i is not None}
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise; transformers follows it.
    add_bos = meta.get("ggml.add_bos_token", model == "llama")
    return GGUFVocab(backend, token_id("bos"), token_id("eos"), extra, bool(add_bos), meta.get("chat_template"))


def _byte_level(meta: dict[str, Any]) -> Backend:
    """GPT-2 style byte-level BPE from tokens and "left right" merge strings."""
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    types = meta.get("ggml.token_type") or [NORMAL] * len(meta["ggml.tokens"])
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(meta["ggml.tokens"], types)):
        # A normal token spelled with characters outside the byte alphabet (some converters write raw
        # text) is respelled, as transformers does; added tokens keep their text, they match whole.
        if kind in (NORMAL, UNUSED, BYTE) and not set(token) <= alphabet:
            token = "".join(spell[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("ggml.merges") or []]
    pre = meta.get("ggml.pre", "default")
    backend = Backend(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split for a `tokenizer.ggml.pre` value; unknown values get GPT-2's, like transformers."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in _GPT2:
        logger.warning("GGUF pre-tokenizer %r is not known to pagoda; splitting text like GPT-2", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece(meta: dict[str, Any]) -> Backend:
    """llama.cpp's SPM vocabulary: ▁ for spaces, merges by score, bytes as <0xXX> fallback tokens."""
    tokens = list(meta["ggml.tokens"])
    types = meta.get("ggml.token_type") or [NORMAL] * len(tokens)
    # Gemma files write a run of spaces as real spaces; text is looked up with ▁, so respell them.
    present = set(tokens)
    for i, token in enumerate(tokens):
        if token and not token.strip(" ") and "\u2581" * len(token) not in present:
            tokens[i] = "\u2581" * len(token)
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if meta.get("ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in meta["ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, types, meta.get("ggml.scores") or [0.0] * len(tokens), vocab)
    unk_id = meta.get("ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("ggml.add_space_prefix", True))
    # "first": only the start of the text gets the ▁, not each piece after a special token
    # (transformers' LlamaTokenizer, legacy=False).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece merges the pair whose join scores best; as BPE ranks: every split of a token into
    two vocabulary pieces, best-scoring token first (transformers' generate_merges order)."""
    ranked: list[tuple[float, int, int, int, int, int, str, str]] = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (UNKNOWN, CONTROL, BYTE, USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], -len(left), -len(right), index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: Backend, meta: dict[str, Any]) -> None:
    """Control and unknown tokens become special tokens, user-defined ones plain added tokens, so that
    text like "<|im_start|>" encodes as one id instead of being cut into pieces."""
    types = meta.get("ggml.token_type") or []
    special, user = [], []
    for token, kind in zip(meta["ggml.tokens"], types):
        if kind in (CONTROL, UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
