"""What the Triton kernel modules share: triton's guarded import (without it they import and
decline everything), the dtypes they take, and where their kernels can run in this process."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

AVAILABLE = triton is not None
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CACHE_DTYPES = FLOAT_DTYPES + (torch.int8,)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's CPU interpreter: it was defined while TRITON_INTERPRET=1
    was set (Triton decides when a kernel is decorated)."""
    return AVAILABLE and not isinstance(kernel, triton.runtime.JITFunction)


def runnable(kernel, *tensors: torch.Tensor) -> bool:
    """All tensors on one device `kernel` can run on here. Compiled Triton needs accelerator
    tensors; the interpreter needs host ones, and triton's own library interpreted too (it is
    not when triton was imported before TRITON_INTERPRET was set: then nothing runs)."""
    if not AVAILABLE or any(t.device != tensors[0].device for t in tensors):
        return False
    if interpreted(kernel):
        return tensors[0].device.type == "cpu" and interpreted(tl.zeros)
    return tensors[0].device.type != "cpu"
