"""StepCost: how long an engine step will take, so that prompt chunks can be sized by time.

Why: a token budget bounds a step's rows, not its time. A prompt chunk's attention grows with
the context it reads, so 512 tokens after a 30K-token cached prefix make a step of ~2.5 s on a
2-core CPU, and every decoding stream waits that long for its next token. With a predicted
cost per step the scheduler cuts such a chunk to what fits a time budget (--max-step-ms).

The model is linear in what a step does: a step of T tokens that attend to P (query, key)
pairs in all takes about

    fixed_ms + per_token_ms * T + per_pair_ms * P

(the linears cost per row, attention per pair, the rest per step). `calibrate` fits it at
start-up from three timed forwards of the real model on synthetic chunks; tests hand the
scheduler a model of their own.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

MIN_CHUNK = 32  # a prompt chunk is never cut below this, so a long prompt always progresses

# Calibration shapes: short and long chunks at the start of a sequence (per token), the short
# one again after a long context (per pair). Chunks of up to 256 tokens are the ones a budget
# leaves at long contexts, so they set the attention cost; the context is long enough that its
# keys come from memory, as they do in the contexts a budget is for (after 2,048 tokens, which
# stay in cache, a 60K context's steps ran over: the stream beside it waited up to 0.66 s, 0.51 s
# calibrated at 16K).
_SHORT, _LONG, _CONTEXT = 64, 256, 16384
_REPEATS = 2  # the faster of two: a shared machine adds noise, never speed


def attention_pairs(start: int, n: int) -> int:
    """(query, key) pairs of n tokens at positions start, start+1, ...: each attends to the
    context up to and including itself."""
    return n * start + n * (n + 1) // 2


@dataclass(frozen=True)
class StepCost:
    per_token_ms: float
    per_pair_ms: float
    fixed_ms: float

    def chunk_ms(self, start: int, n: int) -> float:
        """What a chunk of n tokens at position `start` adds to its step."""
        return self.per_token_ms * n + self.per_pair_ms * attention_pairs(start, n)

    def fit(self, start: int, ms: float) -> int:
        """The most tokens a chunk at `start` can have and cost at most `ms`."""
        if ms <= 0:
            return 0
        # chunk_ms(start, n) = q n^2 + p n, with q = per_pair / 2 and p = per_token + per_pair (start + 1/2)
        q = self.per_pair_ms / 2
        p = self.per_token_ms + self.per_pair_ms * (start + 0.5)
        if q == 0:
            return math.floor(ms / p) if p > 0 else sys.maxsize
        n = math.floor((math.sqrt(p * p + 4 * q * ms) - p) / (2 * q))
        return n - 1 if n > 0 and self.chunk_ms(start, n) > ms else n  # floating point at the edge

    def keeps(self, max_ms: float) -> bool:
        """Whether a step with one minimum prompt chunk fits `max_ms`. If not, cutting chunks
        cannot bound the step (measured on a busy host, say) and would only slow prompts down."""
        return self.fixed_ms + self.chunk_ms(0, MIN_CHUNK) <= max_ms

    def __str__(self) -> str:
        return (f"{self.fixed_ms:.1f} ms + {self.per_token_ms:.3f} ms per token "
                f"+ {self.per_pair_ms * 1e6:.1f} ms per million attended (query, key) pairs")


class StepBudget:
    """One step's time as the scheduler fills it: each chunk spends its predicted cost. Without
    a cost model, or with a budget of 0, it never cuts a chunk (steps bounded in tokens only)."""

    def __init__(self, cost: StepCost | None, max_ms: float) -> None:
        self.cost = cost if max_ms > 0 else None
        self.left_ms = max_ms - cost.fixed_ms if self.cost is not None else math.inf

    def spend(self, start: int, n: int) -> None:
        if self.cost is not None:
            self.left_ms -= self.cost.chunk_ms(start, n)

    def cap(self, start: int, n: int) -> int:
        """A prompt chunk of up to n tokens at `start`, cut to the time left but not below MIN_CHUNK."""
        if self.cost is None:
            return n
        return min(n, max(MIN_CHUNK, self.cost.fit(start, self.left_ms)))


def calibrate(time_chunk: Callable[[int, int], float], context_length: int) -> StepCost:
    """Fit a StepCost to forwards timed by `time_chunk(n, start)` (milliseconds of a step that
    computes n tokens at positions start..start+n-1), within the model's context length."""
    long = min(_LONG, context_length // 2)
    short = max(1, long // 4)
    context = max(1, min(_CONTEXT, context_length - short))

    def fastest(n: int, start: int) -> float:
        return min(time_chunk(n, start) for _ in range(_REPEATS))

    t_short, t_long, t_context = fastest(short, 0), fastest(long, 0), fastest(short, context)
    per_pair = max(0.0, (t_context - t_short) / (short * context))
    extra_pairs = attention_pairs(0, long) - attention_pairs(0, short)
    per_token = max(0.0, (t_long - t_short - per_pair * extra_pairs) / max(1, long - short))
    fixed = max(0.0, t_short - per_token * short - per_pair * attention_pairs(0, short))
    return StepCost(per_token_ms=per_token, per_pair_ms=per_pair, fixed_ms=fixed)


def timed_forward(runner, allocator, synchronize: Callable[[], None]) -> Callable[[int, int], float]:
    """time_chunk for `calibrate`: one forward of the model runner over a synthetic sequence.
    Its page table cycles over the warm pages free now (given back after), so a small pool serves
    a long context too, the keys come from backed memory as in serving (never-written memory reads
    as one shared zero page), and no cold page is marked warm; the attention reads whatever keys
    they hold, which the timing ignores."""

    def time_chunk(n: int, start: int) -> float:
        need = -(-(start + n) // allocator.page_size)
        pages = allocator.alloc(min(need, max(1, allocator.num_free() - allocator.num_cold_free())))
        try:
            table = [pages[i % len(pages)] for i in range(need)]
            t = time.perf_counter()
            runner.forward(runner.prepare([([0] * n, start, table)]))
            synchronize()
            return (time.perf_counter() - t) * 1e3
        finally:
            allocator.decref(pages)

    return time_chunk
