"""Helpers for tests that drive a pagoda model directly (no scheduler)."""

from __future__ import annotations

import os

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.engine.model_runner import ModelRunner
from pagoda.platforms import get_platform

DEVICE = get_platform(os.environ.get("PAGODA_TEST_DEVICE", "cpu")).device()
"""Where the model tests run pagoda (PAGODA_TEST_DEVICE=cuda on a GPU machine); their references
stay on the CPU, and logits come back to it."""

# A tiny Llama-family shape, for the HF configs the parity tests build their references from.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
)


def make_runner(model: torch.nn.Module, num_pages: int = 64, page_size: int = 4) -> ModelRunner:
    cfg = model.config
    pool = KVPool(cfg.num_hidden_layers, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim,
                  model.dtype, DEVICE)
    return ModelRunner(model, pool, DEVICE)


def pages_for(num_tokens: int, page_size: int, first_page: int = 1) -> list[int]:
    """A sequence's page table: consecutive pages, deliberately not starting at 0."""
    return list(range(first_page, first_page + (num_tokens + page_size - 1) // page_size))


def prefill_logits(runner: ModelRunner, ids: list[int], first_page: int = 1) -> torch.Tensor:
    """Logits for every position of `ids`, computed in one prefill."""
    pages = pages_for(len(ids), runner.page_size, first_page)
    out = runner.forward(runner.prepare([(ids, 0, pages)], all_logits=[0]))
    return out.all_logits[0].cpu()


def incremental_logits(runner: ModelRunner, ids: list[int], chunk: int, first_page: int = 1) -> torch.Tensor:
    """Logits for every position, fed `chunk` tokens at a time through the KV cache."""
    pages = pages_for(len(ids), runner.page_size, first_page)
    rows = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows.append(runner.forward(runner.prepare([(part, start, pages)], all_logits=[0])).all_logits[0])
    return torch.cat(rows).cpu()
