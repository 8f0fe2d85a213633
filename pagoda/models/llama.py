"""One Llama-family decoder serving Llama, Mistral, Qwen2 and Jiutian.

The architectures differ only in ModelConfig flags (QKV bias, tied embeddings, rope
scaling, norm variant). The model takes a step's ForwardBatch (a flat batch of tokens,
their positions, the paged layout and each layer's KV cache); it knows nothing about
requests, the cache's owner or the engine.

Tensor parallelism (a ParallelContext with more than one rank): attention heads and the MLP's
intermediate rows are split among the ranks (fused QKV and gate/up are column-parallel, o_proj
and down_proj row-parallel, one all-reduce after each), KV heads too (replicated when there
are fewer KV heads than ranks: each rank keeps the one its query heads read), and the
vocabulary of the embedding and the output head. A rank's weights are slices of the
checkpoint's tensors, taken as they load (quantized ones are quantized after slicing, on the
same 32-wide input groups as one rank would use, so row-parallel layers shard on group
boundaries).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagoda import ops
from pagoda.distributed.parallel import SINGLE, ParallelContext
from pagoda.errors import ConfigError, ModelLoadError
from pagoda.models.config import ModelConfig
from pagoda.models.layers import Linear, LinearFormat, RMSNorm, Rotary, _param, make_linear
from pagoda.ops import DECLINE, ForwardBatch


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, device: torch.device, quant: LinearFormat | None,
        rotary: Rotary, parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        self.layer_id, self.rotary, self.parallel = layer_id, rotary, parallel
        self.head_dim = cfg.head_dim
        self.num_heads, self.num_kv_heads, first_kv = attention_shard(cfg, parallel)
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        # Rows of the checkpoint's q and k/v projections (and columns of o_proj) this rank keeps.
        self.q_first, self.kv_first = parallel.rank * self.q_size, first_kv * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.dtype = dtype  # queries leave the rotary embedding in the model dtype
        self.out_dtype = quant and quant.activation_dtype  # what o_proj computes on (None: the model dtype)
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype, device, quant)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, dtype, device, quant)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x, batch).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = batch.kv(self.layer_id)
        q = ops.rotary_store_kv(q, k, v, *self.rotary(batch), k_cache, v_cache, batch.slot_mapping, self.dtype)
        out = ops.paged_attention(q, k_cache, v_cache, batch, self.scale, self.out_dtype)
        return self.parallel.all_reduce(self.o_proj(out.reshape(t, self.q_size), batch))


def attention_shard(cfg: ModelConfig, parallel: ParallelContext) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head of the checkpoint) of this rank."""
    tp, kv = parallel.world_size, cfg.num_key_value_heads
    heads = parallel.split(cfg.num_attention_heads, "attention heads")
    if kv >= tp:
        local_kv = parallel.split(kv, "KV heads")
        return heads, local_kv, parallel.rank * local_kv
    if tp % kv:
        raise ConfigError(f"--tensor-parallel-size {tp} is not a multiple of the model's {kv} KV heads")
    return heads, 1, parallel.rank // (tp // kv)  # replicated: the KV head this rank's query heads read


