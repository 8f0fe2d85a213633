"""Radix prefix cache over token ids, at page granularity (RadixAttention-style).

Only FULL pages are cached and shared: a page's KV depends on every token
before it, so a node's pages are valid only under its exact path from the root.

Ownership (who holds an allocator reference on which page)::

    +-----------------------------+----------------------------+---------------------------+
    | pages                       | references                 | safe from eviction while  |
    +-----------------------------+----------------------------+---------------------------+
    | matched prefix (tree's)     | tree: 1                    | the request locks handle  |
    | request's own (from alloc)  | request: 1                 | not in the tree at all    |
    | own, after insert() took it | tree: 1 (+ request's, till | the request holds its ref |
    |                             | the request decrefs)       | (then: plain LRU)         |
    +-----------------------------+----------------------------+---------------------------+

A request's life: ``m = match_prefix(t)``; ``lock(m.handle)`` at once (before
anything can evict); ``alloc`` its own pages for the rest. When done, with
``kv`` the tokens whose KV was written (prompt + output minus the last sampled
token): ``insert(kv, (m.pages + own)[: len(kv) // page_size])``, then
``decref(own)`` (this frees the duplicates the insert reported and the partial
tail page; pages the tree took keep its ref) and ``unlock(m.handle)``. The
request never decrefs the matched prefix pages: it holds no reference on them.

Conservation, checked by the scheduler when no request runs:
``allocator.num_free() + tree.cached_pages() == allocator.num_pages``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagoda.cache.page_allocator import NULL_PAGE, PageAllocator


@dataclass(eq=False)
class RadixNode:
    """One compressed edge: ``key`` tokens (whole pages) stored in ``pages``."""

    key: tuple[int, ...]
    pages: list[int]
    parent: RadixNode | None = field(repr=False)
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0  # locks on this node or below: > 0 means pinned
    last_access: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    """A cached prefix: ``pages`` hold its first ``num_tokens`` tokens; lock ``handle`` to pin it."""

    pages: list[int]
    num_tokens: int
    handle: RadixNode


class RadixTree:
    """Prefix cache over token ids at page granularity: only FULL pages are cached/shared."""

    def __init__(self, allocator: PageAllocator, enabled: bool = True) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.enabled = enabled
        self.hit_tokens = 0
        self.queried_tokens = 0
        self._root = RadixNode(key=(), pages=[], parent=None)
        self._clock = itertools.count(1)
        self._cached = 0  # pages held by the tree
        self._locked = 0  # pages in nodes with lock_ref > 0

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached page-aligned prefix, leaving at least the last token to compute."""
        self.queried_tokens += len(token_ids)
        ps = self.page_size
        limit = max(len(token_ids) - 1, 0) // ps * ps if self.enabled else 0
        now = next(self._clock)
        node, pos = self._root, 0
        pages: list[int] = []
        while pos < limit:
            child = node.children.get(tuple(token_ids[pos : pos + ps]))
            if child is None:
                break
            n = self._common_pages(child.key, token_ids, pos, limit)
            if n < len(child.pages):
                child = self._split(child, n)
            node, pos = child, pos + n * ps
            node.last_access = now
            pages.extend(node.pages)
        self.hit_tokens += pos
        return PrefixMatch(pages=pages, num_tokens=pos, handle=node)

    def lock(self, handle: RadixNode) -> None:
        """Pin the path from ``handle`` to the root against eviction."""
        for node in self._path(handle):
            if node.lock_ref == 0:
                self._locked += len(node.pages)
            node.lock_ref += 1

    def unlock(self, handle: RadixNode) -> None:
        path = self._path(handle)
        if any(node.lock_ref == 0 for node in path):
            raise ValueError("unlock of a path that is not locked")
        for node in path:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked -= len(node.pages)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Cache the full pages of a sequence; return how many leading pages were already cached.

        ``token_ids`` must cover ``len(pages) * page_size`` tokens (a longer tail is
        ignored). The tree increfs every page it newly holds; the caller's pages
        for the already-cached prefix are left to the caller (to free if duplicates).
        """
        ps = self.page_size
        end = len(pages) * ps
        if len(token_ids) < end:
            raise ValueError(f"{len(pages)} pages need {end} tokens, got {len(token_ids)}")
        if not self.enabled:
            return 0
        now = next(self._clock)
        node, i = self._root, 0
        while i < len(pages):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                new = list(pages[i:])
                self.allocator.incref(new)
                child = RadixNode(key=tuple(token_ids[i * ps : end]), pages=new, parent=node)
                node.children[child.key[:ps]] = child
                self._cached += len(new)
                child.last_access = now
                return i
            n = self._common_pages(child.key, token_ids, i * ps, end)
            if n < len(child.pages):
                child = self._split(child, n)
            node, i = child, i + n
            node.last_access = now
        return i

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` unlocked pages, least recently used leaves first (leaves that
        running requests still hold stay).

        A leaf's deepest pages go first (it is trimmed if only part is needed);
        a parent left childless joins the candidates.
        """
        order = itertools.count()
        heap = [(n.last_access, next(order), n) for n in self._nodes() if self._is_evictable_leaf(n)]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, node = heapq.heappop(heap)
            take = min(num_pages - len(freed), len(node.pages))
            freed.extend(node.pages[len(node.pages) - take :])
            if take < len(node.pages):
                del node.pages[len(node.pages) - take :]
                node.key = node.key[: len(node.pages) * self.page_size]
                break
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[: self.page_size]]
            node.parent = None  # detached: stale handles are rejected by lock()
            if self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        self.allocator.decref(freed)
        self._cached -= len(freed)
        return len(freed)

    def evictable_pages(self) -> int:
        return self._cached - self._locked

    def cached_pages(self) -> int:
        return self._cached

    def pages(self) -> list[int]:
        """Every page the tree holds (for leak and refcount checks)."""
        return [page for node in self._nodes() for page in node.pages]

    def reset(self) -> None:
        """Drop every unlocked page (a cache flush); locked paths and counters stay."""
        self.evict(self.evictable_pages())

    def check_integrity(self) -> None:
        """Raise AssertionError if any structural or bookkeeping invariant is broken."""
        ps = self.page_size
        seen: set[int] = set()
        locked = 0
        for node in self._nodes():
            _check(len(node.pages) >= 1 and len(node.key) == len(node.pages) * ps, "key/pages mismatch")
            parent = node.parent
            if parent is None or parent.children.get(node.key[:ps]) is not node:
                raise AssertionError("node not linked from its parent under its first page")
            _check(node.lock_ref >= max(0, sum(c.lock_ref for c in node.children.values())), "bad lock_ref")
            _check(parent is self._root or node.last_access <= parent.last_access, "child newer than parent")
            for page in node.pages:
                _check(page != NULL_PAGE and page not in seen, f"page {page} is null or held twice")
                _check(self.allocator.refcount(page) >= 1, f"page {page} held but free")
                seen.add(page)
            locked += len(node.pages) if node.lock_ref > 0 else 0
        _check(len(seen) == self._cached, f"cached count {self._cached} != {len(seen)} pages held")
        _check(locked == self._locked, f"locked count {self._locked} != {locked}")

    def _nodes(self) -> list[RadixNode]:
        """Every node but the root."""
        out: list[RadixNode] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _is_evictable_leaf(self, node: RadixNode) -> bool:
        """An unlocked leaf whose pages only the tree holds: one a running request holds too (a
        prompt cached for its siblings) would free nothing and only stop the sharing. Its deepest
        page tells: a request holds a leaf's pages through the end (matches split nodes there)."""
        return (node is not self._root and not node.children and node.lock_ref == 0
                and (not node.pages or self.allocator.refcount(node.pages[-1]) == 1))

    def _path(self, handle: RadixNode) -> list[RadixNode]:
        """Nodes from ``handle`` up to (not including) the root."""
        path: list[RadixNode] = []
        node = handle
        while node is not self._root:
            if node.parent is None:
                raise ValueError("handle was evicted (lock right after match_prefix)")
            path.append(node)
            node = node.parent
        return path

    def _common_pages(self, key: tuple[int, ...], token_ids: Sequence[int], start: int, end: int) -> int:
        """Number of leading whole pages on which ``key`` and ``token_ids[start:end]`` agree."""
        ps = self.page_size
        n, most = 0, min(len(key), end - start) // ps
        while n < most and key[n * ps : (n + 1) * ps] == tuple(token_ids[start + n * ps : start + (n + 1) * ps]):
            n += 1
        return n

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut ``child`` after ``n`` pages; return the new upper node (``child`` keeps its identity)."""
        ps = self.page_size
        parent = child.parent
        assert parent is not None
        upper = RadixNode(
            key=child.key[: n * ps],
            pages=child.pages[:n],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        child.key, child.pages, child.parent = child.key[n * ps :], child.pages[n:], upper
        upper.children[child.key[:ps]] = child
        parent.children[upper.key[:ps]] = upper
        return upper


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
