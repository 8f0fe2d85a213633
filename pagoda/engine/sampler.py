"""The batched sampler: one call turns a step's [B, V] logits into B next tokens.

Order (as vLLM): on the raw logits, logit_bias and min_tokens (ban stop/eos tokens), then
repetition/frequency/presence penalties, then each constrained row's grammar mask (-inf on
the tokens its grammar does not allow next); greedy rows take the argmax; the others are
divided by their temperature, filtered by top-k, top-p and min-p, and sampled by an
exponential race. Per-row parameters become [B] tensors once per call, and each stage is
skipped when no row in the batch needs it.

Determinism: a seeded request draws its noise only from its own generator, and every
stage is row-wise, so it samples the same tokens whatever else shares the batch.

Logprobs follow vLLM's default ("raw logprobs"): the log-softmax of the logits as the
model produced them, before bias, penalties, temperature and filtering. They describe
the model's belief, not the sampling distribution (a token banned by min_tokens still
has a finite logprob).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from pagoda.engine.sampling_params import SamplingParams
from pagoda.ops import sampling as sops

if TYPE_CHECKING:
    from pagoda.structured.backend import GrammarMasker
    from pagoda.structured.grammar import GrammarState


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's private RNG (on the logits' device), or None for the global one."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class SamplingRow:
    """What the engine gives the sampler for one sequence in the batch."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = frozenset()
    grammar: "GrammarState | None" = None  # structured output: only tokens it allows are sampled


@dataclass
class SamplerOutput:
    """token_ids: one per row. logprobs: each sampled token's raw logprob, for every row,
    or None when no row asked for logprobs. top_logprobs: per row, params.logprobs pairs of
    (token, logprob) sorted by descending logprob; [] for rows that asked for none."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class TokenLogprobs(NamedTuple):
    token_logprobs: torch.Tensor  # [N] logprob of each given token
    top_ids: torch.Tensor  # [N, k] int64, best first
    top_logprobs: torch.Tensor  # [N, k]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> TokenLogprobs:
    """Log-softmax of each row, the logprob of that row's token, and its top-k alternatives.

    For prompt logprobs pass the logits at positions 0..T-2 with the prompt tokens 1..T-1.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(1, token_ids.to(logits.device).long()[:, None]).squeeze(1)
    k = min(k, logprobs.shape[-1])
    if k > 0:
        # topk lists equal values in no set order; bfloat16 logits tie often. Equal logprobs
        # go lowest token id first, as the greedy pick (the first maximum) does.
        n = min(k + 8, logprobs.shape[-1])
        top = logprobs.topk(n, dim=-1, sorted=True)
        by_id = top.indices.argsort(dim=-1)
        ids, vals = top.indices.gather(1, by_id), top.values.gather(1, by_id)
        ranked = (-vals).argsort(dim=-1, stable=True)[:, :k]
        ids, vals = ids.gather(1, ranked), vals.gather(1, ranked)
        wide = (top.values[:, n - 1] == top.values[:, k - 1]).nonzero().flatten()  # a tie may go past n
        if n < logprobs.shape[-1] and len(wide):
            full = logprobs[wide].sort(dim=-1, descending=True, stable=True)
            ids[wide], vals[wide] = full.indices[:, :k], full.values[:, :k]
        return TokenLogprobs(token_lp, ids, vals)
    empty = logprobs.new_empty(logprobs.shape[0], 0)
    return TokenLogprobs(token_lp, empty.long(), empty)


