"""The CPU C kernels really serve a model's decode steps: a kernel that silently declines
(a stride check too strict for one token, say) would pass every parity test and only
show up as lost speed."""

from __future__ import annotations

import collections

import pytest

from pagoda import LLM, SamplingParams
from pagoda.ops.cpu import native
from pagoda.ops.registry import OPS

C_KERNEL_OPS = ("rms_norm", "add_rms_norm", "rotary_store_kv", "paged_attention", "silu_and_mul", "argmax_rows")


@pytest.mark.parametrize("quantization", [None, "bf16", "int8", "int4"])
def test_no_c_kernel_declines_during_decode(tiny_config_path, monkeypatch, quantization) -> None:
    assert native.library() is not None
    llm = LLM(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01, quantization=quantization)
    served, declined = collections.Counter(), collections.Counter()
    c_ops = C_KERNEL_OPS
    if quantization in ("int4", "int8") and native.library().quant_matmul_available():  # AVX-512 only
        # the layers run as one C call of the same kernels; the final norm, the 8-bit head and
        # the greedy pick outside it
        c_ops = ("decoder_stack", "add_rms_norm", "int8_linear", "argmax_rows")
    for name in c_ops:
        op = OPS[name]
        top = op.chain("cpu")[0]

        def counting(*args, _fn=top, _name=name, **kwargs):
            out = _fn(*args, **kwargs)
            (declined if out is NotImplemented else served)[_name] += 1
            return out

        monkeypatch.setitem(op._chains, "cpu", (counting, *op.chain("cpu")[1:]))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([[5, 6, 7]], params, use_tqdm=False)  # one sequence: steps of a single token
    llm.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params, use_tqdm=False)
    # float32 prefill chunks are left to the portable SDPA kernel on purpose, and so are all
    # prefill chunks on a CPU without bf16 tile products (AMX or AVX512-BF16)
    expected_declines = {"paged_attention"} if quantization is None or not native.HAS_BF16_TILES else set()
    assert set(declined) <= expected_declines, dict(declined)
    assert set(served) == set(c_ops)