class MLP(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, quant: LinearFormat | None,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        self.parallel = parallel
        self.inter = parallel.split(cfg.intermediate_size, "MLP rows")
        self.first = parallel.rank * self.inter
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * self.inter, False, dtype, device, quant)
        self.down_proj = make_linear(self.inter, cfg.hidden_size, False, dtype, device, quant)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        return self.parallel.all_reduce(self.down_proj(ops.silu_and_mul(self.gate_up_proj(x, batch)), batch))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, device: torch.device, quant: LinearFormat | None,
        rotary: Rotary, parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        # The norms feed linears: with quantized linears they hand over bfloat16 directly.
        norm = (cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_variant, dtype, device, quant and quant.activation_dtype)
        self.input_layernorm = RMSNorm(*norm)
        self.self_attn = Attention(cfg, layer_id, dtype, device, quant, rotary, parallel)
        self.post_attention_layernorm = RMSNorm(*norm)
        self.mlp = MLP(cfg, dtype, device, quant, parallel)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, batch), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_position: int | None = None,
        quantization: LinearFormat | None = None, parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        self.config, self.dtype, self.quantization, self.parallel = cfg, dtype, quantization, parallel
        # Vocabulary-parallel: rank r holds rows [r*V/tp, (r+1)*V/tp) of the embedding and the
        # head (V rounded up to a multiple of tp; the last rank's extra rows are zeros).
        self.vocab_local = -(-cfg.vocab_size // parallel.world_size)
        self.vocab_first = parallel.rank * self.vocab_local
        self.vocab_rows = max(0, min(cfg.vocab_size - self.vocab_first, self.vocab_local))  # real rows
        self.embed_tokens = _param(self.vocab_local, cfg.hidden_size, dtype=dtype, device=device)
        self.rotary = Rotary(
            cfg.head_dim, cfg.rope_theta, max_position or cfg.max_position_embeddings, cfg.rope_scaling, device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, device, quantization, self.rotary, parallel) for i in range(cfg.num_hidden_layers)
        )
        self.stack_spec: ops.DecoderStackSpec | None = None  # set once the weights are final
        head_format = quantization and quantization.for_output_head()
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_variant, dtype, device, head_format and head_format.activation_dtype
        )
        # A tied head reuses the embedding, except with quantized linears: then it gets a copy
        # in the head's format (float32 would be slow).
        self.lm_head = (
            None if cfg.tie_word_embeddings and not quantization
            else make_linear(cfg.hidden_size, self.vocab_local, False, dtype, device, head_format)
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for every input token."""
        x = self.embed(batch.input_ids)
        out = DECLINE if self.stack_spec is None else ops.decoder_stack(self.stack_spec, x, batch)
        x, residual = self.run_layers(x, batch) if out is DECLINE else out
        x, _ = self.norm(x, residual)
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.enabled:
            return self.embed_tokens[ids]
        local = ids - self.vocab_first
        inside = (local >= 0) & (local < self.vocab_rows)
        x = self.embed_tokens[local.clamp(0, self.vocab_local - 1)] * inside[:, None].to(self.dtype)
        return self.parallel.all_reduce(x)  # each token's row comes from the one rank holding it

    def run_layers(self, x: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers one op at a time: (the last layer's output, the residual stream). What a
        fused stack kernel (ops.decoder_stack) must match."""
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        return x, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied and unquantized: the embedding matrix is the output head
            logits = torch.matmul(hidden, self.embed_tokens.t()).float()
        else:
            logits = self.lm_head(hidden).float()
        if not self.parallel.enabled:
            return logits
        return self.parallel.all_gather_last(logits)[:, : self.config.vocab_size]

    # ---- weights -------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; check every parameter is set.

        A tensor may be a lazy slice (safetensors' ``get_slice``): then only this rank's rows
        or columns are read from the file."""
        cfg = self.config
        expected = self._expected_weights()
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            target = expected.get(name)
            if target is None:
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                raise ModelLoadError(f"the weights hold {name!r}, which this {cfg.architecture} config has no place for")
            path, row0, shape, part = target
            if _shape(tensor) != shape:
                raise ModelLoadError(
                    f"config does not match weights: {name} has shape {_shape(tensor)}, the config implies {shape}"
                )
            tensor = _take(tensor, part)
            owner_path, _, attr = path.rpartition(".")
            owner = self.get_submodule(owner_path) if owner_path else self
            if isinstance(owner, Linear) and attr == "weight":
                owner.load_rows(row0, tensor)
            else:
                getattr(owner, attr).data[row0 : row0 + tensor.shape[0]].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ModelLoadError(f"the weights lack {', '.join(missing[:3])}{more}")
        self.finalize()

    def finalize(self) -> None:
        """Repack quantized layers for their kernels once every weight is in place."""
        if self.vocab_rows < self.vocab_local:  # the padding rows of the last rank's vocabulary
            self.embed_tokens.data[self.vocab_rows :].zero_()
            if self.lm_head is not None and not self.config.tie_word_embeddings:
                pad = self.vocab_local - self.vocab_rows
                self.lm_head.load_rows(self.vocab_rows, torch.zeros(pad, self.config.hidden_size))
        if self.config.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.load_rows(0, self.embed_tokens.data)
        for module in self.modules():
            if isinstance(module, Linear):
                module.finalize()
        # The fused stack has no all-reduce between its layers: tensor-parallel ranks run the per-op path.
        self.stack_spec = None if self.parallel.enabled else self._describe_stack()

    def _describe_stack(self) -> ops.DecoderStackSpec:
        """The layers as a fused stack kernel reads them (pagoda/ops/decoder_stack.py)."""
        cfg = self.config
        layers = tuple(
            ops.DecoderLayerSpec(
                qkv=layer.self_attn.qkv_proj.kernel_weight, qkv_bias=layer.self_attn.qkv_proj.bias,
                o=layer.self_attn.o_proj.kernel_weight, gate_up=layer.mlp.gate_up_proj.kernel_weight,
                down=layer.mlp.down_proj.kernel_weight, input_norm=layer.input_layernorm.weight,
                post_attention_norm=layer.post_attention_layernorm.weight,
                lora=None if layer.self_attn.qkv_proj.lora is None else (
                    layer.self_attn.qkv_proj.lora, layer.self_attn.o_proj.lora, layer.mlp.gate_up_proj.lora,
                    layer.mlp.down_proj.lora),
            )
            for layer in self.layers
        )
        return ops.DecoderStackSpec(
            layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.rms_norm_eps, cfg.norm_variant, cfg.head_dim**-0.5, self.dtype,
            self.quantization and self.quantization.activation_dtype, self.rotary.cos, self.rotary.sin,
        )

    # ---- LoRA hooks (filled by the engine's adapter pool, pagoda/lora/) ----------------

    def lora_targets(self) -> dict[str, tuple[str, int, int, int]]:
        """The projections adapters may target, by HF module name ("model.layers.0.self_attn.q_proj")
        -> (our linear's path, first row inside it, rows, input features)."""
        out = {}
        for name, (path, row0, shape, _) in self._expected_weights().items():
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                out[name.removesuffix(".weight")] = (path.removesuffix(".weight"), row0, shape[0], shape[1])
        return out

    def enable_lora(self, slots: int, max_rank: int) -> None:
        """Give every targetable linear a LoRA stack of `slots` adapters of rank <= max_rank
        (a fused projection: max_rank per part)."""
        parts: dict[str, int] = {}
        for path, *_ in self.lora_targets().values():
            parts[path] = parts.get(path, 0) + 1
        device = self.embed_tokens.device
        for path, n in parts.items():
            linear = self.get_submodule(path)
            linear.lora = ops.LoRAStack.empty(slots, n * max_rank, linear.in_features, linear.out_features, device)
        self.stack_spec = self._describe_stack()  # a fused stack kernel adds them too

    def set_lora(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """Put one adapter in a slot: per linear path, its fused A [w, in] and B [out, w] (the
        ops.LoRAStack layout); linears it does not name are cleared."""
        for path, linear in self._lora_linears():
            if path in weights:
                linear.lora.set(slot, *weights[path], scaling)
            else:
                linear.lora.clear(slot)

    def clear_lora(self, slot: int) -> None:
        for _, linear in self._lora_linears():
            linear.lora.clear(slot)

    def _lora_linears(self) -> list[tuple[str, Linear]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Linear) and m.lora is not None]

    def _expected_weights(self) -> dict[str, tuple[str, int, tuple[int, ...], tuple[int, int, int] | None]]:
        """HF name -> (our parameter path, first row inside it, the checkpoint tensor's shape,
        the part this rank keeps: (dim, start, length), or None for all of it)."""
        cfg = self.config
        h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        tp = self.parallel.enabled
        vocab = (0, self.vocab_first, self.vocab_rows) if tp else None
        out: dict[str, tuple[str, int, tuple[int, ...], tuple[int, int, int] | None]] = {
            "model.embed_tokens.weight": ("embed_tokens", 0, (cfg.vocab_size, h), vocab),
            "model.norm.weight": ("norm.weight", 0, (h,), None),
        }
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = ("lm_head.weight", 0, (cfg.vocab_size, h), vocab)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            ql, kvl, il = attn.q_size, attn.kv_size, mlp.inter
            rows = (lambda start, n: (0, start, n)) if tp else (lambda start, n: None)
            cols = (lambda start, n: (1, start, n)) if tp else (lambda start, n: None)
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            out[hf + "input_layernorm.weight"] = (me + "input_layernorm.weight", 0, (h,), None)
            out[hf + "post_attention_layernorm.weight"] = (me + "post_attention_layernorm.weight", 0, (h,), None)
            out[hf + "self_attn.o_proj.weight"] = (me + "self_attn.o_proj.weight", 0, (h, q), cols(attn.q_first, ql))
            out[hf + "mlp.down_proj.weight"] = (me + "mlp.down_proj.weight", 0, (h, inter), cols(mlp.first, il))
            out[hf + "mlp.gate_proj.weight"] = (me + "mlp.gate_up_proj.weight", 0, (inter, h), rows(mlp.first, il))
            out[hf + "mlp.up_proj.weight"] = (me + "mlp.gate_up_proj.weight", il, (inter, h), rows(mlp.first, il))
            parts = (("q", 0, q, attn.q_first, ql), ("k", ql, kv, attn.kv_first, kvl),
                     ("v", ql + kvl, kv, attn.kv_first, kvl))
            for proj, row0, full, start, n in parts:
                out[hf + f"self_attn.{proj}_proj.weight"] = (me + "self_attn.qkv_proj.weight", row0, (full, h),
                                                             rows(start, n))
                if cfg.qkv_bias:
                    out[hf + f"self_attn.{proj}_proj.bias"] = (me + "self_attn.qkv_proj.bias", row0, (full,),
                                                               rows(start, n))
        return out


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def _take(tensor: Any, part: tuple[int, int, int] | None) -> torch.Tensor:
    """This rank's rows or columns of a tensor or a lazy slice (which reads only them)."""
    if part is None:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[:]
    dim, start, n = part
    return tensor[start : start + n] if dim == 0 else tensor[:, start : start + n].contiguous()
