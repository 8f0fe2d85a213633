"""The chunk-attention kernel (csrc/chunk_attention.c) against the reference attention:
bf16 and int8 caches, GQA groups, head dims, chunks over prefixes, scattered pages, batches
mixed with decode rows; and a model prefilled in chunks through it against the SDPA path."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda import LLM
from pagoda.cache.kv_pool import KVPool
from pagoda.models.config import ModelConfig
from pagoda.models.layers import LinearFormat
from pagoda.models.llama import LlamaForCausalLM
from pagoda.models.loader import _fill_dummy
from pagoda.ops import reference
from pagoda.ops.cpu import attention, native
from pagoda.ops.cpu.attention import chunk_rows, paged_attention_cpu
from pagoda.ops.cpu.decoder_stack import MAX_CHUNK, decoder_stack_c
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.registry import DECLINE
from pagoda.ops.sdpa import attend_per_sequence
from tests.conftest import TINY_LLAMA
from tests.unit.test_decoder_stack import BASE, PAGE, _clone_kv
from tests.unit.test_ops import _attention_inputs
from tests.unit.test_quant import needs_c_quant

pytestmark = pytest.mark.skipif(not native.HAS_BF16_TILES or native.library() is None,
                                reason="needs bf16 tile products (AMX or AVX512-BF16) and the C kernels")


def _sdpa_only(*args) -> None:
    raise AssertionError("a chunk went to the SDPA path: the C kernel should have served it")


def _check(query_lens: list[int], seq_lens: list[int], monkeypatch, out_dtype=None, q_scale: float = 1.0, edit=None,
           **shape):
    """The kernel (through paged_attention_cpu, which must not fall back) against the float32
    reference: within bf16 attention's tolerance, and on average no further from it than the
    SDPA path in bf16 (the fallback) is. edit(k, v, batch) may change the caches first."""
    q, k, v, batch, scale = _attention_inputs(query_lens, seq_lens, **shape)
    q = q * q_scale  # sharper attention: a wrong mask or a lost key shows
    if edit is not None:
        k, v = edit(k, v, batch)
    with monkeypatch.context() as m:
        m.setattr(attention, "attend_per_sequence", _sdpa_only)
        got = paged_attention_cpu(q, k, v, batch, scale, out_dtype)
    want = reference.paged_attention.reference(q, k, v, batch, scale)
    fallback = torch.empty_like(q)
    attend_per_sequence(q, k, v, batch, scale, fallback, range(batch.batch_size), torch.bfloat16)
    assert got.dtype == (out_dtype or q.dtype)
    err, fallback_err = (got.float() - want).abs(), (fallback.to(got.dtype).float() - want).abs()
    assert err.max() <= 1.5 * fallback_err.max() + 1e-3, (err.max(), fallback_err.max())
    assert err.mean() <= 1.5 * fallback_err.mean() + 1e-5, (err.mean(), fallback_err.mean())


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=["g1", "g3", "g4"])
@pytest.mark.parametrize("d", [64, 128])
def test_chunks_over_prefixes_mixed_with_decodes(kv_dtype, heads, d, monkeypatch) -> None:
    hq, hk = heads
    # chunks of 40, 17, 2, 33, 5 tokens over prefixes of 0, 17, 300, 17, 0; decodes between
    for page_size in (16, 4):  # pages of 16: keys loaded in place; of 4: copied
        _check([40, 17, 1, 2, 33, 5, 1], [40, 34, 301, 302, 50, 5, 70], monkeypatch, page_size=page_size, hq=hq,
               hk=hk, d=d, kv_dtype=kv_dtype)
    _check([23, 1, 9], [323, 12, 26], monkeypatch, torch.bfloat16, q_scale=4.0, page_size=16, hq=hq, hk=hk, d=d,
           kv_dtype=kv_dtype)


@pytest.mark.parametrize("prefix", [0, 17, 300])
def test_every_chunk_length_up_to_40(prefix, monkeypatch) -> None:
    lens = list(range(2, 41))  # a one-token chunk is a decode row (test_one_token_chunks below)
    for kv_dtype in (torch.bfloat16, torch.int8):
        _check(lens, [prefix + n for n in lens], monkeypatch, q_scale=3.0, page_size=16, hq=9, hk=3, d=64,
               kv_dtype=kv_dtype)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("heads,d", [((9, 3), 64), ((8, 1), 128), ((4, 4), 64)], ids=["g3-d64", "g8-d128", "g1-d64"])
def test_contexts_over_several_splits(kv_dtype, heads, d, monkeypatch) -> None:
    """Contexts past the kernel's split (8,192 keys: each split's partial sums merged at the end):
    chunks whose rows straddle a split boundary, end exactly on one, and sit far past it (up to
    five splits)."""
    _check([40, 3, 1, 130, 20], [8200, 16384, 18000, 24000, 33000], monkeypatch, q_scale=3.0, page_size=16, hq=heads[0],
           hk=heads[1], d=d, kv_dtype=kv_dtype)


def _slots(batch: ForwardBatch, b: int, positions: range) -> torch.Tensor:
    """The cache slots of sequence b's positions."""
    pos = torch.tensor(list(positions), dtype=torch.long)
    return batch.block_table[b, pos // batch.page_size] * batch.page_size + pos % batch.page_size


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_scores_that_keep_growing_move_the_running_maximum(kv_dtype, monkeypatch) -> None:
    """Keys whose scores grow along the context, so that each row's running maximum must move
    chunk after chunk by far more than the lazy limit lets the probabilities grow (2^16), with
    the sums rescaled each time; and NaN in the cache slots past each context's end, on the
    pages whose keys the kernel reads in place (bf16): the same results as the reference."""

    def edit(k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        k = k.float() if kv_dtype == torch.bfloat16 else k
        for b, n in enumerate(batch.seq_lens):
            slots = _slots(batch, b, range(n))
            if kv_dtype == torch.bfloat16:
                k[slots] *= (1 + torch.arange(n) / 40.0).view(-1, 1, 1)  # scores grow ~25x along 1,000 keys
                end = (n + batch.page_size - 1) // batch.page_size * batch.page_size
                k[_slots(batch, b, range(n, end))] = float("nan")
                v[_slots(batch, b, range(n, end))] = float("nan")
            else:  # int8 rows: the group scales grow instead
                scales = k[slots, :, 64:].contiguous().view(torch.float16).float()
                scales *= (1 + torch.arange(n) / 40.0).view(-1, 1, 1)
                k[slots, :, 64:] = scales.half().view(torch.int8)
        return (k.to(torch.bfloat16) if kv_dtype == torch.bfloat16 else k), v

    _check([40, 200, 7], [1000, 1200, 517], monkeypatch, q_scale=2.0, edit=edit, page_size=16, hq=9, hk=3, d=64,
           kv_dtype=kv_dtype)


def test_a_rows_result_does_not_depend_on_how_the_work_is_cut() -> None:
    """The same chunk alone or beside others, on one thread or two, one kv head per call or all
    (as tensor-parallel ranks split them): the same bits, so greedy tokens never depend on them."""
    lib = native.library()
    hq, hk, d = 9, 3, 64
    q, k, v, batch, scale = _attention_inputs([300, 37, 5], [5000, 4133, 40], page_size=16, hq=hq, hk=hk, d=d,
                                              kv_dtype=torch.bfloat16)
    rows, bt = batch.view(chunk_rows), batch.block_table

    def run(rows: torch.Tensor, heads: range, threads: int) -> torch.Tensor:
        g = hq // hk
        qh = q[:, heads.start * g : heads.stop * g].contiguous()
        kh, vh = k[:, heads.start : heads.stop].contiguous(), v[:, heads.start : heads.stop].contiguous()
        out = torch.zeros_like(qh)
        n = len(heads)
        assert lib.paged_chunk_attention(qh.data_ptr(), n * g * d, kh.data_ptr(), vh.data_ptr(), 1, bt.data_ptr(),
                                         bt.stride(0), rows.data_ptr(), len(rows), out.data_ptr(), 0, n * g * d,
                                         n * g, n, d, 16, scale, threads) == 1
        return out

    whole = run(rows, range(hk), 2)
    assert torch.equal(whole, run(rows, range(hk), 1))
    assert torch.equal(whole[:300], run(rows[:1], range(hk), 2)[:300])
    per_head = torch.cat([run(rows, range(h, h + 1), 2) for h in range(hk)], dim=1)
    assert torch.equal(whole, per_head)


def test_one_token_chunks() -> None:
    """The kernel itself takes chunks of one token (the attention layer sends those to the
    decode kernel): same results as the decode kernel's, within bf16 rounding."""
    lib = native.library()
    q, k, v, batch, scale = _attention_inputs([1, 1, 1], [1, 18, 301], page_size=16, hq=9, hk=3, d=64,
                                              kv_dtype=torch.bfloat16)
    rows = torch.tensor([[b, b, 1, n] for b, n in enumerate(batch.seq_lens)], dtype=torch.int64)
    out = torch.empty_like(q)
    bt = batch.block_table
    assert lib.paged_chunk_attention(q.data_ptr(), 9 * 64, k.data_ptr(), v.data_ptr(), 1, bt.data_ptr(),
                                     bt.stride(0), rows.data_ptr(), 3, out.data_ptr(), 0, 9 * 64, 9, 3, 64, 16, scale,
                                     torch.get_num_threads()) == 1
    torch.testing.assert_close(out, reference.paged_attention.reference(q, k, v, batch, scale), rtol=1e-2, atol=1e-2)


def test_unfit_shapes_are_declined() -> None:
    """head_dim 16 (not a multiple of 32) and a float32 cache: the kernel does nothing and says
    so, and the attention layer serves the chunks through SDPA."""
    lib = native.library()
    for kv_dtype, d in ((torch.bfloat16, 16), (torch.float32, 64)):
        q, k, v, batch, scale = _attention_inputs([5, 1], [9, 4], page_size=16, hq=6, hk=2, d=d, kv_dtype=kv_dtype)
        rows, bt = batch.view(chunk_rows), batch.block_table
        out = torch.full_like(q, 7.0)
        assert lib.paged_chunk_attention(q.data_ptr(), 6 * d, k.data_ptr(), v.data_ptr(), native.KV_KIND[kv_dtype],
                                         bt.data_ptr(), bt.stride(0), rows.data_ptr(), len(rows), out.data_ptr(), 0,
                                         6 * d, 6, 2, d, 16, scale, 1) == 0
        assert (out == 7.0).all()
        got = paged_attention_cpu(q, k, v, batch, scale)  # the decode row keeps it from declining
        torch.testing.assert_close(got, reference.paged_attention.reference(q, k, v, batch, scale), rtol=1e-2,
                                       atol=1e-2)


class _Counting:
    """native.library() with paged_chunk_attention counted, or (off) declining every call."""

    def __init__(self, lib, off: bool) -> None:
        self._lib, self.off, self.served = lib, off, 0

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def paged_chunk_attention(self, *args) -> int:
        if self.off:
            return 0
        done = self._lib.paged_chunk_attention(*args)
        self.served += done
        return done


@pytest.mark.parametrize("kv_cache_dtype,length",
                         [("bfloat16", 700), ("int8", 700), ("bfloat16", 4096), ("bfloat16", 16384), ("int8", 16384)])
def test_chunked_prefill_logits_match_the_sdpa_path(kv_cache_dtype, length, tmp_path, monkeypatch) -> None:
    """Last-position logits of a prompt prefilled 512 tokens at a time: the kernel's equal the
    SDPA path's within bf16 tolerance (head_dim 64, groups of 3), up to 16K tokens (four of the
    kernel's splits merged)."""
    config = dict(TINY_LLAMA, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                  max_position_embeddings=16384)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    llm = LLM(model_config=str(path), load_format="dummy", kv_cache_memory=0.05, kv_cache_dtype=kv_cache_dtype)
    runner = llm.engine.runner
    ids = torch.randint(0, 500, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    pages = list(range(1, (length + runner.page_size - 1) // runner.page_size + 1))[::-1]  # scattered: reversed
    real = native.library()
    logits = {}
    for off in (True, False):
        lib = _Counting(real, off)
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        for start in range(0, length, 512):
            part = ids[start : start + 512]
            out = runner.forward(runner.prepare([(part, start, pages)]))
        logits[off] = out.last_logits[0].float()
        assert lib.served == (0 if off else runner.model.config.num_hidden_layers * -(-length // 512))
    got, want = logits[False], logits[True]
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1) > 0.999
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@needs_c_quant
def test_the_c_stack_attends_prompt_chunks_with_the_chunk_kernel_and_verification_as_decodes() -> None:
    """A quantized model's one-call layer stack, head_dim 64 over a bf16 cache, beside decodes: a
    5-token verification chunk after 300 cached tokens, a fresh 19-token prompt chunk and a
    300-token one after 40 (longer than MAX_CHUNK: the stack takes it because the chunk kernel
    attends for it). The prompt chunks' attention is the chunk kernel's and the verification's
    the decode kernel's rows, as on the per-op path, so the two paths agree to float32 rounding;
    and the verification rows are exactly what decoding those tokens one at a time computes."""
    cfg = ModelConfig.from_hf_dict(dict(BASE, architectures=["LlamaForCausalLM"], hidden_size=192,
                                        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024))
    model = LlamaForCausalLM(cfg, torch.float32, torch.device("cpu"), quantization=LinearFormat("int8")).eval()
    _fill_dummy(model, seed=1)
    kv = KVPool(cfg.num_hidden_layers, 256, PAGE, 1, 64, torch.bfloat16, torch.device("cpu"))  # 180 pages used
    g = torch.Generator().manual_seed(0)
    for cache in kv.k + kv.v:
        cache[PAGE:].copy_(torch.randn(cache[PAGE:].shape, generator=g))
    seqs, next_page = [], 1
    assert 300 > MAX_CHUNK
    for start, n in ((7, 1), (300, 5), (30, 1), (0, 19), (40, 300)):
        pages = list(range(next_page, next_page + (start + n) // PAGE + 1))[::-1]
        next_page += len(pages)
        seqs.append((torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), start, pages))

    def run(stack: bool, verify: tuple[int, ...]) -> torch.Tensor:
        pool = _clone_kv(kv)
        batch = ForwardBatch.build(seqs, PAGE, torch.device("cpu"), pool.layers, verify_seqs=verify)
        x = model.embed_tokens[batch.input_ids]
        got = decoder_stack_c(model.stack_spec, x, batch) if stack else model.run_layers(x, batch)
        assert got is not DECLINE
        return got[0]

    stack, per_op = run(True, (1,)), run(False, (1,))
    torch.testing.assert_close(stack, per_op, rtol=1e-4, atol=1e-4)
    rows = slice(1, 6)  # the verification chunk's tokens
    assert torch.equal(stack[rows], per_op[rows])  # both the decode kernel's rows, bit for bit
    assert not torch.equal(run(True, ())[rows], stack[rows])  # unmarked, the chunk kernel attends (bf16)
