"""A 512-token byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a ChatML template)
that fits the tiny random Llama of conftest.TINY_LLAMA (vocab 512, eos 511): lets grammar,
tool-call and server tests run on the tiny model in seconds instead of the real one."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Merged tokens beyond the 256 bytes: enough multi-character pieces that grammars must handle
# tokens which straddle their structure ('{"', '":', ...).
MERGES = [("{", '"'), ('"', ":"), ('"', ","), ('"', "}"), ("a", "b"), ("t", "r"), ("u", "e"), ("tr", "ue"),
          ("Ġ", '"'), ("1", "2"), ("<", "t"), ("o", "o"), ("l", "_"), ("c", "a"), ("ca", "l"), ("cal", "l")]
SPECIAL = {"<|im_start|>": 509, "<|im_end|>": 510, "<eos>": 511}
VOCAB_SIZE = 512


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    bs = list(printable)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Fill the ids up to the specials with unused special tokens, so every id decodes.
    tok.add_special_tokens([f"<unused{i}>" for i in range(len(vocab), min(SPECIAL.values()))])
    tok.add_special_tokens(list(SPECIAL))
    assert [tok.token_to_id(s) for s in SPECIAL] == list(SPECIAL.values()), "special token ids moved"
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<eos>", "chat_template": CHATML, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
