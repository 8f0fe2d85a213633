"""FlashAttention kernels for CUDA and MUSA (Moore Threads' MATE installs as `flash_attn`).

Registered by the CUDA and MUSA platforms; if flash_attn is missing the import fails
quietly and the tiers below serve. Not exercised by CI (no GPU there).
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func  # noqa: F401  (ImportError -> platform skips this module)

from pagoda.ops.forward_batch import ForwardBatch
from pagoda.ops.registry import DECLINE, kernel


@kernel("paged_attention", priority=20)
def paged_attention_flash(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Varlen attention straight over the paged pool (pages must be multiples of 256 tokens)."""
    if (
        batch.page_size % 256 != 0 or q.dtype not in (torch.float16, torch.bfloat16) or out_dtype not in (None, q.dtype)
        or k_cache.dtype != q.dtype
    ):
        return DECLINE
    shape = (-1, batch.page_size) + tuple(k_cache.shape[1:])
    cu_q = torch.tensor(batch.query_starts, dtype=torch.int32, device=q.device)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=q.device)
    cu_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(
        q, k_cache.view(shape), v_cache.view(shape), cu_q, cu_k, max(batch.query_lens), max(batch.seq_lens),
        softmax_scale=scale, causal=True, block_table=batch.block_table.to(torch.int32),
    )

