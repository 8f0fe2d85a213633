"""KVPool: the KV-cache storage, preallocated once and addressed by slot.

Slot s of layer l holds one token's keys in ``k[l][s]`` and values in ``v[l][s]``
([num_kv_heads, head_dim], or int8 rows with a scale each: pagoda/ops/kv_quant.py);
page p owns slots [p*page_size, (p+1)*page_size). Bookkeeping of which request
holds which page lives in PageAllocator / RadixTree, not here.

Memory comes from `allocate` (the platform's `alloc_streamed`: huge pages on CPU) and is
left uninitialised (host pages are touched only as the cache fills) except page 0, the
null page that padded reads point at: it is zeroed so that masked-out positions never
feed NaN garbage into attention; and, with `prefault_bytes`, the first pages handed out
(PageAllocator gives fresh pages in ascending order) are written once here, at start-up,
instead of in the middle of the first requests' steps (why: the CPU platform's
`kv_prefault_bytes`).
"""

from __future__ import annotations

from typing import Callable

import torch

from pagoda.ops.kv_quant import cache_row_width


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
        prefault_bytes: int = 0,
    ) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_pages * page_size, num_kv_heads, cache_row_width(head_dim, dtype))
        allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device))
        self.k = [allocate(shape, dtype) for _ in range(num_layers)]
        self.v = [allocate(shape, dtype) for _ in range(num_layers)]
        per_token = self.bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        touched = max(page_size, min(num_pages * page_size, prefault_bytes // per_token // page_size * page_size))
        for cache in self.k + self.v:
            cache[:touched].zero_()
        # Usable pages (ids 1..) whose memory is backed already: those written here where the host
        # backs memory on its first write (prefault_bytes given), all of them on devices
        self.warm_pages = touched // page_size - 1 if prefault_bytes else num_pages - 1
        self.layers = tuple(zip(self.k, self.v))  # per layer (k, v): what a ForwardBatch carries

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * cache_row_width(head_dim, dtype) * dtype.itemsize
