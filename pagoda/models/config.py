"""ModelConfig: the architecture hyper-parameters every loader resolves to.

Loaders (HF directory, GGUF, dummy) all produce a Hugging Face style `config.json`
dict; `ModelConfig.from_hf_dict` is the one place that interprets it, so the Llama,
Mistral, Qwen2 and Jiutian variants differ only in the flags set here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagoda.errors import ConfigError

# architecture name -> (norm variant, default qkv bias)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("llama", False),
    "Qwen2ForCausalLM": ("llama", True),
    "JiutianForCausalLM": ("jiutian", True),
}

_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "jiutian": "JiutianForCausalLM",
}


def normalize_rope_scaling(scaling: dict[str, Any] | None, trained_positions: int) -> dict[str, Any] | None:
    """None for "default" scaling; YaRN's ramp made relative to the trained length (as
    transformers does), never to an extended --context-length the model is built for."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and not scaling.get("original_max_position_embeddings"):
        return {**scaling, "original_max_position_embeddings": trained_positions}
    return scaling


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    qkv_bias: bool
    tie_word_embeddings: bool
    norm_variant: str  # "llama": x*rsqrt(mean(x^2)+eps); "jiutian": x/(rms+eps)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count, for sizing memory before any weight exists."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(cfg.get("model_type", ""), "")
        if arch not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise ConfigError(f"unsupported architecture {arch or cfg.get('model_type')!r} (supported: {supported})")
        norm_variant, default_bias = ARCHITECTURES[arch]
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = cfg.get("num_key_value_heads") or heads
            head_dim = cfg.get("head_dim") or hidden // heads
            eos = cfg.get("eos_token_id")
            eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            if arch == "Qwen2ForCausalLM":
                qkv_bias = True
            else:
                qkv_bias = bool(cfg.get("qkv_bias", cfg.get("attention_bias", default_bias)))
            # transformers >= 5 writes both into "rope_parameters"; older configs use two fields.
            rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
            rope_scaling = cfg.get("rope_scaling") or {k: v for k, v in rope_params.items() if k != "rope_theta"} or None
            rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta"))
            if arch == "JiutianForCausalLM":
                rope_scaling = None  # Jiutian's configuration class forces it off.
            rope_scaling = normalize_rope_scaling(rope_scaling, int(cfg.get("max_position_embeddings", 2048)))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(kv_heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                qkv_bias=qkv_bias,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                norm_variant=norm_variant,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_list,
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            )
        except KeyError as e:
            raise ConfigError(f"model config is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config has an invalid value: {e}") from None
