"""The Triton kernels (pagoda/ops/cuda/triton_*.py) against their references.

Without a GPU they run in Triton's CPU interpreter on host tensors (this module sets
TRITON_INTERPRET=1 before triton is first imported: Triton decides when a kernel is
decorated, so a process that imported triton earlier without it cannot interpret), so the
sizes here are tiny. Where torch sees a GPU they run compiled, on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from pagoda.ops import reference, sampling
from pagoda.ops.kv_quant import cache_row_width, dequantize_rows, quantize_rows
from pagoda.ops.registry import DECLINE

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

if not GPU:  # before triton's first import (its library functions are decorated then), for good:
    os.environ["TRITON_INTERPRET"] = "1"  # triton also reads it while running kernels
pytest.importorskip("triton")
from pagoda.ops.cuda import triton_attention as ta  # noqa: E402
from pagoda.ops.cuda import triton_elementwise as te  # noqa: E402

if not GPU and isinstance(ta.tl.zeros, ta.triton.runtime.JITFunction):  # something imported triton first
    pytest.skip("triton was imported before TRITON_INTERPRET could be set: run this file on its own "
                "(or with TRITON_INTERPRET=1 in the environment)", allow_module_level=True)

bf16 = torch.bfloat16


def _close(got: torch.Tensor, want: torch.Tensor, loose: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if loose:  # bf16 products / roundings on either side (the interpreter rounds to bf16 by truncating)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------
# Attention


@dataclass
class _Batch:
    """What reference.paged_attention reads of a step's batch (AttentionMetadata and its
    successor ForwardBatch both have these), so this file follows neither."""

    query_lens: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    page_size: int

    @property
    def query_starts(self) -> list[int]:
        return [sum(self.query_lens[:b]) for b in range(len(self.query_lens) + 1)]

    @property
    def context_slots(self) -> list[torch.Tensor]:
        offsets = torch.arange(self.page_size)
        return [(self.block_table[b][:, None] * self.page_size + offsets).reshape(-1)[:n]
                for b, n in enumerate(self.seq_lens)]


def _attention_inputs(query_lens, seq_lens, page_size=4, hq=4, hk=1, d=16, kv_dtype=torch.float32,
                      q_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(seq_lens))
    pages_needed = [(s + page_size - 1) // page_size for s in seq_lens]
    perm = torch.randperm(sum(pages_needed) + 3, generator=g)[: sum(pages_needed)] + 1  # scattered pages
    table = torch.zeros(len(seq_lens), max(pages_needed) + 1, dtype=torch.int32)  # a spare column
    i = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = perm[i : i + n].int()
        i += n
    num_slots = (int(perm.max()) + 1) * page_size
    k_cache, v_cache = (torch.randn(num_slots, hk, d, generator=g) for _ in range(2))
    if kv_dtype == torch.int8:
        k_cache, v_cache = quantize_rows(k_cache), quantize_rows(v_cache)
    else:
        k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    meta = _Batch(list(query_lens), list(seq_lens), table.long(), page_size)
    q = torch.randn(sum(query_lens), hq, d, generator=g).to(q_dtype)
    return q, k_cache, v_cache, meta, d**-0.5


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _loose(q, k_cache, out_dtype) -> bool:
    return bool({bf16, torch.float16} & {q.dtype, k_cache.dtype, out_dtype})


DECODE_CASES = [
    # (seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype, num_splits)
    ([1, 9, 17], 4, 4, 1, 16, torch.float32, torch.float32, None, None),  # group 4
    ([5, 40], 1, 2, 2, 16, torch.float32, torch.float32, None, 3),  # page size 1, group 1, 3 splits
    ([33, 2, 0], 16, 8, 2, 32, bf16, bf16, None, 4),  # bf16, a zero-length (padding) row, empty splits
    ([20, 7], 16, 4, 1, 32, torch.int8, torch.float32, None, 2),  # int8 rows, one scale per 32
    ([12, 3], 4, 4, 4, 24, torch.int8, bf16, torch.float32, None),  # head_dim 24: groups of 8, padded
    ([18], 16, 3, 1, 16, torch.float16, torch.float32, bf16, 2),  # group of 3 (padded), fp16 cache
    ([0, 6], 4, 2, 1, 16, torch.float32, torch.float32, None, 1),  # one split: no reduce, a padding row
    ([7, 12], 4, 4, 1, 16, torch.float16, torch.float16, None, 2),  # float16 products (bf16's path on a GPU)
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"decode{i}" for i in range(len(DECODE_CASES))])
def test_decode_attention(case) -> None:
    seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype, num_splits = case
    ref_lens = [max(s, 1) for s in seq_lens]  # the reference has no zero-length rows
    q, k_cache, v_cache, meta, scale = _attention_inputs([1] * len(seq_lens), ref_lens, page_size, hq, hk, d,
                                                          kv_dtype, q_dtype)
    want = reference.paged_attention.reference(q, k_cache, v_cache, meta, scale, out_dtype)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table.int())
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = ta.decode_attention(qd, kd, vd, table, lens, page_size, scale, out_dtype, num_splits)
    assert got is not DECLINE
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert (got[b] == 0).all()
        else:
            _close(got[b].cpu(), want[b], _loose(q, k_cache, out_dtype))


def test_decode_grid_is_fixed_by_shapes() -> None:
    """Splits come from the block table's capacity, not from the lengths."""
    assert ta.default_num_splits(1, 2, 16 * 4096) == ta.default_num_splits(1, 2, 16 * 4096)
    assert ta.default_num_splits(1, 1, 100) == 1
    assert 1 < ta.default_num_splits(1, 2, 8192) <= ta.MAX_SPLITS
    assert ta.default_num_splits(512, 8, 1 << 20) == 1  # a big batch fills the device already


