from __future__ import annotations

import pytest

from pagoda.cache import NULL_PAGE, PageAllocator


def test_usable_pages_exclude_the_null_page() -> None:
    alloc = PageAllocator(num_pages=4, page_size=16)
    assert alloc.num_free() == 4
    assert alloc.num_storage_pages == 5
    pages = alloc.alloc(4)
    assert pages is not None and sorted(pages) == [1, 2, 3, 4]
    assert NULL_PAGE not in pages
    with pytest.raises(ValueError):
        alloc.refcount(NULL_PAGE)


def test_alloc_is_all_or_nothing() -> None:
    alloc = PageAllocator(num_pages=5, page_size=4)
    assert alloc.alloc(3) is not None
    assert alloc.alloc(3) is None
    assert alloc.num_free() == 2
    assert alloc.alloc(0) == []
    assert alloc.alloc(2) is not None
    assert alloc.num_free() == 0
    with pytest.raises(ValueError):
        alloc.alloc(-1)


def test_no_page_handed_out_twice() -> None:
    alloc = PageAllocator(num_pages=64, page_size=1)
    held: list[int] = []
    for n in [1, 7, 3, 20, 5]:
        got = alloc.alloc(n)
        assert got is not None and len(got) == n
        held += got
    alloc.decref(held[5:15])
    del held[5:15]
    held += alloc.alloc(alloc.num_free()) or []
    assert len(held) == len(set(held)) == 64


def test_free_restores_pages() -> None:
    alloc = PageAllocator(num_pages=8, page_size=2)
    pages = alloc.alloc(8)
    assert pages is not None
    alloc.decref(pages[:3])
    assert alloc.num_free() == 3
    again = alloc.alloc(3)
    assert again is not None and sorted(again) == sorted(pages[:3])


def test_refcounts() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    pages = alloc.alloc(2)
    assert pages is not None
    a, b = pages
    assert alloc.refcount(a) == alloc.refcount(b) == 1
    alloc.incref([a, a])
    assert alloc.refcount(a) == 3
    alloc.decref([a])
    alloc.decref([a])
    assert alloc.refcount(a) == 1 and alloc.num_free() == 2
    alloc.decref([a, b])
    assert alloc.refcount(a) == 0 and alloc.num_free() == 4


def test_double_free_raises_and_changes_nothing() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    pages = alloc.alloc(2)
    assert pages is not None
    a, b = pages
    alloc.decref([a])
    with pytest.raises(ValueError):
        alloc.decref([a])
    with pytest.raises(ValueError):
        alloc.decref([b, b])  # one reference, two drops: rejected as a whole
    assert alloc.refcount(b) == 1 and alloc.num_free() == 3


def test_incref_of_free_page_raises() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    with pytest.raises(ValueError):
        alloc.incref([1])
    with pytest.raises(ValueError):
        alloc.incref([5])  # out of range


def test_cold_pages_are_those_never_handed_out_past_the_warm_ones() -> None:
    """Pages 1..warm are backed already (prefaulted); a fresh page past them is cold until it is
    first handed out, and freeing it keeps it warm. Without a count, every page is warm."""
    a = PageAllocator(10, 4, warm_pages=3)
    assert a.num_cold_free() == 7
    first = a.alloc(5)  # 1..5: two of them were cold
    assert a.num_cold_free() == 5 and a.num_free() == 5
    a.decref(first)
    assert a.num_cold_free() == 5 and a.num_free() == 10
    assert a.alloc(5) == first[::-1]  # freed (warm) pages are reused before fresh ones
    assert PageAllocator(10, 4).num_cold_free() == 0
