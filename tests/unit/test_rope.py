"""Each RoPE scaling type against transformers' own implementation."""

from __future__ import annotations

import pytest
import torch

from pagoda.models.rope import inv_freq_and_scale
from pagoda.errors import ConfigError

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inv_freq_and_attention_factor_match_transformers(name: str) -> None:
    scaling = SCALINGS[name]
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                   rope_theta=10000.0, rope_scaling=dict(scaling))
    ours, scale, positions = inv_freq_and_scale(64, 10000.0, 256, scaling)
    kwargs = {"seq_len": positions} if name == "dynamic" else {}
    ref, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu", **kwargs)
    assert torch.allclose(ours, ref.float(), rtol=1e-5, atol=1e-9)
    assert scale == pytest.approx(ref_scale, rel=1e-6)
    assert positions >= 256


def test_unknown_rope_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'longrope'"):
        inv_freq_and_scale(64, 10000.0, 256, {"rope_type": "longrope", "factor": 2.0})
