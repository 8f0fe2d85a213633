"""Weight-only int4 and int8: the canonical formats round-trip, kernels match the reference,
models load."""

from __future__ import annotations

import pytest
import torch

from pagoda import ops
from pagoda.ops.quant import Int4Weight, Int8Weight, dequantize_int4, dequantize_int8, int4_linear, int8_linear, quantize_int4
from pagoda.platforms import get_platform

get_platform("cpu")


def _c_quant_kernels() -> bool:
    from pagoda.ops.cpu import native

    lib = native.library()
    return lib is not None and bool(lib.quant_matmul_available())


needs_c_quant = pytest.mark.skipif(not _c_quant_kernels(), reason="pagoda's quantized matmuls need AVX-512")


def _rounded_rows() -> int:
    """The row count from which the C kernel rounds weights to bfloat16 (0: never, no AMX here)."""
    from pagoda.ops.cpu import native

    return native.library().quant_matmul_rounded_rows() if _c_quant_kernels() else 0


def _c_reference(linear, x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the C kernel computes for x's row count: the reference, or from the rounded row count
    on, the reference with each weight rounded to bfloat16 (the AMX rounded form's tile inputs)."""
    if not _rounded_rows() or x.shape[0] < _rounded_rows():
        return linear.reference(x, q, bias)
    w = (dequantize_int4 if linear is int4_linear else dequantize_int8)(q).bfloat16().float()
    y = x.bfloat16().float() @ w.t()
    return y if bias is None else y + bias


@needs_c_quant
@pytest.mark.parametrize("linear", [int4_linear, int8_linear], ids=["int4", "int8"])
def test_many_rows_round_weights_to_bfloat16_and_nothing_else(linear) -> None:
    """The reference with bfloat16-rounded weights is a different function from the reference: the
    kernel's rows must match the one their path computes, which a loose tolerance would not show.
    Up to 16 rows (FMA and exact AMX forms) the weights are exact."""
    if not _rounded_rows():
        pytest.skip("no AMX on this CPU")
    _, q = (_weight if linear is int4_linear else _int8_weight)(n=64, k=256, seed=7)
    x = torch.randn(_rounded_rows() + 20, 256, generator=torch.Generator().manual_seed(8))
    exact, rounded = linear.reference(x, q), _c_reference(linear, x, q)
    assert (exact - rounded).abs().max() > 1e-3  # the two references differ measurably
    packed = (ops.int4_prepack if linear is int4_linear else ops.int8_prepack)(q)
    torch.testing.assert_close(linear(x, packed), rounded, rtol=1e-5, atol=1e-5)
    for rows in (1, 12, _rounded_rows() - 1):  # FMA, exact AMX
        torch.testing.assert_close(linear(x[:rows], packed), exact[:rows], rtol=1e-5, atol=1e-5)


def _weight(n: int = 64, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, Int4Weight]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = Int4Weight.empty(n, k, 32, torch.device("cpu"))
    q.load_rows(0, w[: n // 2])
    q.load_rows(n // 2, w[n // 2 :])
    return w, q


def test_quantization_error_is_within_half_a_step() -> None:
    w, q = _weight()
    deq = dequantize_int4(q)
    step = (w.reshape(64, -1, 32).amax(-1) - w.reshape(64, -1, 32).amin(-1)) / 15
    err = (deq - w).abs().reshape(64, -1, 32).amax(-1)
    assert (err <= step * 0.5 + step * 0.02 + 1e-6).all()  # + float16 rounding of scale and min


def test_gguf_q4_1_style_weights_are_exact() -> None:
    """Values d*q + m (q in 0..15, every level used) survive exactly when d, m are float16-exact."""
    d = torch.tensor([[2.0**-6], [2.0**-5]])
    m = torch.tensor([[-0.125], [-0.25]])
    q = torch.arange(32).remainder(16).float().repeat(2, 1)
    w = d * q + m
    qw, scales, mins = quantize_int4(w, 32)
    packed = Int4Weight(2, 32, 32, qweight=ops.quant.pack_nibbles(qw), scales=scales, mins=mins)
    assert torch.equal(dequantize_int4(packed), w)


def test_cpu_kernels_match_reference() -> None:
    from pagoda.ops.cpu.linear import Int4Tiles, TorchInt4, int4_linear_cpu, int4_prepack_c, int4_prepack_cpu, quant_linear_c

    tiers = [(int4_prepack_c, quant_linear_c, Int4Tiles, 1e-4)] if _c_quant_kernels() else []
    for prepack, linear, layout, tol in tiers + [(int4_prepack_cpu, int4_linear_cpu, TorchInt4, 2e-2)]:  # bf16 scales
        for batch in (1, 5, 33):
            w, q = _weight(seed=batch)
            g = torch.Generator().manual_seed(100 + batch)
            x, bias = torch.randn(batch, 128, generator=g), torch.randn(64, generator=g)
            ref = int4_linear.reference(x, q, bias) if tol > 1e-4 else _c_reference(int4_linear, x, q, bias)
            packed = prepack(q)
            assert isinstance(packed.packed, layout) and packed.qweight is None  # the CPU kernel took it
            got = linear(x, packed, bias)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)  # both bf16 inputs, fp32 sums
            # per-weight error ~U(+-0.0075) over 128 inputs: std ~0.05, so 0.3 is a 6-sigma bound
            assert (got - x @ w.t() - bias).abs().max() < 0.3
            got_bf16 = linear(x.bfloat16(), packed, bias)
            assert got_bf16.dtype == torch.bfloat16
            torch.testing.assert_close(got_bf16.float(), ref, rtol=2e-2, atol=2e-2)


@needs_c_quant
def test_c_kernel_serves_by_default_and_a_row_does_not_depend_on_its_batch() -> None:
    """On either path a row's sums are its own, in a fixed order: the rows beside it change nothing."""
    from pagoda.ops.cpu.linear import Int4Tiles

    _, q = _weight(n=48, k=96)
    packed = ops.int4_prepack(q)
    assert isinstance(packed.packed, Int4Tiles)
    x = torch.randn(56, 96)
    few = ops.int4_linear(x[:16], packed)  # FMA passes, or exact AMX in blocks of 8 or 16: the same sums
    for lo, hi in ((0, 1), (0, 4), (3, 9), (8, 16), (5, 16)):
        assert torch.equal(ops.int4_linear(x[lo:hi], packed), few[lo:hi])
    many = ops.int4_linear(x, packed)  # the rounded form (from 17 rows on AMX, 24 on vectors): padded last block
    for lo, hi in ((0, 24), (5, 56), (21, 54)):
        assert torch.equal(ops.int4_linear(x[lo:hi], packed), many[lo:hi])


def test_prepack_declines_unaligned_rows_and_reference_serves() -> None:
    w, q = _weight(n=24)
    x = torch.randn(3, 128)
    same = ops.int4_prepack(q)
    assert same.packed is None and same.qweight is not None
    torch.testing.assert_close(ops.int4_linear(x, same), int4_linear.reference(x, same))


@pytest.mark.parametrize("quantization,min_cosine", [("int4", 0.95), ("int8", 0.999)])
def test_quantized_model_tracks_the_float_model(tiny_config_path, quantization, min_cosine) -> None:
    from pagoda import LLM, SamplingParams

    dense = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01)
    quant = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01, quantization=quantization)
    assert quant.engine.loaded.weight_bytes < dense.engine.loaded.weight_bytes * 0.6
    from tests.model_utils import prefill_logits

    ids = list(range(10, 60))
    a = prefill_logits(dense.engine.runner, ids)
    b = prefill_logits(quant.engine.runner, ids)
    # random Gaussian weights: ~10% noise per weight at 4 bits, ~0.5% at 8; the logits stay aligned
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > min_cosine
    out = quant.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_bf16_prepacked_linear_matches_reference() -> None:
    from pagoda.ops.reference import packed_linear

    w = (torch.randn(96, 64) * 0.05).bfloat16()
    bias = torch.randn(96)
    packed = ops.linear_prepack(w)
    assert packed is not None  # oneDNN is available on the CPU builds we test
    for batch in (1, 7, 64):
        x = torch.randn(batch, 64)
        got = ops.packed_linear(x, w, packed, bias)
        ref = packed_linear.reference(x, w, None, bias)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    assert ops.packed_linear.reference(x, w, packed, bias).shape == (64, 96)
    assert ops.linear_prepack(w.float()) is None  # declined: float32 weights use F.linear


def test_prepack_in_row_blocks_equals_whole_matrix_conversion() -> None:
    from pagoda.ops.cpu.linear import int4_prepack_c, int4_prepack_cpu
    from pagoda.ops.quant import unpack_nibbles

    w, q = _weight(n=4096 + 32, k=64)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q.qweight).to(torch.int32), 1)
    assert torch.equal(int4_prepack_cpu(q).packed.packed, whole)
    if not _c_quant_kernels():
        return
    _, q = _weight(n=4096 + 32, k=64)
    n, k = q.out_features, q.in_features
    tiles = int4_prepack_c(q).packed.nibbles  # [N/16, K/32, 16 pairs, 16 outputs]: low nibble = even input
    qs = unpack_nibbles(_weight(n=4096 + 32, k=64)[1].qweight).view(n // 16, 16, k // 32, 16, 2)
    assert torch.equal(tiles & 0xF, qs[..., 0].permute(0, 2, 3, 1)) and torch.equal(tiles >> 4, qs[..., 1].permute(0, 2, 3, 1))


def _int8_weight(n: int = 64, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, Int8Weight]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = Int8Weight.empty(n, k, 32, torch.device("cpu"))
    q.load_rows(0, w[:16])
    q.load_rows(16, w[16:])
    return w, q


def test_gguf_q8_0_style_weights_are_exact_in_int8() -> None:
    d = torch.tensor([[2.0**-9], [3.0 * 2.0**-11]])
    q = (torch.arange(32) * 8 - 127).clamp(-127, 127).float().repeat(2, 1)  # the extremes used, as Q8_0 does
    w = d * q
    q8 = Int8Weight.empty(2, 32, 32, torch.device("cpu"))
    q8.load_rows(0, w)
    assert torch.equal(dequantize_int8(q8), w)
    w, q8 = _int8_weight()
    step = w.reshape(64, -1, 32).abs().amax(-1) / 127
    assert ((dequantize_int8(q8) - w).abs().reshape(64, -1, 32).amax(-1) <= step * 0.51 + 1e-6).all()


@needs_c_quant
def test_int8_c_kernel_matches_reference_and_rows_do_not_depend_on_their_batch() -> None:
    from pagoda.ops.cpu.linear import Int8Tiles

    for batch in (1, 5, 50):  # 50: the rounded form (on AMX or vectors) for the batch and its later half
        w, q = _int8_weight(seed=batch)
        g = torch.Generator().manual_seed(100 + batch)
        x, bias = torch.randn(batch, 128, generator=g), torch.randn(64, generator=g)
        ref = _c_reference(int8_linear, x, q, bias)
        packed = ops.int8_prepack(q)
        assert isinstance(packed.packed, Int8Tiles) and packed.qweight is None
        got = ops.int8_linear(x, packed, bias)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert ops.int8_linear(x.bfloat16(), packed, bias).dtype == torch.bfloat16
        half = batch // 2  # the later half takes the same path as the whole batch: its rows' sums are their own
        assert torch.equal(ops.int8_linear(x[half:], packed, bias), got[half:])


def test_int8_dense_fallback_matches_reference() -> None:
    """CPUs without the C kernel: bfloat16 weights made once, within bf16 rounding of the reference."""
    from pagoda.ops.cpu.linear import DenseBF16, int8_linear_dense, int8_prepack_dense

    w, q = _int8_weight(n=4096 + 32, k=64)
    x = torch.randn(3, 64)
    ref = int8_linear.reference(x, q)
    packed = int8_prepack_dense(q)
    assert isinstance(packed.packed, DenseBF16) and packed.qweight is None
    torch.testing.assert_close(int8_linear_dense(x, packed), ref, rtol=2e-2, atol=2e-2)


def test_int4_models_get_an_int8_output_head(tiny_config_path) -> None:
    from pagoda import LLM
    from pagoda.models.layers import Int8Linear

    llm = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01, quantization="int4")
    assert isinstance(llm.engine.runner.model.lm_head, Int8Linear)


