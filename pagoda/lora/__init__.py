"""LoRA adapters over one base model: loading (PEFT directories, llama.cpp GGUF LoRA files)
into the model's fused projections, and the bounded pool of resident adapters."""

from pagoda.lora.adapter import LoRAAdapter, LoRAModelInfo, load_adapter
from pagoda.lora.manager import LoRAManager

__all__ = ["LoRAAdapter", "LoRAManager", "LoRAModelInfo", "load_adapter"]