PREFILL_CASES = [
    # (query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype)
    ([12], [12], 4, 4, 1, 16, torch.float32, torch.float32, None),  # fresh prefill, group 4
    ([5, 1, 3], [13, 7, 3], 1, 2, 2, 16, torch.float32, torch.float32, None),  # chunk on a prefix, page 1
    ([9, 2], [30, 2], 16, 8, 2, 32, bf16, bf16, None),  # bf16, pages of 16
    ([4, 1], [21, 9], 16, 4, 1, 32, torch.int8, torch.float32, bf16),  # int8 rows
    ([3], [10], 4, 3, 1, 24, torch.int8, bf16, None),  # group of 3, head_dim 24
    ([2], [6], 4, 2, 1, 16, torch.float32, bf16, None),  # bf16 queries over a float32 cache: float32 products
    ([3, 1], [9, 5], 4, 4, 1, 32, torch.int8, torch.float16, None),  # float16 products over int8 rows
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[f"prefill{i}" for i in range(len(PREFILL_CASES))])
def test_prefill_attention(case) -> None:
    query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype, out_dtype = case
    q, k_cache, v_cache, meta, scale = _attention_inputs(query_lens, seq_lens, page_size, hq, hk, d, kv_dtype, q_dtype)
    want = reference.paged_attention.reference(q, k_cache, v_cache, meta, scale, out_dtype)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    starts = torch.tensor(meta.query_starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE)
    got = ta.prefill_attention(qd, kd, vd, table, starts, lens, page_size, scale, out_dtype,
                               max_query_len=max(query_lens))
    assert got is not DECLINE
    _close(got.cpu(), want, _loose(q, k_cache, out_dtype))


def test_prefill_without_causal_mask_sees_every_key() -> None:
    q, k_cache, v_cache, meta, scale = _attention_inputs([3, 2], [7, 5], page_size=4, hq=2, hk=1)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    starts = torch.tensor(meta.query_starts, device=DEVICE)
    lens = torch.tensor(meta.seq_lens, device=DEVICE)
    got = ta.prefill_attention(qd, kd, vd, table, starts, lens, 4, scale, causal=False).cpu()
    for b, (start, qlen) in enumerate(zip(meta.query_starts, meta.query_lens)):
        keys = k_cache[meta.context_slots[b]].transpose(0, 1).repeat_interleave(2, 0)  # [Hq, S, D]
        vals = v_cache[meta.context_slots[b]].transpose(0, 1).repeat_interleave(2, 0)
        qb = q[start : start + qlen].transpose(0, 1)
        want = torch.softmax(qb @ keys.transpose(1, 2) * scale, -1) @ vals
        _close(got[start : start + qlen], want.transpose(0, 1), False)


