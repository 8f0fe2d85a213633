"""Sampling primitives as dispatchable ops: the batched, per-row-parameter building blocks
the Sampler chains together. Each works on a [B, V] float tensor, takes one parameter per
row as a [B] tensor, and returns a new tensor (inputs are never modified), so a platform
can swap in a fused kernel for any one of them without the others noticing.
"""

from __future__ import annotations

import torch

from pagoda.ops.registry import reference


@reference("token_bin_counts")
def token_bin_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Count each token per row: [B, L] ids padded with `vocab_size` -> [B, V] int32 counts.

    Padding with an out-of-vocab id (counted in a spare column that is dropped) lets ragged
    histories share one scatter instead of a loop over rows.
    """
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids.long(), torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


@reference("apply_token_bias")
def apply_token_bias(
    logits: torch.Tensor, row_idx: torch.Tensor, token_idx: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Add sparse per-(row, token) values to the logits (duplicates add up).

    Serves both logit_bias and min_tokens (a -inf entry bans a token), which is why
    duplicates accumulate: a biased stop token that is also banned stays -inf.
    """
    return logits.index_put((row_idx.long(), token_idx.long()), values.to(logits.dtype), accumulate=True)


@reference("apply_penalties")
def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties. prompt_mask: [B, V] bool (token in prompt); output_counts: [B, V].

    Repetition (CTRL-style, over prompt and output tokens): a seen token's logit is divided
    by the penalty when positive and multiplied when not, so a penalty > 1 always lowers it.
    Frequency/presence (OpenAI, output tokens only): logit -= freq * count + presence * (count > 0).
    Neutral values (1, 0, 0) leave a row exactly unchanged.
    """
    counts = output_counts.to(logits.dtype)
    seen = prompt_mask | (output_counts > 0)
    rep = repetition_penalties.to(logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalised, logits)
    out = out - frequency_penalties.to(logits.dtype)[:, None] * counts
    return out - presence_penalties.to(logits.dtype)[:, None] * (counts > 0).to(logits.dtype)


@reference("apply_top_k_top_p_min_p")
def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Mask (to -inf) the tokens each row's top-k, then top-p, then min-p filter drops.

    top_k: [B] int, keeps the k highest logits (ties with the k-th are kept); <= 0 or >= V is off.
    top_p: [B] float, keeps the smallest prefix of tokens, by descending probability (after
        top-k), whose mass reaches p; >= 1 is off. The most likely token always survives.
    min_p: [B] float, drops tokens with prob < min_p * max prob; <= 0 is off.
    None skips a filter for the whole batch (and the sort it would need).
    """
    if top_p is not None:
        logits = _top_k_top_p_sorted(logits, top_k, top_p)
    elif top_k is not None:
        logits = _top_k_only(logits, top_k)
    if min_p is not None:
        # p_i < min_p * p_max  <=>  l_i < l_max + log(min_p); log(0) = -inf keeps everything.
        log_min_p = torch.log(min_p.to(logits.dtype).clamp(min=0.0))[:, None]
        cutoff = logits.max(dim=-1, keepdim=True).values + log_min_p
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def _k_threshold_index(top_k: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: index of the k-th largest (0-based) and whether top-k is on for that row."""
    k = top_k.long()
    on = (k > 0) & (k < vocab)
    return (torch.where(on, k, torch.ones_like(k)) - 1)[:, None], on[:, None]


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: topk(max k) then each row's own threshold."""
    vocab = logits.shape[-1]
    kth, on = _k_threshold_index(top_k, vocab)
    max_k = int(kth.max().item()) + 1
    top_vals = logits.topk(max_k, dim=-1, sorted=True).values
    threshold = top_vals.gather(1, kth).masked_fill(~on, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """One descending sort serves both filters; the result is scattered back to vocab order."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth, on = _k_threshold_index(top_k, logits.shape[-1])
        threshold = sorted_logits.gather(1, kth).masked_fill(~on, float("-inf"))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = top_p.to(probs.dtype)[:, None]
    # Rows with p >= 1 are skipped outright: cumsum rounding could otherwise reach p early.
    drop = (mass_before >= p) & (p < 1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@reference("sample_from_probs")
def sample_from_probs(probs: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax(p / q) with q ~ Exp(1) draws token i with probability p_i.

    Taking the noise as an argument keeps the op deterministic and lets the caller draw
    each row's noise from that request's own generator. Returns [B] int64.
    """
    return argmax_rows(probs / exp_noise)


@reference("argmax_rows")
def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum, the first one on ties: [B, V] -> [B] int64. Greedy
    decoding's whole sampler. (torch's CPU ``max(dim)`` is ~2.7x faster than ``argmax(dim)``.)"""
    return x.max(dim=-1).indices
