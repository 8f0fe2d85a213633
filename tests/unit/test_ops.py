"""Every registered kernel equals its reference; a declining kernel falls back."""

from __future__ import annotations

import pytest
import torch

from pagoda import ops
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.cpu.native import HAS_AMX
from pagoda.ops.kv_quant import cache_row_width, dequantize_rows, quantize_rows
from pagoda.ops.registry import OPS, Op, register_kernel
from pagoda.platforms import get_platform

get_platform("cpu")  # loads the CPU kernels


def _attention_inputs(
    query_lens: list[int], seq_lens: list[int], page_size: int = 4, hq: int = 6, hk: int = 2,
    kv_dtype: torch.dtype = torch.float32, d: int = 16,
):
    g = torch.Generator().manual_seed(sum(seq_lens))
    pages_needed = [(s + page_size - 1) // page_size for s in seq_lens]
    perm = torch.randperm(sum(pages_needed) + 3, generator=g)[: sum(pages_needed)] + 1  # scattered pages
    table = torch.zeros(len(seq_lens), max(pages_needed), dtype=torch.long)
    i = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = perm[i : i + n]
        i += n
    num_slots = (int(perm.max()) + 1) * page_size
    k_cache, v_cache = (torch.randn(num_slots, hk, d, generator=g) for _ in range(2))
    if kv_dtype == torch.int8:  # Q8_0-style rows with their scales, as the model stores them
        k_cache, v_cache = quantize_rows(k_cache), quantize_rows(v_cache)
    else:
        k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    seqs = [([0] * ql, sl - ql, table[b, :n].tolist()) for b, (ql, sl, n) in enumerate(zip(query_lens, seq_lens, pages_needed))]
    batch = ForwardBatch.build(seqs, page_size, torch.device("cpu"))
    q = torch.randn(sum(query_lens), hq, d, generator=g)
    return q, k_cache, v_cache, batch, d**-0.5


def _lora_inputs(g: torch.Generator) -> list[tuple]:
    """Three slots (ranks 4 and 8 of 16, one empty) over a ragged batch whose rows are in runs
    by adapter, base rows between; one bfloat16 case (declined by the C kernel)."""
    stack = ops.LoRAStack.empty(3, 16, 40, 72, torch.device("cpu"))
    stack.set(0, torch.randn(4, 40, generator=g), torch.randn(72, 4, generator=g), 0.5)
    stack.set(2, torch.randn(8, 40, generator=g), torch.randn(72, 8, generator=g), 2.0)
    out = []
    for lens, slots in (([3, 1, 1, 5], [0, 0, -1, 2]), ([1] * 6, [-1, 0, 0, 1, 2, 2]), ([7], [2])):
        t = sum(lens)
        batch = ops.ForwardBatch.build([(list(range(n)), 0, [1, 2]) for n in lens], 16, torch.device("cpu"),
                                       lora_slots=slots)
        out.append((torch.randn(t, 72, generator=g), torch.randn(t, 40, generator=g), batch, stack))
    y, x, batch, _ = out[0]
    out.append((y.to(torch.bfloat16), x.to(torch.bfloat16), batch, stack))
    return out


def _inputs(name: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    w = torch.randn(32, generator=g)
    bf16 = torch.bfloat16
    if name == "rms_norm":
        return [(x, w, 1e-6, "llama"), (x, w, 1e-6, "jiutian"), (x * 1e-4, w, 1e-5, "llama"), (x, w, 1e-6, "llama", bf16)]
    if name == "add_rms_norm":
        r = torch.randn(5, 32, generator=g)
        return [(x, r, w, 1e-6, "llama"), (x, x, w, 1e-6, "jiutian"), (x.to(bf16), r, w, 1e-6, "llama", bf16),
                (torch.randn(3, 1100, generator=g).to(bf16), torch.randn(3, 1100, generator=g), torch.randn(1100), 1e-5)]
    if name == "rotary_store_kv":  # q, k, v as views into a fused QKV output, as the model passes them
        qkv = torch.randn(7, (6 + 2 + 2) * 16, generator=g)
        pos = torch.tensor([0, 1, 2, 3, 900, 5, 6])
        angles = pos[:, None] * (10000.0 ** (-torch.arange(8) / 8))[None, :]
        cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
        slots = torch.tensor([9, 2, 30, 31, 0, 17, 5])
        cases = []
        for src, cache, out in ((torch.float32, torch.float32, None), (bf16, bf16, torch.float32),
                                (bf16, torch.float32, None), (torch.float32, bf16, bf16),
                                (torch.float32, torch.int8, None), (bf16, torch.int8, bf16)):
            q, k, v = qkv.to(src).split([96, 32, 32], dim=-1)
            caches = [torch.zeros(32, 2, cache_row_width(16, cache), dtype=cache) for _ in range(2)]
            cases.append((q.view(7, 6, 16), k.view(7, 2, 16), v.view(7, 2, 16), cos, sin, *caches, slots, out))
        q, k, v = qkv[:1].split([96, 32, 32], dim=-1)  # one token: views' row strides differ (moot)
        caches = [torch.zeros(32, 2, 16) for _ in range(2)]
        cases.append((q.view(1, 6, 16), k.view(1, 2, 16), v.view(1, 2, 16), cos[:1], sin[:1], *caches, slots[:1]))
        qkv64 = torch.randn(7, (6 + 2 + 2) * 64, generator=g).to(bf16)  # head_dim 64: whole 16-wide vectors
        q, k, v = qkv64.split([384, 128, 128], dim=-1)
        angles64 = pos[:, None] * (10000.0 ** (-torch.arange(32) / 32))[None, :]
        cos64, sin64 = torch.cat((angles64.cos(), angles64.cos()), -1), torch.cat((angles64.sin(), angles64.sin()), -1)
        caches = [torch.zeros(32, 2, 64, dtype=bf16) for _ in range(2)]
        cases.append((q.view(7, 6, 64), k.view(7, 2, 64), v.view(7, 2, 64), cos64, sin64, *caches, slots, torch.float32))
        caches = [torch.zeros(32, 2, cache_row_width(64, torch.int8), dtype=torch.int8) for _ in range(2)]
        cases.append((q.view(7, 6, 64), k.view(7, 2, 64), v.view(7, 2, 64), cos64, sin64, *caches, slots))
        q, k, v = qkv[:, :64].split([32, 16, 16], dim=-1)  # one kv head (MQA)
        caches = [torch.zeros(32, 1, 16) for _ in range(2)]
        cases.append((q.view(7, 2, 16), k.view(7, 1, 16), v.view(7, 1, 16), cos, sin, *caches, slots))
        return cases
    if name == "lora_apply":
        return _lora_inputs(g)
    if name == "silu_and_mul":
        return [(torch.randn(3, 2 * 40, generator=g) * 4,), (torch.randn(300, 2 * 256, generator=g),),
                (torch.randn(2, 2 * 1100, generator=g).to(bf16),)]
    if name == "paged_attention":
        return [
            _attention_inputs([1, 1, 1], [1, 9, 17]),  # decode-only batch
            _attention_inputs([12], [12]),  # fresh prefill
            _attention_inputs([5, 1, 3], [13, 7, 3]),  # chunk on cached prefix + decode + prefill
            _attention_inputs([1, 1], [300, 2], page_size=16, hq=9, hk=3),  # long context, group of 3
            _attention_inputs([1, 4, 1], [5, 30, 70], kv_dtype=torch.bfloat16),  # bf16 KV cache
            # head_dim 64 with a bf16 cache: bf16 dot products for the scores where the CPU has them
            _attention_inputs([1, 1, 1], [50, 7, 129], page_size=16, hq=9, hk=3, d=64, kv_dtype=torch.bfloat16),
            # bf16 output for a bf16 output projection, decodes and a prefill chunk
            (*_attention_inputs([1, 3, 1], [50, 9, 20], page_size=16, hq=9, hk=3, d=64, kv_dtype=torch.bfloat16),
             torch.bfloat16),
            # pages of 4 tokens: runs of 16 rows evenly spaced only where pages happen to be adjacent
            _attention_inputs([1, 1], [300, 45], page_size=4, hq=9, hk=3, d=64, kv_dtype=torch.bfloat16),
            _attention_inputs([1, 1], [33, 70], page_size=16, hq=8, hk=2, d=128, kv_dtype=torch.bfloat16),
            _attention_inputs([1, 1, 1], [16, 32, 31], page_size=32, hq=4, hk=2, d=32, kv_dtype=torch.bfloat16),
            # a group of 10 query heads (> 8): vector scores, plain value sums
            _attention_inputs([1, 1], [40, 17], page_size=16, hq=10, hk=1, d=64, kv_dtype=torch.bfloat16),
            _attention_inputs([1, 1], [40, 3], d=8),  # head_dim off the 16-wide vector path
            _attention_inputs([1] * 5, [20, 1, 33, 16, 17], d=144, kv_dtype=torch.bfloat16),  # > 8 vectors
            # int8 KV rows: decodes only (float32 either side), then with prefill chunks and bf16 output
            _attention_inputs([1, 1, 1], [50, 7, 129], page_size=16, hq=9, hk=3, d=64, kv_dtype=torch.int8),
            (*_attention_inputs([1, 3, 1], [50, 9, 20], page_size=16, hq=9, hk=3, d=64, kv_dtype=torch.int8),
             torch.bfloat16),
            _attention_inputs([1, 1], [40, 17], page_size=16, hq=10, hk=1, d=64, kv_dtype=torch.int8),  # group 10
            _attention_inputs([1, 1, 1], [1, 9, 17], kv_dtype=torch.int8),  # head_dim 16: one group of 16
            _attention_inputs([1, 1], [33, 70], page_size=16, hq=8, hk=2, d=128, kv_dtype=torch.int8),  # 2 blocks of 64
            _attention_inputs([1, 1], [40, 3], d=8, kv_dtype=torch.int8),  # the plain loops, groups of 8
        ]
    if name == "argmax_rows":
        ties = torch.zeros(3, 200)
        for row, ids in enumerate([[150, 7, 42, 199], [3, 2, 1, 0], [16, 32, 48]]):  # ties across vector lanes
            ties[row, ids] = 5.0
        tail = torch.randn(4, 37, generator=g)
        tail[:, 35] = 9.0  # the maximum in the scalar tail, after two whole vectors
        low = torch.full((2, 40), -1e30)  # below any starting value a kernel might assume
        low[1, 23] = -1e29
        return [(ties,), (tail,), (tail[:, :5].contiguous(),), (low,),
                (torch.randn(64, 49152, generator=g),), (torch.randn(8, 1000, generator=g).to(bf16),)]
    if name == "decoder_stack":
        pytest.skip("the layer stack's kernel is checked against its reference in test_decoder_stack.py")
    pytest.skip(f"{name}'s kernel is checked against its reference in test_quant.py")


KERNELS = [(name, k) for name, op in OPS.items() for k in op.kernels if k.device_type == "cpu"]


@pytest.mark.parametrize("name,kernel", KERNELS, ids=[k.name for _, k in KERNELS])
def test_kernel_matches_reference(name: str, kernel) -> None:
    op = OPS[name]
    for args in _inputs(name):
        if name == "rotary_store_kv":  # also writes into the caches: compare what each tier left there
            ref_args = (*args[:5], args[5].clone(), args[6].clone(), *args[7:])
            got = kernel.fn(*args)
            if got is ops.DECLINE:
                continue
            torch.testing.assert_close(got, op.reference(*ref_args), rtol=1e-5, atol=1e-5)
            for mine, theirs in ((args[5], ref_args[5]), (args[6], ref_args[6])):
                if mine.dtype == torch.int8:  # C's rotation may differ in the last bit (FMA): one step
                    d = args[1].shape[-1]  # head_dim of the keys stored
                    assert (mine[..., :d].int() - theirs[..., :d].int()).abs().max() <= 1
                    assert (mine[..., :d] != theirs[..., :d]).float().mean() < 0.01
                    step = theirs[..., d:].contiguous().view(torch.float16).float().max().item()
                    torch.testing.assert_close(dequantize_rows(mine, torch.float32),
                                               dequantize_rows(theirs, torch.float32), rtol=1e-3, atol=step)
                elif mine.dtype == torch.bfloat16:
                    torch.testing.assert_close(mine, theirs)
                else:
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
            continue
        if name == "lora_apply":  # adds into y in place: each tier gets its own copy
            got = kernel.fn(args[0].clone(), *args[1:])
            ref = op.reference(args[0].clone(), *args[1:])
            if got is not ops.DECLINE:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            continue
        got = kernel.fn(*args)
        ref = op.reference(*args)
        if got is ops.DECLINE:
            continue
        for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            if name == "paged_attention" and _bf16_math(*args[:4]):  # queries rounded to bf16
                assert a.dtype == b.dtype
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
            elif a.dtype == torch.bfloat16:  # one rounding each, possibly one ulp apart
                torch.testing.assert_close(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bf16_math(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch) -> bool:
    """Attention computed with bf16 products: a bf16 cache, prefill chunks over an int8 one, or
    decodes over an int8 one whose keys AMX scores (head_dim a multiple of 32 up to 128); other
    int8 decodes are float32 FMAs, held to float32's tolerance."""
    if k_cache.dtype == torch.bfloat16:
        return True
    d = q.shape[-1]
    amx_scored = HAS_AMX and d % 32 == 0 and d <= 128
    return k_cache.dtype == torch.int8 and (not batch.is_decode_only or amx_scored)


def test_c_decode_attention_is_built_and_used() -> None:
    """The C kernel must really serve decode rows here (a compiler is part of the set-up);
    otherwise the parity test above would pass by declining."""
    from pagoda.ops.cpu import native
    from pagoda.ops.cpu.attention import paged_attention_cpu

    assert native.library() is not None
    args = _attention_inputs([1, 1, 1], [1, 9, 17])
    assert paged_attention_cpu(*args) is not ops.DECLINE
    for name in ("rms_norm", "add_rms_norm", "rotary_store_kv", "silu_and_mul"):
        c_kernel = next(k for k in OPS[name].kernels if k.name.endswith("_c"))
        assert all(c_kernel.fn(*a) is not ops.DECLINE for a in _inputs(name)), name


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["f32", "bf16", "int8"])
@pytest.mark.parametrize("heads", [(9, 3), (8, 1)], ids=["g3", "g8"])
@pytest.mark.parametrize("page_size", [16, 4])
def test_verification_rows_attend_exactly_as_decoding_each_token(kv_dtype, heads, page_size) -> None:
    """A proposal's tokens, attended together (the C kernel scores a run of rows in one pass over
    its keys), give each token bit for bit what decoding it alone gives: greedy speculation must
    not change a single output. Runs longer than the kernel takes at once (20 rows), contexts
    crossing a 16-key block, pages shorter than a block, and a lone run (cut between threads)."""
    from pagoda.ops.cpu import native
    from pagoda.ops.cpu.attention import paged_attention_cpu

    if native.library() is None:
        pytest.skip("needs the C kernels")
    hq, hk = heads
    query_lens, seq_lens = [9, 1, 20, 2], [308, 50, 40, 17]
    q, k, v, batch, scale = _attention_inputs(query_lens, seq_lens, page_size=page_size, hq=hq, hk=hk, d=64,
                                              kv_dtype=kv_dtype)
    q = q * 3.0  # sharp attention: a key scored differently shows
    pages = [batch.block_table[b].tolist() for b in range(len(seq_lens))]
    seqs = [([0] * ql, sl - ql, p) for ql, sl, p in zip(query_lens, seq_lens, pages)]
    cpu = torch.device("cpu")
    together = paged_attention_cpu(q, k, v, ForwardBatch.build(seqs, page_size, cpu, verify_seqs=[0, 2, 3]), scale)
    alone_run = paged_attention_cpu(q[:9], k, v, ForwardBatch.build(seqs[:1], page_size, cpu, verify_seqs=[0]), scale)
    assert torch.equal(alone_run, together[:9])
    starts = [0, 9, 10, 30]
    for b, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        for i in range(ql):
            row = starts[b] + i
            one = ForwardBatch.build([([0], sl - ql + i, pages[b])], page_size, cpu)
            alone = paged_attention_cpu(q[row : row + 1], k, v, one, scale)
            assert torch.equal(together[row], alone[0]), (b, i)
    want = ops.reference.paged_attention.reference(q, k, v, ForwardBatch.build(seqs, page_size, cpu), scale)
    torch.testing.assert_close(together, want, rtol=2e-2, atol=2e-2)


def test_every_cpu_kernel_is_exercised() -> None:
    """Guards the table above: a new CPU kernel must come with inputs here."""
    covered_here = {"rms_norm", "add_rms_norm", "paged_attention", "rotary_store_kv", "silu_and_mul", "argmax_rows",
                    "lora_apply"}
    covered_in_test_quant = {"int4_prepack", "int4_linear", "int8_prepack", "int8_linear", "linear_prepack", "packed_linear"}
    covered_elsewhere = {"decoder_stack"}  # test_decoder_stack.py
    assert {name for name, _ in KERNELS} <= covered_here | covered_in_test_quant | covered_elsewhere


def test_declined_input_falls_back_to_next_tier() -> None:
    calls: list[str] = []
    op = Op(name="toy", reference=lambda x: calls.append("reference") or x + 1)
    OPS["toy"] = op
    try:
        @register_kernel("toy", "cpu", priority=5)
        def low(x):
            calls.append("low")
            return x + 1

        @register_kernel("toy", "cpu", priority=50)
        def high(x):
            calls.append("high")
            return ops.DECLINE if x.numel() > 1 else x + 1

        assert op(torch.zeros(1)).item() == 1 and calls == ["high"]
        calls.clear()
        assert op(torch.zeros(3)).tolist() == [1, 1, 1] and calls == ["high", "low"]
        calls.clear()
        op.kernels.clear()
        op._chains.clear()
        op(torch.zeros(2))
        assert calls == ["reference"]
    finally:
        del OPS["toy"]


def test_jiutian_norm_declined_by_native_kernel() -> None:
    from pagoda.ops.cpu.elementwise import rms_norm_native

    x = torch.randn(2, 8)
    assert rms_norm_native(x, torch.ones(8), 1e-6, "jiutian") is ops.DECLINE


def test_c_kernels_build_into_a_fresh_cache_and_fail_soft(tmp_path, monkeypatch, caplog) -> None:
    """A fresh machine compiles them on first use (dropping builds of older sources); without a
    compiler they are off, with a warning."""
    from pagoda.ops.cpu import native

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "kernels" / "pagoda_kernels_0000000000000000.so"
    stale.parent.mkdir()
    stale.write_bytes(b"an older build")
    lib = native.library.__wrapped__()
    assert lib is not None
    assert len(list((tmp_path / "kernels").glob("pagoda_kernels_*.so"))) == 1
    assert not stale.exists()  # replaced, not left to pile up
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.library.__wrapped__() is None
    assert "C kernels failed" in caplog.text
