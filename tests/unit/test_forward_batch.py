"""ForwardBatch.build: the step's tensors from (new tokens, first position, page table) per sequence."""

from __future__ import annotations

import torch

from pagoda.ops.forward_batch import ForwardBatch, ForwardMode


def test_mixed_batch_tensors() -> None:
    page = 4
    seqs = [
        ([7, 8, 9, 10, 11], 2, [5, 9]),  # a prefill chunk crossing from page 5 into page 9
        ([3], 6, [1, 2]),  # a decode at position 6: page 2, offset 2
        ([4, 4], 0, [8]),
    ]
    b = ForwardBatch.build(seqs, page, torch.device("cpu"), lora_slots=[-1, 2, -1])
    assert b.input_ids.tolist() == [7, 8, 9, 10, 11, 3, 4, 4]
    assert b.positions.tolist() == [2, 3, 4, 5, 6, 6, 0, 1]
    assert b.slot_mapping.tolist() == [22, 23, 36, 37, 38, 10, 32, 33]
    assert b.block_table.tolist() == [[5, 9], [1, 2], [8, 0]]
    assert b.context_lens.dtype == torch.int32 and b.context_lens.tolist() == [7, 7, 2]
    assert b.query_lens == [5, 1, 2] and b.seq_lens == [7, 7, 2] and b.mode is ForwardMode.MIXED
    assert b.lora_ids.tolist() == [-1] * 5 + [2] + [-1] * 2


def test_decode_batch_has_no_lora_ids_without_adapters() -> None:
    b = ForwardBatch.build([([1], 0, [3]), ([2], 5, [0, 6])], 4, torch.device("cpu"), lora_slots=[-1, -1])
    assert b.slot_mapping.tolist() == [12, 25] and b.is_decode_only and b.lora_ids is None


def test_verifying_sequences_are_decode_rows_not_chunks() -> None:
    from pagoda.ops.cpu.attention import chunk_rows, decode_rows

    seqs = [([1, 2, 3], 5, [0, 1]), ([4], 9, [2, 3, 4]), ([5, 6], 0, [5])]
    b = ForwardBatch.build(seqs, 4, torch.device("cpu"), verify_seqs=[0])
    assert b.multi_token_seqs == [0, 2] and b.chunk_seqs == [2]
    # each verified token a row whose context ends at itself, as its decode would be
    assert b.view(decode_rows).tolist() == [[0, 0, 6], [1, 0, 7], [2, 0, 8], [3, 1, 10]]
    assert b.view(chunk_rows).tolist() == [[4, 2, 2, 2]]
