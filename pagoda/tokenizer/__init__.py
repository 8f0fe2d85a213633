"""Tokenizers loaded from Hugging Face directories or GGUF files, chat templates, streaming decode."""

from __future__ import annotations

from pagoda.tokenizer.chat_template import render_chat_template
from pagoda.tokenizer.detokenizer import IncrementalDetokenizer
from pagoda.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "load_tokenizer", "render_chat_template"]
