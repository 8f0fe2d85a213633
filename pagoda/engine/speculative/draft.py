"""Draft-model proposals: a smaller model with the target's vocabulary, its own paged KV cache.

Each step the draft catches up on the tokens the target confirmed since its last proposal
(its KV holds what it was fed; whatever the target did not confirm is simply recomputed over,
found by comparing the fed tokens with the sequence), then proposes k tokens greedily, one
batched draft forward per token over all speculating sequences. A greedy proposal is a point
mass, so the target's verification (see verify.py) is exact rejection sampling for it.

``--speculative-draft-model`` takes a checkpoint (HF directory or GGUF), or a config.json for
random weights (with the engine's seed: the same config as the target's is the target itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.cache.page_allocator import PageAllocator
from pagoda.config import EngineConfig
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.speculative.ngram import next_length
from pagoda.errors import ConfigError
from pagoda.models.loader import load_model

GiB = 1 << 30


@dataclass
class DraftState:
    pages: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds, in order
    length: int = 0  # the sequence's current proposal length (adaptive, as the n-gram proposer's)


def _draft_config(config: EngineConfig) -> EngineConfig:
    path = config.speculative_draft_model
    assert path is not None
    as_config = path.endswith(".json")
    return dataclasses.replace(
        config, model=None if as_config else path, model_config=path if as_config else None,
        load_format="dummy" if as_config else "auto", tokenizer=None, speculative_algorithm=None,
        speculative_config=None, speculative_draft_model=None,
    )


class DraftProposer:
    def __init__(self, config: EngineConfig, platform, target_config, context_length: int) -> None:
        self.k = config.speculative_num_draft_tokens
        self.loaded = load_model(_draft_config(config), platform)
        mc = self.loaded.config
        if mc.vocab_size != target_config.vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({mc.vocab_size} tokens) differs from the target's "
                f"({target_config.vocab_size}): a draft must share the tokenizer"
            )
        self.context_length = min(context_length, self.loaded.context_length)
        dtype = torch.bfloat16 if self.loaded.quantization else self.loaded.dtype
        page_size = config.page_size
        per_token = KVPool.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, dtype)
        # enough for every sequence that may speculate at once, within a quarter of the target's budget
        budget = int((config.kv_cache_memory or platform.kv_cache_budget() / GiB) * GiB / 4)
        useful = (config.speculative_max_batch + 1) * (self.context_length + page_size)
        num_pages = max(2, min(budget // per_token, useful) // page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        self.kv = KVPool(mc.num_hidden_layers, self.allocator.num_storage_pages, page_size, mc.num_key_value_heads,
                         mc.head_dim, dtype, platform.device(), platform.alloc_streamed)
        self.runner = ModelRunner(self.loaded.model, self.kv, platform.device())
        self.page_size = page_size

    def propose(self, reqs: Sequence, limits: Sequence[int]) -> None:
        seqs, active, wants = [], [], []
        for req, limit in zip(reqs, limits):
            ids = req.all_ids
            limit = min(limit, self.context_length - len(ids))
            if limit <= 0:
                continue
            state = req.spec_state
            if state is None:
                state = req.spec_state = DraftState(length=self.k)
            limit = min(limit, state.length)
            keep = min(len(state.fed), len(ids) - 1)  # feed at least the last token
            if state.fed[:keep] != ids[:keep]:  # a rejected proposal: recompute from where it began
                keep = next(i for i, (a, b) in enumerate(zip(state.fed, ids)) if a != b)
            del state.fed[keep:]
            if not self._grow(state, len(ids) + limit - 1):
                continue
            seqs.append((ids[keep:], keep, state.pages))
            state.fed.extend(ids[keep:])
            active.append(req)
            wants.append(limit)
            req.draft = []
        step = 0
        while seqs:
            logits = self.runner.forward(self.runner.prepare(seqs)).last_logits
            picks = logits.argmax(dim=-1).tolist()
            step += 1
            next_seqs, next_active, next_wants = [], [], []
            for (_, _, pages), req, want, tok in zip(seqs, active, wants, picks):
                req.draft.append(tok)
                if step < want:
                    state = req.spec_state
                    next_seqs.append(([tok], len(state.fed), pages))
                    state.fed.append(tok)
                    next_active.append(req)
                    next_wants.append(want)
            seqs, active, wants = next_seqs, next_active, next_wants

    def _grow(self, state: DraftState, num_tokens: int) -> bool:
        need = (num_tokens + self.page_size - 1) // self.page_size - len(state.pages)
        if need <= 0:
            return True
        pages = self.allocator.alloc(need)
        if pages is None:
            return False
        state.pages.extend(pages)
        return True

    def verified(self, req, proposed: int, accepted: int) -> None:
        state = req.spec_state
        if state is not None:
            state.length = next_length(state.length, proposed, accepted, self.k)

    def release(self, req) -> None:
        state = req.spec_state
        if isinstance(state, DraftState):
            self.allocator.decref(state.pages)
        req.spec_state = None

    def check_integrity(self, idle: bool) -> None:
        """When no sequence is left, every draft page is free."""
        if idle:
            free = self.allocator.num_free()
            assert free == self.allocator.num_pages, f"draft page leak: {free} of {self.allocator.num_pages} free"
