"""LoRA adapters made in the tests: PEFT directories with random A and B (PEFT itself writes
them), and the same adapter as a llama.cpp GGUF LoRA file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf_model, path: Path, rank: int, seed: int, modules=ALL_MODULES, alpha: float | None = None,
                 rslora: bool = False, scale: float = 0.2):
    """Wrap a copy of `hf_model` with a LoRA of random A and B, save it to `path`; returns the
    PEFT model (for reference logits)."""
    import copy

    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(modules),
                          init_lora_weights=False, use_rslora=rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(hf_model), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.eval()
    model.save_pretrained(str(path))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rope-layout row permutation of Q and K (convert_hf_to_gguf's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_adapter_from_peft(peft_dir: Path, out: Path, num_heads: int, num_kv_heads: int) -> Path:
    """The PEFT adapter as convert_lora_to_gguf writes it: llama tensor names, Q/K's lora_b
    rows permuted for llama.cpp's rope, alpha in adapter.lora.alpha."""
    import json

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for key, t in sorted(tensors.items()):
        prefix, _, rest = key.removeprefix("base_model.model.model.layers.").partition(".")
        module, _, which = rest.partition(".lora_")
        arr = t.float().numpy()
        if which.startswith("B") and module == "self_attn.q_proj":
            arr = _permute(arr, num_heads)
        elif which.startswith("B") and module == "self_attn.k_proj":
            arr = _permute(arr, num_kv_heads)
        name = f"blk.{prefix}.{_GGUF_NAMES[module]}.weight.lora_{which[0].lower()}"
        writer.add_tensor(name, np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