def test_attention_declines_what_it_does_not_handle() -> None:
    q, k_cache, v_cache, meta, scale = _attention_inputs([1], [5], hq=3, hk=2)  # 3 heads over 2 kv heads
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    lens = torch.tensor([5], device=DEVICE)
    assert ta.decode_attention(qd, kd, vd, table, lens, 4, scale) is DECLINE
    q, k_cache, v_cache, meta, scale = _attention_inputs([1], [5])
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    assert ta.decode_attention(qd.to(torch.int32), kd, vd, table, lens, 4, scale) is DECLINE
    assert ta.decode_attention(qd, kd, vd.to(bf16), table, lens, 4, scale) is DECLINE


# ---------------------------------------------------------------------------------------
# Norms, SiLU-and-mul


NORM_CASES = [
    # (shape, x dtype, residual dtype or None, variant, out_dtype, eps)
    ((5, 32), torch.float32, None, "llama", None, 1e-6),
    ((5, 32), torch.float32, None, "jiutian", None, 1e-6),
    ((3, 40), bf16, None, "llama", torch.float32, 1e-5),  # width off a power of two
    ((2, 3, 48), torch.float32, None, "jiutian", bf16, 1e-6),  # leading dims folded
    ((4, 32), torch.float32, torch.float32, "llama", None, 1e-6),
    ((4, 32), bf16, torch.float32, "jiutian", bf16, 1e-6),  # bf16 x onto a float32 residual stream
    ((3, 40), bf16, bf16, "llama", None, 1e-5),
    ((2, 4100), bf16, torch.float32, "llama", bf16, 1e-5),  # longer than one block: the two-pass path
    ((2, 4100), torch.float32, None, "jiutian", None, 1e-6),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=[f"norm{i}" for i in range(len(NORM_CASES))])
def test_rms_norm(case) -> None:
    shape, x_dtype, r_dtype, variant, out_dtype, eps = case
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(x_dtype)
    w = torch.randn(shape[-1], generator=g)
    loose = bf16 in (x_dtype, r_dtype, out_dtype)
    if r_dtype is None:
        want = reference.rms_norm.reference(x, w, eps, variant, out_dtype)
        got = te.rms_norm(*_on_device(x, w), eps, variant, out_dtype)
        _close(got.cpu(), want, loose)
        return
    r = torch.randn(shape, generator=g).to(r_dtype)
    want, want_sum = reference.add_rms_norm.reference(x, r, w, eps, variant, out_dtype)
    got, got_sum = te.fused_add_rms_norm(*_on_device(x, r, w), eps, variant, out_dtype)
    if want_sum.dtype == bf16 and te.interpreting():  # the interpreter truncates to bf16: one ulp
        torch.testing.assert_close(got_sum.cpu(), want_sum)
    else:
        assert torch.equal(got_sum.cpu(), want_sum)  # one rounding of the same sum
    _close(got.cpu(), want, loose)


def test_norm_reads_row_strided_views() -> None:
    x = torch.randn(4, 64)[:, :32]  # rows 64 apart
    w = torch.randn(32)
    got = te.rms_norm(*_on_device(x, w), 1e-6)
    _close(got.cpu(), reference.rms_norm.reference(x, w, 1e-6), False)


@pytest.mark.parametrize("shape,dtype", [((3, 80), torch.float32), ((2, 2, 64), bf16), ((1, 2 * 1100), torch.float32)])
def test_silu_and_mul(shape, dtype) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    got = te.silu_and_mul(x.to(DEVICE))
    _close(got.cpu(), reference.silu_and_mul.reference(x), dtype == bf16)


def test_elementwise_declines_what_it_does_not_handle() -> None:
    x, w = _on_device(torch.randn(2, 8), torch.ones(8))
    assert te.rms_norm(x, w, 1e-6, "gemma") is DECLINE
    assert te.rms_norm(x.to(torch.int32), w, 1e-6) is DECLINE
    assert te.silu_and_mul(x[:, :3]) is DECLINE  # odd width: no [gate | up] halves


