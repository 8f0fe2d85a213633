"""Fixtures of the in-process server tests (chat, Responses, Messages, embeddings)."""

from __future__ import annotations

import pytest

from pagoda.engine.async_engine import AsyncEngine
from tests.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_config_path, tmp_path_factory):
    """The tiny random Llama with the tiny byte-level tokenizer (ChatML), one per test module."""
    tok = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    eng = AsyncEngine(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.02, seed=1,
                      tokenizer=str(tok))
    yield eng
    eng.shutdown()
