"""Compile the Triton kernels for an NVIDIA GPU without one: `python -m tests.triton_compile_check`.

The interpreter (tests/unit/test_triton_kernels.py) checks what the kernels compute, not
that Triton's GPU compiler accepts them, nor what they cost in registers. This builds each
kernel's main variants ahead of time for sm_90 (Triton's own ptxas, no driver needed) and
prints each one's registers and spill stack from cuobjdump. Must run WITHOUT
TRITON_INTERPRET (interpreted kernels cannot be compiled). Exit status 1 if a build fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagoda.ops.cuda import triton_attention as ta
from pagoda.ops.cuda import triton_elementwise as te

FLOAT_ARGS = {"qk_scale", "eps"}


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument's type: pointers as given (default *bf16), scalars i32 (fp32 for FLOAT_ARGS)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _attention(cache: str, dot, int8_scales: bool) -> dict[str, str]:
    scale = "fp16" if int8_scales else cache
    q = "fp32" if dot == tl.float32 else "bf16"
    return {"q_ptr": q, "k_ptr": cache, "v_ptr": cache, "ks_ptr": scale, "vs_ptr": scale, "block_table_ptr": "i32",
            "seq_lens_ptr": "i32", "query_starts_ptr": "i32", "m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32"}


def cases():
    """(label, kernel, pointer dtypes, constexprs), as the launchers pick them for a 128-wide head
    (and their warps, in main)."""
    out = []
    for cache, dot, prec, block_n, block_q in (("bf16", tl.bfloat16, None, 32, 16), ("i8", tl.bfloat16, None, 32, 16),
                                               ("fp32", tl.float32, "ieee", 16, 4)):
        ptrs = _attention(cache, dot, cache == "i8")
        common = dict(HEAD_DIM=128, D_PAD=128, BLOCK_N=block_n, QUANT_GROUP=32, INT8=cache == "i8", DOT_DTYPE=dot,
                      PRECISION=prec)
        for splits in (8, 1):
            out.append((f"decode {cache} splits={splits}", ta._decode_split_kernel, ptrs,
                        dict(NUM_SPLITS=splits, GROUP=4, GROUP_PAD=16, **common)))
        out.append((f"prefill {cache}", ta._prefill_kernel, ptrs,
                    dict(CAUSAL=True, GROUP=4, GROUP_PAD=4, BLOCK_Q=block_q, **common)))
    # an int8 head of one scale group (head_dim 32): a one-wide group axis
    out.append(("decode i8 head_dim=32", ta._decode_split_kernel, _attention("i8", tl.bfloat16, True),
                dict(NUM_SPLITS=1, GROUP=1, GROUP_PAD=16, HEAD_DIM=32, D_PAD=32, BLOCK_N=32, QUANT_GROUP=32, INT8=True,
                     DOT_DTYPE=tl.bfloat16, PRECISION=None)))
    out.append(("decode reduce", ta._decode_reduce_kernel, {"m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32"},
                dict(NUM_SPLITS=8, S_PAD=8, HEAD_DIM=128, D_PAD=128)))
    norm_ptrs = {"r_ptr": "fp32", "sum_ptr": "fp32"}
    out.append(("add+norm", te._rms_norm_kernel, norm_ptrs,
                dict(HAS_RESIDUAL=True, JIUTIAN=False, BLOCK=4096, ONE_BLOCK=True)))
    out.append(("add+norm two-pass", te._rms_norm_kernel, norm_ptrs,
                dict(HAS_RESIDUAL=True, JIUTIAN=True, BLOCK=4096, ONE_BLOCK=False)))
    out.append(("silu*mul", te._silu_and_mul_kernel, {}, dict(BLOCK=1024)))
    for cache in ("bf16", "i8"):
        scale = "fp16" if cache == "i8" else cache
        out.append((f"rotary+store {cache}", te._rotary_store_kernel,
                    {"cos_ptr": "fp32", "sin_ptr": "fp32", "kc_ptr": cache, "vc_ptr": cache, "ks_ptr": scale,
                     "vs_ptr": scale, "slot_ptr": "i64"},
                    dict(HEAD_DIM=128, NG_PAD=4, G=32, INT8=cache == "i8")))
    out.append(("sample (exp race)", te._argmax_kernel, {"x_ptr": "fp32", "noise_ptr": "fp32", "out_ptr": "i64"},
                dict(HAS_NOISE=True, BLOCK=1024)))
    return out


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in text.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.startswith(("REG:", "STACK:")))


def main(arch: int = 90) -> int:
    if ta.interpreting():
        print("TRITON_INTERPRET is set: nothing to compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", arch, 32)
    failed = 0
    for label, fn, ptrs, constexprs in cases():
        if fn in (te._rms_norm_kernel, te._argmax_kernel):
            warps = te._warps(constexprs["BLOCK"])
        else:
            warps = ta._prefill_warps(constexprs["DOT_DTYPE"]) if fn is ta._prefill_kernel else 4
        src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs), constexprs=constexprs)
        try:
            kernel = triton.compile(src, target=target, options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"{label:22s} FAILED: {exc}")
            continue
        print(f"{label:22s} sm_{arch} {_resources(kernel.asm['cubin'])} shared={kernel.metadata.shared}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