# ---------------------------------------------------------------------------------------
# Rotary + KV store


def _rotary_inputs(tokens, hq, hk, d, src_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(src_dtype)  # views into a fused projection
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.randint(0, 1000, (tokens,), generator=g)
    angles = pos[:, None] * (10000.0 ** (-torch.arange(d // 2) / (d // 2)))[None, :]
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    slots = torch.randperm(4 * tokens, generator=g)[:tokens]
    return q.view(tokens, hq, d), k.view(tokens, hk, d), v.view(tokens, hk, d), cos, sin, slots


ROTARY_CASES = [
    # (tokens, hq, hk, d, src dtype, cache dtype, out_dtype)
    (5, 4, 1, 16, torch.float32, torch.float32, None),
    (5, 4, 4, 16, bf16, bf16, torch.float32),
    (3, 2, 1, 32, bf16, torch.float32, None),
    (4, 4, 1, 32, torch.float32, torch.int8, None),  # int8: one scale per 32
    (3, 2, 2, 24, bf16, torch.int8, bf16),  # head_dim 24: three groups of 8
    (2, 2, 1, 64, torch.float32, torch.float16, bf16),
]


@pytest.mark.parametrize("case", ROTARY_CASES, ids=[f"rotary{i}" for i in range(len(ROTARY_CASES))])
def test_rotary_store_kv(case) -> None:
    tokens, hq, hk, d, src, cache_dtype, out_dtype = case
    q, k, v, cos, sin, slots = _rotary_inputs(tokens, hq, hk, d, src)
    width = cache_row_width(d, cache_dtype)
    ref_caches = [torch.zeros(4 * tokens, hk, width, dtype=cache_dtype) for _ in range(2)]
    want = reference.rotary_store_kv.reference(q, k, v, cos, sin, *ref_caches, slots, out_dtype)
    caches = [torch.zeros(4 * tokens, hk, width, dtype=cache_dtype, device=DEVICE) for _ in range(2)]
    got = te.rotary_store_kv(*_on_device(q, k, v, cos, sin), *caches, slots.to(DEVICE), out_dtype)
    assert got is not DECLINE
    _close(got.cpu(), want, bf16 in (src, out_dtype))
    for mine, theirs in zip(caches, ref_caches):
        mine = mine.cpu()
        if cache_dtype == torch.int8:  # a fused multiply-add may move a value across a rounding tie: one step
            assert (mine[..., :d].int() - theirs[..., :d].int()).abs().max() <= 1
            torch.testing.assert_close(mine[..., d:].view(torch.float16), theirs[..., d:].view(torch.float16),
                                       rtol=1e-3, atol=0)
            step = theirs[..., d:].contiguous().view(torch.float16).float().max().item()
            torch.testing.assert_close(dequantize_rows(mine, torch.float32), dequantize_rows(theirs, torch.float32),
                                       rtol=1e-3, atol=step)
        else:
            _close(mine, theirs, cache_dtype == bf16 or cache_dtype == torch.float16)


# ---------------------------------------------------------------------------------------
# Sampling


def test_argmax_rows_first_maximum() -> None:
    ties = torch.zeros(3, 200)
    for row, ids in enumerate([[150, 7, 42, 199], [3, 2, 1, 0], [16, 32, 48]]):
        ties[row, ids] = 5.0
    low = torch.full((2, 40), -1e30)
    low[1, 23] = -1e29
    inf = torch.full((1, 9), float("-inf"))  # every token banned: index 0, as torch's max
    rand = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1))  # several blocks
    for x in (ties, low, inf, rand, rand.to(bf16), rand[:, 5:1029]):
        got = te.argmax_rows(x.to(DEVICE))
        assert got.dtype == torch.int64 and got.device.type == DEVICE
        assert torch.equal(got.cpu(), sampling.argmax_rows.reference(x))


def test_sample_from_probs_is_the_exponential_race() -> None:
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(6, 1500, generator=g) * 3, dim=-1)
    probs[0] = 0.0
    probs[0, 777] = 1.0  # a certain token
    noise = torch.empty_like(probs).exponential_(generator=g)
    got = te.sample_from_probs(*_on_device(probs, noise))
    assert torch.equal(got.cpu(), sampling.sample_from_probs.reference(probs, noise))
    assert got[0].item() == 777


def test_paged_attention_kernel_reads_the_forward_batch() -> None:
    """The op's kernel (what the CUDA and MUSA platforms register) on real batches: decodes
    through the graph-safe decode kernel, mixed steps through the prefill kernel; a graph's
    (static) mixed batch is declined."""
    import dataclasses

    from pagoda.ops.forward_batch import ForwardBatch

    g = torch.Generator().manual_seed(3)
    page, hk, d = 4, 2, 16
    k_cache, v_cache = (torch.randn(40 * page, hk, d, generator=g).to(DEVICE) for _ in range(2))
    decode = [([1], 6, [3, 7]), ([2], 1, [9]), ([3], 12, [1, 2, 4, 5])]
    mixed = [([1, 2, 3], 4, [3, 7]), ([2], 1, [9])]
    for seqs in (decode, mixed):
        batch = ForwardBatch.build(seqs, page, torch.device(DEVICE))
        q = torch.randn(batch.num_tokens, 4, d, generator=g).to(DEVICE)
        got = ta.paged_attention_triton(q, k_cache, v_cache, batch, d**-0.5)
        _close(got, reference.paged_attention(q, k_cache, v_cache, batch, d**-0.5), loose=False)
    static = dataclasses.replace(batch, static=True, _views={})
    assert ta.paged_attention_triton(q, k_cache, v_cache, static, d**-0.5) is DECLINE


# ---------------------------------------------------------------------------------------
# Without triton; on a GPU, under graph capture


def test_modules_import_without_triton() -> None:
    """The platform can import the kernel modules unconditionally: without triton they say
    so (AVAILABLE) and every launcher declines."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pagoda.ops.cuda import triton_attention as ta, triton_elementwise as te\n"
        "from pagoda.ops.registry import DECLINE\n"
        "x = torch.ones(2, 8)\n"
        "assert not ta.AVAILABLE and not te.AVAILABLE and not ta.interpreting()\n"
        "assert te.rms_norm(x, torch.ones(8), 1e-6) is DECLINE and te.silu_and_mul(x) is DECLINE\n"
        "assert te.argmax_rows(x) is DECLINE\n"
        "q, c = torch.ones(1, 2, 8), torch.ones(4, 1, 8)\n"
        "table, lens = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)\n"
        "assert ta.decode_attention(q, c, c, table, lens, 4, 1.0) is DECLINE\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=120)


@pytest.mark.skipif(GPU, reason="on a GPU the kernels above ran compiled")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter checks the arithmetic; Triton's GPU compiler is stricter (types, block
    shapes, tl.dot's sizes): build each kernel's main variants for sm_90 ahead of time, in a
    process without the interpreter (tests/triton_compile_check.py)."""
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(ta.triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-m", "tests.triton_compile_check"], env=env, cwd=root, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(not GPU, reason="graph capture needs a GPU")
def test_decode_attention_replays_in_a_cuda_graph() -> None:
    """Captured once at a batch's shapes, replayed as the contexts grow: the grid does not
    depend on the lengths, which the kernel reads on the device."""
    seq_lens = [40, 3]
    q, k_cache, v_cache, meta, scale = _attention_inputs([1, 1], [64, 64], 16, 8, 2, 64, bf16, bf16)
    qd, kd, vd, table = _on_device(q, k_cache, v_cache, meta.block_table)
    lens = torch.tensor(seq_lens, device=DEVICE)
    ta.decode_attention(qd, kd, vd, table, lens, 16, scale, num_splits=3)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.decode_attention(qd, kd, vd, table, lens, 16, scale, num_splits=3)
    for new_lens in ([40, 3], [41, 4], [64, 1]):
        lens.copy_(torch.tensor(new_lens))
        graph.replay()
        ref_meta = _Batch([1, 1], new_lens, meta.block_table, 16)
        want = reference.paged_attention.reference(q, k_cache, v_cache, ref_meta, scale)
        _close(out.cpu(), want, True)
