from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from pagoda.cache import PageAllocator, PrefixMatch, RadixTree


def make(num_pages: int = 32, page_size: int = 4, enabled: bool = True) -> tuple[PageAllocator, RadixTree]:
    alloc = PageAllocator(num_pages, page_size)
    return alloc, RadixTree(alloc, enabled=enabled)


def cache(alloc: PageAllocator, tree: RadixTree, tokens: list[int]) -> list[int]:
    """Run a request that computed everything itself: alloc, insert, drop its own refs."""
    pages = alloc.alloc(len(tokens) // alloc.page_size)
    assert pages is not None
    tree.insert(tokens, pages)
    alloc.decref(pages)
    return pages


def conserved(alloc: PageAllocator, tree: RadixTree) -> bool:
    return alloc.num_free() + tree.cached_pages() == alloc.num_pages


def test_insert_then_match_returns_pages_of_longest_aligned_prefix() -> None:
    alloc, tree = make(page_size=4)
    a = list(range(100, 116))
    pages = cache(alloc, tree, a)
    assert tree.insert(a, pages) == 4  # all already there: nothing new, no extra refs
    assert all(alloc.refcount(p) == 1 for p in pages)
    m = tree.match_prefix(a + [7])
    assert (m.pages, m.num_tokens) == (pages, 16)
    m = tree.match_prefix(a[:10] + [1, 2, 3])  # diverges inside page 2
    assert (m.pages, m.num_tokens) == (pages[:2], 8)
    m = tree.match_prefix([5] + a)
    assert (m.pages, m.num_tokens) == ([], 0)
    tree.check_integrity()
    assert conserved(alloc, tree)


def test_match_is_capped_to_leave_one_token() -> None:
    alloc, tree = make(page_size=4)
    a = list(range(16))
    pages = cache(alloc, tree, a)
    assert tree.match_prefix(a).num_tokens == 12  # exact hit still recomputes the last page
    assert tree.match_prefix(a[:13]).pages == pages[:3]
    assert tree.match_prefix(a[:12]).num_tokens == 8
    assert tree.match_prefix([]).num_tokens == 0
    alloc1, tree1 = make(page_size=1)
    cache(alloc1, tree1, [1, 2, 3])
    assert tree1.match_prefix([1, 2, 3]).num_tokens == 2
    assert tree1.match_prefix([1]).num_tokens == 0
    tree.check_integrity()
    tree1.check_integrity()


def test_partial_page_tail_is_never_cached_or_matched() -> None:
    alloc, tree = make(page_size=4)
    a = list(range(10))  # 2 full pages + 2 tail tokens
    pages = alloc.alloc(3)
    assert pages is not None
    assert tree.insert(a, pages[:2]) == 0
    alloc.decref(pages)
    assert tree.cached_pages() == 2 and alloc.refcount(pages[2]) == 0
    assert tree.match_prefix(a + [50, 51]).num_tokens == 8
    with pytest.raises(ValueError):
        tree.insert(a, pages)  # 3 pages need 12 tokens


def test_match_inside_an_edge_splits_it_at_a_page_boundary() -> None:
    alloc, tree = make(page_size=2)
    a = [1, 1, 2, 2, 3, 3, 4, 4]
    pages = cache(alloc, tree, a)
    m = tree.match_prefix(a[:5])
    assert m.num_tokens == 4 and m.handle.pages == pages[:2] and m.handle.key == (1, 1, 2, 2)
    (lower,) = m.handle.children.values()
    assert lower.pages == pages[2:] and lower.key == (3, 3, 4, 4) and lower.parent is m.handle
    tree.check_integrity()
    assert tree.match_prefix(a + [9]).pages == pages  # the split path still matches whole
    assert tree.cached_pages() == 4


def test_sequences_sharing_a_prefix_share_pages() -> None:
    alloc, tree = make(page_size=2)
    a = [1, 1, 2, 2, 3, 3, 4, 4]
    b = [1, 1, 2, 2, 5, 5, 6, 6]
    pa = cache(alloc, tree, a)
    pb = alloc.alloc(4)
    assert pb is not None
    assert tree.insert(b, pb) == 2  # caller's pb[:2] are duplicates
    alloc.decref(pb)
    assert alloc.refcount(pb[0]) == alloc.refcount(pb[1]) == 0
    assert tree.match_prefix(b + [0]).pages == pa[:2] + pb[2:]
    assert tree.match_prefix(a + [0]).pages == pa
    assert tree.cached_pages() == 6
    tree.check_integrity()
    assert conserved(alloc, tree)


def test_locked_paths_are_never_evicted() -> None:
    alloc, tree = make(page_size=2)
    pa = cache(alloc, tree, [1, 1, 2, 2, 3, 3])
    pb = cache(alloc, tree, [1, 1, 4, 4])
    m = tree.match_prefix([1, 1, 2, 2, 3, 3, 9])
    tree.lock(m.handle)
    assert tree.evictable_pages() == 1
    assert tree.evict(100) == 1  # only b's own page
    assert alloc.refcount(pb[1]) == 0 and all(alloc.refcount(p) == 1 for p in pa)
    tree.reset()
    assert tree.match_prefix([1, 1, 2, 2, 3, 3, 9]).pages == pa
    tree.check_integrity()
    tree.unlock(m.handle)
    with pytest.raises(ValueError):
        tree.unlock(m.handle)
    assert tree.evict(100) == 3
    assert alloc.num_free() == alloc.num_pages
    tree.check_integrity()


def test_lock_of_an_evicted_handle_raises() -> None:
    alloc, tree = make(page_size=2)
    cache(alloc, tree, [1, 1, 2, 2])
    m = tree.match_prefix([1, 1, 2, 2, 3])
    tree.evict(2)
    with pytest.raises(ValueError):
        tree.lock(m.handle)


def test_eviction_is_lru_and_cascades_to_parents() -> None:
    alloc, tree = make(page_size=1)
    x = cache(alloc, tree, [1, 2, 3])
    y = cache(alloc, tree, [1, 2, 4])  # y[:2] are freed duplicates of x[:2]
    z = cache(alloc, tree, [5, 6])
    tree.match_prefix([5, 6, 0])
    tree.match_prefix([1, 2, 3, 0])  # x most recent, then z, then y
    assert tree.evict(1) == 1 and alloc.refcount(y[2]) == 0
    assert tree.evict(1) == 1 and alloc.refcount(z[1]) == 0  # deepest page of a leaf first
    assert tree.match_prefix([5, 6, 0]).pages == z[:1]  # z's rest is now the newest
    assert tree.evict(1) == 1 and alloc.refcount(x[2]) == 0
    assert tree.evict(2) == 2 and alloc.refcount(x[1]) == alloc.refcount(x[0]) == 0  # parent [1, 2]
    assert tree.cached_pages() == 1 and tree.match_prefix([5, 0]).pages == z[:1]
    tree.check_integrity()
    assert conserved(alloc, tree)


def test_evict_frees_pages_to_the_allocator() -> None:
    alloc, tree = make(num_pages=8, page_size=4)
    pages = cache(alloc, tree, list(range(24)))
    assert alloc.num_free() == 2 and alloc.alloc(3) is None
    assert tree.evict(3) == 3
    assert alloc.num_free() == 5 and sorted(p for p in pages if alloc.refcount(p) == 0) == sorted(pages[3:])
    assert tree.evict(0) == 0
    tree.reset()
    assert tree.cached_pages() == 0 and alloc.num_free() == 8


def test_disabled_tree_caches_nothing() -> None:
    alloc, tree = make(page_size=2, enabled=False)
    a = [1, 1, 2, 2, 3]
    pages = alloc.alloc(2)
    assert pages is not None
    assert tree.insert(a, pages) == 0
    alloc.decref(pages)
    assert alloc.num_free() == alloc.num_pages and tree.cached_pages() == 0
    m = tree.match_prefix(a)
    assert (m.pages, m.num_tokens) == ([], 0)
    tree.lock(m.handle)
    tree.unlock(m.handle)
    assert tree.queried_tokens == 5 and tree.hit_tokens == 0


def test_hit_and_query_counters() -> None:
    alloc, tree = make(page_size=4)
    cache(alloc, tree, list(range(8)))
    tree.match_prefix(list(range(10)))  # hits 8 of 10
    tree.match_prefix(list(range(8)))  # hits 4 of 8 (cap)
    tree.match_prefix([9, 9, 9])  # hits 0 of 3
    assert (tree.hit_tokens, tree.queried_tokens) == (12, 21)


@dataclass
class _Running:
    tokens: list[int]
    match: PrefixMatch
    own: list[int]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_randomized_workload_keeps_every_invariant(page_size: int) -> None:
    rng = random.Random(1234 + page_size)
    ps = page_size
    alloc, tree = make(num_pages=40, page_size=ps)
    content: dict[int, tuple[int, ...]] = {}  # page -> the token prefix its KV was computed for
    bases = [[rng.randrange(3) for _ in range(5 * ps)] for _ in range(3)]
    running: list[_Running] = []
    hits = queried = 0

    def prompt() -> list[int]:
        base = rng.choice(bases)
        return base[: rng.randint(0, len(base))] + [rng.randrange(4) for _ in range(rng.randint(1, 3 * ps))]

    def match(tokens: list[int]) -> PrefixMatch:
        nonlocal hits, queried
        m = tree.match_prefix(tokens)
        hits, queried = hits + m.num_tokens, queried + len(tokens)
        assert m.num_tokens == len(m.pages) * ps <= len(tokens) - 1
        for i, page in enumerate(m.pages):
            assert content[page] == tuple(tokens[: (i + 1) * ps])
        cached = {content[p] for p in tree.pages()}
        assert len(cached) == tree.cached_pages()  # never two pages for one prefix
        if m.num_tokens + ps <= len(tokens) - 1:
            assert tuple(tokens[: m.num_tokens + ps]) not in cached  # longest
        return m

    for _ in range(600):
        op = rng.choice(["start", "start", "finish", "finish", "match", "evict", "reset"])
        if op == "start" and len(running) < 6:
            tokens = prompt()
            m = match(tokens)
            tree.lock(m.handle)
            need = -(-len(tokens) // ps) - len(m.pages)
            if alloc.num_free() < need:
                tree.evict(need - alloc.num_free())
            own = alloc.alloc(need)
            if own is None:
                tree.unlock(m.handle)
            else:
                for j, page in enumerate(own, start=len(m.pages)):
                    content[page] = tuple(tokens[: (j + 1) * ps])
                running.append(_Running(tokens, m, own))
        elif op == "finish" and running:
            r = running.pop(rng.randrange(len(running)))
            full = len(r.tokens) // ps
            assert tree.insert(r.tokens, (r.match.pages + r.own)[:full]) >= len(r.match.pages)
            alloc.decref(r.own)
            tree.unlock(r.match.handle)
        elif op == "match":
            match(prompt())
        elif op == "evict":
            n, evictable, free = rng.randint(0, 2 * ps), tree.evictable_pages(), alloc.num_free()
            assert tree.evict(n) == min(n, evictable) == alloc.num_free() - free
        elif op == "reset":
            tree.reset()
            assert tree.evictable_pages() == 0

        tree.check_integrity()
        holders = Counter(tree.pages()) + Counter(p for r in running for p in r.own)
        assert all(alloc.refcount(p) == holders[p] for p in range(1, alloc.num_pages + 1))
        if not running:
            assert conserved(alloc, tree)
    assert (tree.hit_tokens, tree.queried_tokens) == (hits, queried) and hits > 0
