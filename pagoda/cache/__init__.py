"""KV-cache bookkeeping: page ids and token ids only (the KV tensors live elsewhere)."""

from pagoda.cache.page_allocator import NULL_PAGE, PageAllocator
from pagoda.cache.radix_tree import PrefixMatch, RadixNode, RadixTree

__all__ = ["NULL_PAGE", "PageAllocator", "PrefixMatch", "RadixNode", "RadixTree"]
