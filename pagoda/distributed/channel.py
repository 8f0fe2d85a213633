"""StepChannel: rank 0 broadcasts each step's ForwardBatch to the other ranks.

A step is one int64 message: an 8-word header, then input ids, positions, slot mapping, query
lengths, sequence lengths, the block table and the all-logits indices. Messages up to
CAPACITY words (32 KiB: a decode step of ~100 sequences with 1K-token contexts) go in one
broadcast of a fixed buffer; a longer one sends its header first and the rest in a second
broadcast. The KV caches are not sent: every rank has its own share of the pool, at the
same page ids.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from pagoda.distributed.parallel import ParallelContext
from pagoda.ops.forward_batch import ForwardBatch

CAPACITY = 4096
HEADER = 8
STEP, STOP = 1, 2


class StepChannel:
    def __init__(self, parallel: ParallelContext, device: torch.device) -> None:
        self.parallel, self.device = parallel, device
        self.buf = torch.zeros(CAPACITY, dtype=torch.long, device=device)

    # ---- rank 0 ------------------------------------------------------------------------------

    def send_step(self, batch: ForwardBatch) -> None:
        dev = self.device
        lists = torch.tensor([*batch.query_lens, *batch.seq_lens, *batch.all_logits, *batch.verify_seqs],
                             dtype=torch.long, device=dev)
        payload = torch.cat([batch.input_ids.long(), batch.positions.long(), batch.slot_mapping.long(), lists,
                             batch.block_table.long().reshape(-1)])
        bsz, pages = batch.block_table.shape
        header = torch.tensor([STEP, batch.num_tokens, bsz, pages, len(batch.all_logits), batch.page_size,
                               payload.numel(), len(batch.verify_seqs)], dtype=torch.long, device=dev)
        self._send(header, payload)

    def send_stop(self) -> None:
        header = torch.tensor([STOP, 0, 0, 0, 0, 0, 0, 0], dtype=torch.long, device=self.device)
        self._send(header, header[:0])

    def _send(self, header: torch.Tensor, payload: torch.Tensor) -> None:
        n = payload.numel()
        self.buf[:HEADER] = header
        if n <= CAPACITY - HEADER:
            self.buf[HEADER : HEADER + n] = payload
            dist.broadcast(self.buf, src=0, group=self.parallel.group)
        else:
            dist.broadcast(self.buf, src=0, group=self.parallel.group)
            dist.broadcast(payload.contiguous(), src=0, group=self.parallel.group)

    # ---- the other ranks ---------------------------------------------------------------------

    def recv_step(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ForwardBatch | None:
        """The next step's batch over this rank's KV caches, or None when rank 0 stops."""
        dist.broadcast(self.buf, src=0, group=self.parallel.group)
        cmd, t, bsz, pages, n_all, page_size, n, n_verify = self.buf[:HEADER].tolist()
        if cmd == STOP:
            return None
        if n <= CAPACITY - HEADER:
            payload = self.buf[HEADER : HEADER + n].clone()
        else:
            payload = torch.empty(n, dtype=torch.long, device=self.device)
            dist.broadcast(payload, src=0, group=self.parallel.group)
        ids, positions, slots, lists, table = payload.split([t, t, t, 2 * bsz + n_all + n_verify, bsz * pages])
        lists = lists.tolist()
        seq_lens = lists[bsz : 2 * bsz]
        return ForwardBatch(
            input_ids=ids, positions=positions, query_lens=lists[:bsz], seq_lens=seq_lens, slot_mapping=slots,
            block_table=table.reshape(bsz, pages), context_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            page_size=page_size, kv_caches=kv_caches, all_logits=tuple(lists[2 * bsz : 2 * bsz + n_all]),
            verify_seqs=tuple(lists[2 * bsz + n_all :]),
        )
