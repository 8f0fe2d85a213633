"""Prompt lookup: propose what followed the sequence's last n tokens where they occurred before.

Each sequence keeps an index from every n-gram (min_match <= n <= max_match) of its tokens to
the position just after its latest occurrence, extended incrementally as tokens arrive, so a
proposal costs O(max_match) dictionary look-ups plus the new tokens' entries, whatever the
length of the prompt. The longest suffix that occurred before wins; among its occurrences the
latest (the most recent context is the likeliest to be copied again).

The proposal's length adapts per sequence (see `next_length`): a verified position costs a row
of the target's forward whether or not it is accepted, so a sequence whose proposals keep
failing halves its proposals down to one token, and doubles them again once one is accepted whole.
"""

from __future__ import annotations

from typing import Sequence


class NgramIndex:
    """n-gram -> end of its latest occurrence that has a token after it."""

    __slots__ = ("min_n", "max_n", "table", "indexed", "length")

    def __init__(self, min_n: int, max_n: int, length: int = 0) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.table: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the table
        self.length = length  # the sequence's current proposal length (adaptive)

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of ids' suffix."""
        end = len(ids) - 1  # n-grams ending at end have no following token yet
        table, lo, hi = self.table, self.min_n, self.max_n
        if self.indexed > end:  # the sequence got shorter (not in the engine; be safe)
            table.clear()
            self.indexed = 0
        for e in range(max(self.indexed, lo), end + 1):
            for n in range(lo, min(hi, e) + 1):
                table[tuple(ids[e - n : e])] = e
        self.indexed = end + 1
        for n in range(min(hi, len(ids)), lo - 1, -1):
            pos = table.get(tuple(ids[len(ids) - n :]))
            if pos is not None:
                return list(ids[pos : pos + k])
        return []


def next_length(length: int, proposed: int, accepted: int, k: int) -> int:
    """The next proposal's length: after a rejection, half the current length (or what was accepted
    plus one, if more); after a proposal accepted whole, twice its length (at most k)."""
    if accepted < proposed:
        return max(accepted + 1, length // 2)
    return min(k, max(length, 2 * proposed, 2))


class NgramProposer:
    def __init__(self, num_draft_tokens: int, min_match: int, max_match: int) -> None:
        self.k, self.min_match, self.max_match = num_draft_tokens, min_match, max_match

    def propose(self, reqs: Sequence, limits: Sequence[int]) -> None:
        """Set each request's draft (at most its limit of tokens)."""
        for req, limit in zip(reqs, limits):
            index = req.spec_state
            if index is None:
                index = req.spec_state = NgramIndex(self.min_match, self.max_match, self.k)
            n = min(index.length, limit)
            req.draft = index.propose(req.all_ids, n) if n > 0 else []

    def verified(self, req, proposed: int, accepted: int) -> None:
        """Feedback after verification: adapt the sequence's proposal length."""
        index = req.spec_state
        if index is not None:
            index.length = next_length(index.length, proposed, accepted, self.k)

    def release(self, req) -> None:
        req.spec_state = None

    def check_integrity(self, idle: bool) -> None:
        pass
