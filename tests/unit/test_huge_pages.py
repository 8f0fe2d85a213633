"""Tensors carved out of huge-page mappings: correct tensors first, huge pages where the OS
offers them."""

import re
from pathlib import Path

import pytest
import torch

from pagoda.cache.kv_pool import KVPool
from pagoda.ops.cpu import huge_pages
from pagoda.ops.cpu.huge_pages import HugePageArena
from pagoda.platforms import CpuPlatform


def test_tensors_are_aligned_and_disjoint():
    arena = HugePageArena(chunk=1 << 20)
    tensors = [arena.empty((n, 3), dtype) for n, dtype in [(5, torch.uint8), (7, torch.float16), (100, torch.float32)]]
    for i, t in enumerate(tensors):
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
        t.fill_(i + 1)
    for i, t in enumerate(tensors):
        assert (t == i + 1).all()  # no allocation overwrote another


def test_tensors_outlive_the_arena_and_its_next_mappings():
    arena = HugePageArena(chunk=1 << 20)
    first = arena.empty((1000,), torch.float32).fill_(1.5)
    for _ in range(8):  # several new mappings, one of them larger than the chunk
        arena.empty((200_000,), torch.float32).fill_(-1)
    big = arena.empty((1 << 20,), torch.uint8).fill_(7)
    del arena
    assert (first == 1.5).all() and (big == 7).all()


def test_copy_is_contiguous_and_equal():
    src = torch.arange(24, dtype=torch.int16).view(2, 3, 4).permute(2, 0, 1)
    out = huge_pages.copy(src)
    assert out.is_contiguous() and torch.equal(out, src)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return re.search(r"\[(\w+)\]", text).group(1)


def _huge_kib_of(ptr: int) -> int:
    """AnonHugePages of the mapping that holds address ptr (this process's smaps)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= ptr < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not huge_pages.SUPPORTED or _thp_mode() not in ("madvise", "always"),
                    reason="the OS offers no transparent huge pages here")
def test_kv_cache_sits_on_huge_pages():
    alloc = CpuPlatform().alloc_streamed  # as the engine builds its pool
    pool = KVPool(2, 4096, 16, 2, 64, torch.bfloat16, torch.device("cpu"), alloc)  # 16 MiB per layer and kind
    pool.k[1].fill_(1)
    assert _huge_kib_of(pool.k[1].data_ptr()) >= 2 << 10  # at least one 2 MiB page (memory may be too fragmented for all)


def test_kv_prefault_writes_the_first_pages_handed_out():
    """The pages PageAllocator hands out first (ascending from page 1) are written at start-up
    where the platform asks for it (so the first requests do not pay for the memory's first
    touch), whole pages only, within the pool; with no prefault only the null page is."""
    filled = []

    def alloc(shape, dtype):
        t = torch.full(shape, 7, dtype=dtype)  # stands in for memory never written
        filled.append(t)
        return t

    per_token = KVPool.bytes_per_token(2, 2, 64, torch.bfloat16)  # 1,024 bytes
    pool = KVPool(2, 64, 16, 2, 64, torch.bfloat16, torch.device("cpu"), alloc, prefault_bytes=40 * per_token)
    for cache in pool.k + pool.v:
        assert (cache[:32] == 0).all() and (cache[32:] == 7).all()  # 2 whole pages of 16 tokens
    assert len(filled) == 4
    whole = KVPool(2, 4, 16, 2, 64, torch.bfloat16, torch.device("cpu"), alloc, prefault_bytes=1 << 30)
    assert all((cache == 0).all() for cache in whole.k + whole.v)  # never past the pool
    none = KVPool(2, 4, 16, 2, 64, torch.bfloat16, torch.device("cpu"), alloc)
    assert all((c[:16] == 0).all() and (c[16:] == 7).all() for c in none.k + none.v)  # the null page alone
    assert CpuPlatform().kv_prefault_bytes() > 0


def test_engine_prefaults_one_longest_request_at_least():
    """The pool the engine builds is written at start-up for at least one context-length request
    (past a platform's fixed amount), so a long document's prefill never backs fresh memory: that
    came in bursts, every layer's next huge page in one step."""
    from types import SimpleNamespace

    from pagoda.engine.engine import KVCacheSize, build_kv_pool

    per_token = KVPool.bytes_per_token(2, 2, 64, torch.bfloat16)
    platform = SimpleNamespace(device=lambda: torch.device("cpu"), kv_prefault_bytes=lambda: 16 * per_token,
                               alloc_streamed=lambda shape, dtype: torch.empty(shape, dtype=dtype))
    loaded = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, head_dim=64), kv_heads=2, context_length=200)
    size = KVCacheSize(num_pages=64, bytes_per_page=16 * per_token, dtype=torch.bfloat16)
    pool = build_kv_pool(SimpleNamespace(page_size=16), platform, loaded, size)
    assert pool.warm_pages * 16 >= 200 and pool.warm_pages < 63  # the request's pages, not the whole pool
    device = SimpleNamespace(**{**vars(platform), "kv_prefault_bytes": lambda: 0})
    assert build_kv_pool(SimpleNamespace(page_size=16), device, loaded, size).warm_pages == 64  # devices: all
