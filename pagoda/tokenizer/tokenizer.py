"""The tokenizer the engine and server use, loaded from a Hugging Face directory or a GGUF file.

It wraps a `tokenizers.Tokenizer` and adds what serving needs around it: BOS handling that matches
transformers, the stop tokens that end a turn, and chat templates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from pagoda.errors import ModelLoadError
from pagoda.tokenizer.chat_template import render_chat_template
from pagoda.tokenizer.gguf_vocab import load_gguf_vocab

logger = logging.getLogger(__name__)

# Tokens that end an assistant turn in common chat formats; they stop generation like EOS does.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
)


class Tokenizer:
    """Text <-> token ids, plus chat templates and stop tokens."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        stops = {i for i in extra_stop_ids if 0 <= i < self.vocab_size}
        if eos_token_id is not None:
            stops.add(eos_token_id)
        stops.update(i for name in END_OF_TURN_TOKENS if (i := backend.token_to_id(name)) is not None)
        self.stop_token_ids: set[int] = stops

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A transformers model directory: tokenizer.json, with tokenizer_config.json and friends if present."""
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"no tokenizer.json in {root} (pagoda needs a fast tokenizer file)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")

        def token_id(name: str) -> int | None:
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            return backend.token_to_id(content) if content else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: the tokenizer.json post-processor decides, as in transformers
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and with_special[:1] == [bos]
        # Instruct models often list end-of-turn ids as extra EOS here (Llama 3: <|eot_id|>).
        generation = _read_json(root / "generation_config.json").get("eos_token_id")
        extra = [generation] if isinstance(generation, int) else [i for i in generation or [] if isinstance(i, int)]
        if eos is None and extra:
            eos = extra[0]
        return cls(backend, bos_token_id=bos, eos_token_id=eos,
                   chat_template=_hf_chat_template(root, config), add_bos_token=bool(add_bos), extra_stop_ids=extra)

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> Tokenizer:
        """A GGUF file: the vocabulary lives in its metadata (`metadata`: see load_gguf_vocab)."""
        vocab = load_gguf_vocab(path, metadata)
        return cls(vocab.backend, bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
                   chat_template=vocab.chat_template, add_bos_token=vocab.add_bos_token,
                   extra_stop_ids=vocab.extra_stop_ids)

    @property
    def bos_token(self) -> str | None:
        return self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in the text always encode as their id; BOS is added only if the model asks."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token, eos_token=self.eos_token, **template_kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The template writes any BOS itself, so none is added again (transformers' tokenize=True)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(model_path: str | Path, read_gguf: tuple[Path, dict[str, Any]] | None = None) -> Tokenizer:
    """A directory is a transformers model (or holds a GGUF); a *.gguf file is read directly.
    `read_gguf`: a GGUF file whose tokenizer keys the caller has read already (used if it is
    the file this picks)."""
    path = Path(model_path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "tokenizer.json").is_file() and ggufs:
            path = ggufs[0]
        else:
            return Tokenizer.from_hf_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        known = read_gguf is not None and read_gguf[0].resolve() == path.resolve()
        return Tokenizer.from_gguf(path, read_gguf[1] if known else None)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    raise ModelLoadError(f"cannot load a tokenizer from {path}: expected a model directory or a .gguf file")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """Config files write a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over chat_template.json, which wins over tokenizer_config.json."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(root / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
