"""CPU paged attention: decode tokens read their context from the pages in place (the C
kernel, csrc/paged_attention.c); so do prefill chunks where the CPU has bf16 tile products (AMX,
or AVX512-BF16's vector form of them) and the cache is bf16 or int8 (csrc/chunk_attention.c),
and otherwise they go to torch's flash SDPA.

The C kernels read a step's tokens as rows (token index, batch index, context length):
those views of the ForwardBatch are built here, once per step, by `batch.view`."""

from __future__ import annotations

from typing import Iterable

import torch

from pagoda.ops.cpu import native
from pagoda.ops.cpu.native import DTYPE_FLAG, HAS_AMX, HAS_BF16_TILES, KV_KIND
from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.registry import DECLINE, kernel
from pagoda.ops.sdpa import attend_per_sequence


def decode_rows(batch: ForwardBatch) -> torch.Tensor:
    """[n, 3] int64 on the host: (token index, batch index, context length), the layout the C
    decode kernel reads; a row per single-token sequence, and per token of a sequence verifying
    a proposal (attended exactly as decoding it would be)."""
    verify = set(batch.verify_seqs)
    return _rows_of(batch, [b for b, q in enumerate(batch.query_lens) if q == 1 or b in verify])


def token_rows(batch: ForwardBatch) -> torch.Tensor:
    """decode_rows' layout for every token: a prompt token is a row whose context ends at
    itself (its chunk's keys are stored before attention runs), so the decode kernel can
    attend for it too; the same tensor as decode_rows when no sequence is a prompt chunk."""
    if not batch.chunk_seqs:
        return batch.view(decode_rows)
    return _rows_of(batch, range(batch.batch_size))


def _rows_of(batch: ForwardBatch, seqs: Iterable[int]) -> torch.Tensor:
    """The rows of every token of sequences `seqs`, each token's context ending at itself."""
    rows = []
    for b in seqs:
        q, start = batch.query_lens[b], batch.query_starts[b]
        first_len = batch.seq_lens[b] - q + 1
        rows += [(start + i, b, first_len + i) for i in range(q)]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def chunk_rows(batch: ForwardBatch) -> torch.Tensor:
    """[n, 4] int64 on the host, one row per prompt chunk: (first token index, batch index,
    query length, context length); the layout the C chunk kernel reads."""
    rows = [(batch.query_starts[b], b, batch.query_lens[b], batch.seq_lens[b]) for b in batch.chunk_seqs]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def decode_max_len(batch: ForwardBatch) -> int:
    """Longest context among decode_rows (0 if none)."""
    rows = batch.view(decode_rows)
    return int(rows[:, 2].max()) if len(rows) else 0


@kernel("paged_attention", priority=20)
def paged_attention_cpu(q, k_cache, v_cache, batch: ForwardBatch, scale, out_dtype=None):
    """Decode tokens read their context from the pages in place (C kernel); so do prefill
    chunks over a bf16 or int8 cache where the CPU has bf16 tile products (C flash kernel: AMX,
    or AVX512-BF16 vectors). Other chunks, and shapes that kernel does not take, go to torch's
    flash SDPA one sequence at a time, in bfloat16 when the cache is bfloat16 or int8 and the
    CPU has AMX (2.7x float32's speed there)."""
    lib = native.library()
    rows = batch.view(decode_rows)
    out_dtype = out_dtype or q.dtype
    in_c = (
        lib is not None and q.dtype == torch.float32 and k_cache.dtype in KV_KIND and out_dtype in DTYPE_FLAG
        and q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    )
    decode_in_c = in_c and len(rows) > 0
    bf16_cache = k_cache.dtype in (torch.bfloat16, torch.int8)
    compute = torch.bfloat16 if bf16_cache and HAS_AMX else q.dtype
    chunks_in_c = in_c and bf16_cache and HAS_BF16_TILES and bool(batch.chunk_seqs)
    if not decode_in_c and not chunks_in_c and compute == q.dtype:
        return DECLINE  # exactly what the portable SDPA kernel does
    out = torch.empty(q.shape, dtype=out_dtype)
    _, hq, d = q.shape
    block_table = batch.block_table
    seqs = batch.chunk_seqs if decode_in_c else range(batch.batch_size)
    if decode_in_c:
        lib.paged_decode_attention(
            q.data_ptr(), hq * d, k_cache.data_ptr(), v_cache.data_ptr(), KV_KIND[k_cache.dtype],
            block_table.data_ptr(), block_table.stride(0), rows.data_ptr(), len(rows), out.data_ptr(),
            DTYPE_FLAG[out_dtype], hq * d, hq, k_cache.shape[1], d, batch.page_size, scale, batch.view(decode_max_len),
            torch.get_num_threads(),
        )
    if chunks_in_c:
        chunks = batch.view(chunk_rows)
        if lib.paged_chunk_attention(
            q.data_ptr(), hq * d, k_cache.data_ptr(), v_cache.data_ptr(), KV_KIND[k_cache.dtype],
            block_table.data_ptr(), block_table.stride(0), chunks.data_ptr(), len(chunks), out.data_ptr(),
            DTYPE_FLAG[out_dtype], hq * d, hq, k_cache.shape[1], d, batch.page_size, scale, torch.get_num_threads(),
        ):
            seqs = ()  # every single-token sequence was a decode row
    if seqs:
        attend_per_sequence(q, k_cache, v_cache, batch, scale, out, seqs, compute)
    return out
