"""Jiutian for tests: random weights, an independent from-the-formula reference of
shared/JIUTIAN.md, and a whole Jiutian-format Hugging Face directory (config.json,
safetensors, a Qwen-style byte-level BPE tokenizer.json and a ChatML chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def jiutian_weights(cfg: dict, seed: int = 0, embed_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random float32 weights under Jiutian's HF names (random norms and biases, so none can be dropped unseen).
    A small `embed_scale` makes the first norm see activations where Jiutian's norm and Llama's differ."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    w = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * embed_scale,
         "lm_head.weight": torch.randn(v, h, generator=g) * 0.1,
         "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,), "self_attn.k_proj.weight": (kv, h),
                  "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
                  "mlp.down_proj.weight": (h, i)}
        for name, shape in shapes.items():
            w[p + name] = torch.randn(*shape, generator=g) * 0.1
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return w


def jiutian_reference(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Straight from JIUTIAN.md: pre-norm block, rms + eps outside the root, rotate-half rope."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, eps, t = h // nh, cfg["rms_norm_eps"], len(ids)

    def norm(x, weight):
        rms = x.norm(dim=-1, keepdim=True) / (x.shape[-1] ** 0.5)
        return weight * (x / (rms + eps))

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2).double() / d))
    ang = torch.outer(torch.arange(t).double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):  # [heads, t, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = norm(x, w[p + "input_layernorm.weight"])
        q = (a @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(t, nh, d).transpose(0, 1)
        k = (a @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(t, nkv, d).transpose(0, 1)
        v = (a @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(t, nkv, d).transpose(0, 1)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        s = (q @ k.transpose(1, 2)) * d**-0.5 + torch.triu(torch.full((t, t), float("-inf")), 1)
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(t, h)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


# ---- a Jiutian-format directory ------------------------------------------------------------------------

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/Qwen2.5), followed by byte-level mapping.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids follow the BPE vocabulary, as in Qwen
# Qwen2-Instruct's ChatML template, verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "China Mobile publishes the Jiutian language models as Hugging Face directories.",
    "九天大模型 answers questions, writes code and solves math problems. 你好，世界！",
    "def add(a, b):\n    return a + b  # 1234567890\n",
    "The quick brown fox jumps over the lazy dog; it's 42 degrees, isn't it?",
    "<html> {\"key\": [1, 2, 3]} \t tabs\r\nand  double  spaces ... émigré naïve café",
]


def qwen_style_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A small byte-level BPE trained here, built like Qwen2's: NFC, regex split + ByteLevel,
    ByteLevel decoder, the three special tokens appended after the merges."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def jiutian_config(tokenizer: Tokenizer) -> dict:
    """A tiny config.json as Jiutian ships it (custom-code auto_map included); the vocabulary is
    padded past the tokenizer's, as Qwen's 152064 is past its 151646 tokens."""
    im_end = tokenizer.token_to_id("<|im_end|>")
    return {
        "architectures": ["JiutianForCausalLM"], "model_type": "jiutian",
        "auto_map": {"AutoConfig": "configuration_jiutian.JiutianConfig",
                     "AutoModelForCausalLM": "modeling_jiutian.JiutianForCausalLM"},
        "vocab_size": -(-tokenizer.get_vocab_size() // 64) * 64, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
        "qkv_bias": True, "tie_word_embeddings": False, "pad_token_id": im_end, "eos_token_id": im_end,
        "torch_dtype": "bfloat16",
    }


def write_jiutian_dir(root: Path, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write the directory; returns its config and the weights exactly as stored (bfloat16), in float32."""
    root.mkdir(parents=True, exist_ok=True)
    tok = qwen_style_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    cfg = jiutian_config(tok)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    special = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    (root / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": cfg["max_position_embeddings"], "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))
    (root / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [cfg["eos_token_id"], tok.token_to_id("<|endoftext|>")], "pad_token_id": cfg["pad_token_id"]}))
    # Embeddings of RMS ~1e-3: there Jiutian's rms + eps and Llama's sqrt(ms + eps) differ by ~40%.
    stored = {k: v.to(torch.bfloat16).contiguous() for k, v in jiutian_weights(cfg, seed, embed_scale=1e-3).items()}
    save_file(stored, str(root / "model.safetensors"), metadata={"format": "pt"})
    return cfg, {k: v.float() for k, v in stored.items()}
