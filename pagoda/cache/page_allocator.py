"""Reference-counted free list of fixed-size KV pages (page ids only, no tensors).

Page 0 is reserved as the null page: it is never handed out, so padded slot
mappings and block tables (CUDA graphs, fixed-shape kernels) can point at it
and scribble on it without touching live KV. Consequently:

* ``num_pages`` counts *usable* pages, with ids ``1 .. num_pages``;
* the KV storage must hold ``num_storage_pages == num_pages + 1`` pages,
  i.e. ``num_storage_pages * page_size`` slots (slot = page * page_size + offset).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

NULL_PAGE = 0


class PageAllocator:
    """Free list of fixed-size KV pages with reference counts.

    A page is free exactly when its count is 0. ``alloc`` hands pages out with
    count 1; every holder (a request, the radix tree) owns one reference and
    drops it with ``decref``. Operations validate their whole argument before
    changing anything, so a rejected call leaves the allocator untouched.
    """

    def __init__(self, num_pages: int, page_size: int, warm_pages: int | None = None) -> None:
        """`warm_pages`: how many of the first pages have backed memory already (None: all); the
        rest are cold until first handed out (see `num_cold_free`)."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_storage_pages = self.storage_pages(num_pages)
        self._refcount = [0] * self.num_storage_pages
        # A stack popped from the end: fresh pages come out in ascending order,
        # recently freed pages are reused first.
        self._free = list(range(num_pages, NULL_PAGE, -1))
        # Pages up to here are warm: prefaulted, or handed out before (fresh pages leave in order)
        self._warm_until = num_pages if warm_pages is None else max(0, min(num_pages, warm_pages))

    @staticmethod
    def storage_pages(num_pages: int) -> int:
        """Pages the KV storage holds for `num_pages` usable ones (the null page as well)."""
        return num_pages + 1

    def num_free(self) -> int:
        return len(self._free)

    def num_cold_free(self) -> int:
        """Free pages never handed out and never prefaulted: on a host that backs memory on its
        first write, taking one costs that write in the step that takes it."""
        return self.num_pages - self._warm_until

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` pages (count 1 each), or None and nothing if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcount[page] = 1
        self._warm_until = max(self._warm_until, max(pages, default=0))
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add a holder to pages that are already allocated."""
        pages = list(pages)
        for page in pages:
            if self.refcount(page) == 0:
                raise ValueError(f"incref of free page {page}")
        for page in pages:
            self._refcount[page] += 1

    def decref(self, pages: Iterable[int]) -> None:
        """Drop one holder per occurrence; a page whose count hits 0 is free again."""
        drops = Counter(pages)
        for page, n in drops.items():
            if self.refcount(page) < n:
                raise ValueError(f"double free of page {page} (count {self.refcount(page)}, dropping {n})")
        for page, n in drops.items():
            self._refcount[page] -= n
            if self._refcount[page] == 0:
                self._free.append(page)

    def refcount(self, page: int) -> int:
        if not NULL_PAGE < page <= self.num_pages:
            raise ValueError(f"page {page} is not a usable page (1..{self.num_pages})")
        return self._refcount[page]