class Sampler:
    """Stateless: everything per-request arrives in the SamplingRows (the grammar masker it
    builds on first use holds only a reusable bitmask buffer).

    Constrained rows are masked in the given logits in place unless a row asks for logprobs
    (which need the raw logits): copying [B, V] every step would cost as much as the masking.
    """

    def __init__(self) -> None:
        self._masker: GrammarMasker | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits [{len(rows)}, vocab], got {tuple(logits.shape)}")
        if not rows:
            return SamplerOutput(token_ids=[])
        processed = _apply_bias_and_min_tokens(logits.float(), rows)
        processed = _apply_penalties(processed, rows)
        processed = self._apply_grammars(logits, processed, rows)
        tokens = _pick_tokens(processed, rows)
        return _output(logits, tokens, rows)

    def _apply_grammars(self, raw: torch.Tensor, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Mask constrained rows in one batched fill + apply (no Python loop over the vocabulary)."""
        idx = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not idx:
            return logits
        if self._masker is None:
            from pagoda.structured.backend import GrammarMasker

            self._masker = GrammarMasker()
        if logits.data_ptr() == raw.data_ptr() and any(row.params.logprobs is not None for row in rows):
            logits = logits.clone()  # raw logits still feed the logprobs
        bitmask = self._masker(logits, [rows[i].grammar for i in idx], idx)
        # min_tokens bans the stop tokens; where those are all the grammar allows, the grammar wins.
        # (A ban is an out-of-place scatter, so `raw` is intact whenever a row can be dead.)
        banning = [i for i in idx if rows[i].params.min_tokens > len(rows[i].output_ids)]
        if banning:
            ban_t = torch.tensor(banning, dtype=torch.long, device=logits.device)
            dead = logits.index_select(0, ban_t).amax(dim=-1) == float("-inf")
            revive = [i for i, d in zip(banning, dead.tolist()) if d]
            if revive:
                rev_t = torch.tensor(revive, dtype=torch.long, device=logits.device)
                logits.index_copy_(0, rev_t, raw.index_select(0, rev_t).to(logits.dtype))
                self._masker.apply(logits, bitmask, revive)
        return logits


def _apply_bias_and_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logit_bias, and -inf on stop/eos ids while a row is short of min_tokens, in one scatter."""
    vocab = logits.shape[-1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        p = row.params
        for tok, bias in (p.logit_bias or {}).items():
            if tok < vocab:  # ids past the vocab were rejected by validate_token_ids upstream
                row_idx.append(i)
                tok_idx.append(tok)
                values.append(bias)
        if p.min_tokens and len(row.output_ids) < p.min_tokens:
            banned = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | row.eos_token_ids
            for tok in banned:
                if tok < vocab:
                    row_idx.append(i)
                    tok_idx.append(tok)
                    values.append(float("-inf"))
    if not row_idx:
        return logits
    dev = logits.device
    return sops.apply_token_bias(
        logits,
        torch.tensor(row_idx, dtype=torch.long, device=dev),
        torch.tensor(tok_idx, dtype=torch.long, device=dev),
        torch.tensor(values, dtype=logits.dtype, device=dev),
    )


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalise only the rows that set a penalty; histories are counted on the device."""
    idx = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not idx:
        return logits
    sub_rows = [rows[i] for i in idx]
    vocab, dev = logits.shape[-1], logits.device
    output_counts = sops.token_bin_counts(_padded([r.output_ids for r in sub_rows], vocab, dev), vocab)
    if any(r.params.repetition_penalty != 1.0 for r in sub_rows):
        prompt_mask = sops.token_bin_counts(_padded([r.prompt_ids for r in sub_rows], vocab, dev), vocab) > 0
    else:
        prompt_mask = torch.zeros_like(output_counts, dtype=torch.bool)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in sub_rows], dtype=logits.dtype, device=dev)

    all_rows = len(idx) == len(rows)
    idx_t = None if all_rows else torch.tensor(idx, dtype=torch.long, device=dev)
    sub = logits if idx_t is None else logits.index_select(0, idx_t)
    penalised = sops.apply_penalties(
        sub, prompt_mask, output_counts, column("repetition_penalty"), column("frequency_penalty"), column("presence_penalty")
    )
    return penalised if idx_t is None else logits.index_copy(0, idx_t, penalised)


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged id lists -> [N, max_len] (at least 1 wide) padded with `pad`, in one copy."""
    width = max(1, max(len(s) for s in seqs))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def _pick_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Argmax for greedy rows; temperature, top-k/top-p/min-p and a draw for the rest."""
    greedy = [row.params.greedy for row in rows]
    if all(greedy):
        return sops.argmax_rows(logits)
    dev = logits.device
    sample_idx = [i for i, g in enumerate(greedy) if not g]
    srows = [rows[i] for i in sample_idx]
    some_greedy = len(sample_idx) < len(rows)
    sample_t = torch.tensor(sample_idx, dtype=torch.long, device=dev) if some_greedy else None
    x = logits if sample_t is None else logits.index_select(0, sample_t)

    params = [r.params for r in srows]
    if any(p.temperature != 1.0 for p in params):
        x = x / torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)[:, None]
    vocab = x.shape[-1]
    top_k = _column([p.top_k for p in params], torch.long, dev) if any(1 < p.top_k < vocab for p in params) else None
    top_p = _column([p.top_p for p in params], x.dtype, dev) if any(p.top_p < 1.0 for p in params) else None
    min_p = _column([p.min_p for p in params], x.dtype, dev) if any(p.min_p > 0.0 for p in params) else None
    if top_k is not None or top_p is not None or min_p is not None:
        x = sops.apply_top_k_top_p_min_p(x, top_k, top_p, min_p)
    probs = x.softmax(dim=-1)
    sampled = sops.sample_from_probs(probs, _exponential_noise(probs, srows))
    if sample_t is None:
        return sampled
    tokens = sops.argmax_rows(logits)  # cheap next to the sampling path; then overwrite sampled rows
    return tokens.index_copy(0, sample_t, sampled)


def _column(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _exponential_noise(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Exp(1) noise per row: seeded rows from their own generator, the rest from the global RNG."""
    noise = torch.empty_like(probs)
    seeded = [i for i, row in enumerate(rows) if row.generator is not None]
    if not seeded:
        noise.exponential_()
    elif len(seeded) < len(rows):
        unseeded = torch.tensor([i for i, row in enumerate(rows) if row.generator is None], device=probs.device)
        noise.index_copy_(0, unseeded, torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_())
    for i in seeded:
        noise[i].exponential_(generator=rows[i].generator)
    # A zero draw would make 0/0 = NaN for a masked token, and argmax favours NaN.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _output(raw_logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    """Move the tokens to the host; add raw logprobs when any row asked for them."""
    token_ids = tokens.tolist()
    ks = [row.params.logprobs for row in rows]
    if all(k is None for k in ks):
        return SamplerOutput(token_ids=token_ids)
    lp = compute_logprobs(raw_logits, tokens, max(k for k in ks if k is not None))
    top_ids, top_vals = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    tops = [list(zip(top_ids[i][:k], top_vals[i][:k])) if k else [] for i, k in enumerate(ks)]
    return SamplerOutput(token_ids=token_ids, logprobs=lp.token_logprobs.tolist(), top_logprobs=tops)
