"""Prompt-lookup proposals and the speculative options."""

from __future__ import annotations

import json
import random

import pytest

from pagoda.config import EngineConfig
from pagoda.engine.speculative.ngram import NgramIndex
from pagoda.errors import ConfigError


def brute_force(ids: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The definition: the longest suffix (hi..lo) with an earlier occurrence; its latest one."""
    for n in range(min(hi, len(ids)), lo - 1, -1):
        suffix = ids[len(ids) - n :]
        for end in range(len(ids) - 1, n - 1, -1):  # occurrence ids[end-n:end], followed by ids[end]
            if ids[end - n : end] == suffix:
                return ids[end : end + k]
    return []


def test_proposes_what_followed_the_longest_latest_match() -> None:
    index = NgramIndex(1, 3)
    ids = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurred at the start: what followed it
    assert index.propose(ids, 4) == [4, 5, 9, 2]
    assert NgramIndex(1, 2).propose(ids, 2) == [7, 8]  # [2, 3]: its latest occurrence wins
    assert NgramIndex(2, 3).propose([5, 6, 7], 3) == []  # nothing earlier
    assert NgramIndex(1, 1).propose([5, 6, 5], 3) == [6, 5]  # bounded by the sequence


@pytest.mark.parametrize("lo,hi", [(1, 1), (1, 4), (2, 5)])
def test_incremental_index_matches_the_definition(lo: int, hi: int) -> None:
    rng = random.Random(lo * 10 + hi)
    ids = [rng.randrange(6) for _ in range(20)]
    index = NgramIndex(lo, hi)
    for _ in range(200):
        assert index.propose(ids, 5) == brute_force(ids, 5, lo, hi)
        ids.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))


def test_speculative_options_and_vllm_config() -> None:
    cfg = EngineConfig(speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 6}))
    assert (cfg.speculative_algorithm, cfg.speculative_num_draft_tokens) == ("ngram", 5)
    assert (cfg.speculative_ngram_min_match, cfg.speculative_ngram_max_match) == (2, 6)
    cfg = EngineConfig(speculative_config='{"model": "draft.gguf", "num_speculative_tokens": 3}')
    assert (cfg.speculative_algorithm, cfg.speculative_draft_model) == ("draft", "draft.gguf")
    assert EngineConfig().speculative_algorithm is None
    with pytest.raises(ConfigError, match="unknown key"):
        EngineConfig(speculative_config='{"methd": "ngram"}')
    with pytest.raises(ConfigError, match="draft-model"):
        EngineConfig(speculative_algorithm="draft")
    with pytest.raises(ConfigError, match="positive"):
        EngineConfig(speculative_algorithm="ngram", speculative_num_draft_tokens=0)
    with pytest.raises(ConfigError):
        EngineConfig(speculative_algorithm="eagle")