def test_int4_model_without_the_c_kernels_serves_on_torch_tiers(tiny_config_path, monkeypatch) -> None:
    """No compiler (or no AVX-512): torch's int4 kernel and a bfloat16 head serve, close to the C path."""
    from pagoda import LLM
    from pagoda.ops.cpu import linear, native
    from tests.model_utils import prefill_logits

    kw = dict(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01, quantization="int4")
    ids = list(range(10, 40))
    fast = prefill_logits(LLM(**kw).engine.runner, ids)
    monkeypatch.setattr(native, "library", lambda: None)
    llm = LLM(**kw)
    assert isinstance(llm.engine.runner.model.lm_head.qweight.packed, linear.DenseBF16)
    assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj.qweight.packed, linear.TorchInt4)
    slow = prefill_logits(llm.engine.runner, ids)
    assert torch.nn.functional.cosine_similarity(fast, slow, dim=-1).min() > 0.99


@needs_c_quant
@pytest.mark.parametrize("make,linear", [(_weight, int4_linear), (_int8_weight, int8_linear)], ids=["int4", "int8"])
def test_c_kernel_on_long_inputs_matches_reference(make, linear) -> None:
    """1,600 inputs: 50 groups, an odd count, over which every path accumulates; 345 rows take
    the rounded AMX form in two spans of rows (1 MiB of activations each), the last one odd."""
    _, q = make(n=48, k=1600, seed=3)
    x = torch.randn(345, 1600, generator=torch.Generator().manual_seed(4))
    refs = {rows: _c_reference(linear, x[:rows], q) for rows in (1, 5, 21, 345)}  # before prepacking frees q
    packed = (ops.int4_prepack if linear is int4_linear else ops.int8_prepack)(q)
    for rows, ref in refs.items():
        torch.testing.assert_close(linear(x[:rows], packed), ref, rtol=1e-4, atol=1e-4)
