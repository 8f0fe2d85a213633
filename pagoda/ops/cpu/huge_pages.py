"""Host tensors on transparent huge pages (2 MiB) for memory a CPU step streams whole.

Why: a decode step reads every weight and, at high concurrency, most of the KV cache.
On 4 KiB pages that is a TLB miss every 4 KiB, and under a hypervisor (nested page
tables) a miss is a long walk: measured on the default model, the int4 matmuls took
54 us per call on 4 KiB pages and 28 us on huge pages, back to back (96 vs 34 us with
Python work between calls, as in a real step).

Linux hands out huge pages for anonymous mappings advised MADV_HUGEPAGE (the common
"madvise" THP setting), so tensors are carved out of such mappings, 64-byte aligned.
A mapping stays alive while any tensor in it does. Where the system has no such advice
(not Linux, THP off) this is plain torch.empty.
"""

from __future__ import annotations

import mmap
import threading

import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # one mapping per this much (untouched pages of a mapping cost no memory)
ALIGN = 64


class HugePageArena:
    """Bump allocator over huge-page mappings; never reuses memory (weights and caches live
    as long as their model, and a mapping is unmapped once no tensor in it is left)."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._buffer: torch.Tensor | None = None  # the current mapping, as bytes from a 2 MiB boundary
        self._used = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize * _numel(shape)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if nbytes > self.chunk // 2:  # a mapping of its own (a KV cache layer, a large weight)
            return _huge_mapping(nbytes)[:nbytes].view(dtype).view(shape)
        with self._lock:
            if self._buffer is None or self._used + nbytes > self._buffer.numel():
                self._buffer, self._used = _huge_mapping(self.chunk), 0
            start = self._used
            self._used = -(-(start + nbytes) // ALIGN) * ALIGN
            return self._buffer[start : start + nbytes].view(dtype).view(shape)


def _numel(shape: tuple[int, ...] | torch.Size) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _huge_mapping(nbytes: int) -> torch.Tensor:
    """nbytes (rounded up to whole huge pages) of an advised anonymous mapping, as uint8."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without THP: plain pages, still correct
        pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset : offset + size]


SUPPORTED = hasattr(mmap, "MADV_HUGEPAGE")
_ARENA = HugePageArena()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on huge pages where the OS offers them."""
    return _ARENA.empty(shape, dtype) if SUPPORTED else torch.empty(shape, dtype=dtype)


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor on huge pages."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out
