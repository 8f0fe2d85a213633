"""Small C kernels for the CPU tier, compiled on first use and called through ctypes.

Why C at all: a decode step of a small model is hundreds of tiny ops, and some work
(attention over paged KV) has no torch op that reads pages in place. The sources live
in ``pagoda/ops/cpu/csrc``; each is compiled once per machine with the system C compiler
(``FLAGS``: ``-O3 -march=native -ffast-math -fopenmp``) into a cache keyed by source, flags and CPU, so no
build step is needed at install time. Without a compiler the library is unavailable
and the kernels using it decline, leaving the torch kernels and references to serve.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("pagoda.ops")

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
HEADERS = sorted(CSRC.glob("*.h"))  # not compiled on their own, but part of what a build is made of
# PAGODA_NO_AMX=1 builds the kernels' AVX512-BF16 form of their tile products on an AMX CPU
# (csrc/amx.h), so that form can be tested and measured there too.
NO_AMX = os.environ.get("PAGODA_NO_AMX") == "1"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=gnu11",
         *(["-DPAGODA_NO_AMX"] if NO_AMX else [])]


def cache_dir() -> Path:
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagoda"
    )
    return Path(root) / "kernels"


@cache
def cpu_flags() -> str:
    """The CPU's feature flags (Linux), or the processor name elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they cannot be built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: CPU C kernels are off (slower attention)")
        return None
    digest = hashlib.sha256()
    for part in (platform.machine(), cpu_flags(), " ".join(FLAGS), compiler):
        digest.update(part.encode())
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    target = cache_dir() / f"pagoda_kernels_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            _compile(compiler, target)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            log.warning("building the CPU C kernels failed, they are off: %s", detail.strip()[:500])
            return None
    try:
        return _bind(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as exc:  # an unloadable or incomplete cached build
        log.warning("loading the CPU C kernels from %s failed, they are off: %s", target, exc)
        return None


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, SOURCES), "-lm"],
                       check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: concurrent processes never load a half-written file
    for stale in target.parent.glob("pagoda_kernels_*.so"):  # builds of older sources or flags
        if stale != target:
            stale.unlink(missing_ok=True)


DTYPE_FLAG = {torch.float32: 0, torch.bfloat16: 1}  # the C kernels' dtype flag per activation tensor
KV_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # a KV cache's form (enum kv_kind in kernels.h)
STACK_LAYER_SLOTS = 17  # addresses per layer in decode_stack's table (kernels.h)
STACK_LORA_SLOTS = 24  # entries per layer in decode_stack's LoRA table (kernels.h)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # the C functions and their argument types (see the sources for their meaning)
    "paged_decode_attention": [_P, _I64, _P, _P, _I32, _P, _I64, _P, _I64, _P, _I32, _I64, _I32, _I32, _I32, _I32,
                               _F32, _I32, _I32],
    "chunk_attention_fits": [_I32, _I32, _I32, _I32],
    "paged_chunk_attention": [_P, _I64, _P, _P, _I32, _P, _I64, _P, _I64, _P, _I32, _I64, _I32, _I32, _I32, _I32,
                              _F32, _I32],
    "rms_norm": [_P, _P, _P, _I32, _I64, _I64, _F32, _I32, _I32],
    "add_rms_norm": [_P, _I32, _P, _P, _P, _I32, _P, _I64, _I64, _F32, _I32, _I32],
    "rotary_store_kv": [_P, _P, _P, _I32, _I64, _P, _P, _P, _I32, _P, _P, _I32, _P, _I64, _I32, _I32, _I32, _I32],
    "silu_and_mul": [_P, _I32, _P, _I32, _I64, _I64, _I32],
    "int4_matmul": [_P, _P, _P, _P, _I32, _P, _I32, _I64, _I64, _I64, _I32],
    "int8_matmul": [_P, _P, _P, _I32, _P, _I32, _I64, _I64, _I64, _I32],
    "quant_matmul_silu": [_P, _P, _P, _P, _I32, _P, _I32, _I64, _I64, _I64, _I32, _I32],
    "argmax_rows": [_P, _I32, _I64, _I64, _P, _I32],
    "lora_apply": [_P, _I64, _P, _I64, _P, _I32, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I32],
    "quant_matmul_available": [],
    "quant_matmul_rounded_rows": [],
    "decode_stack": [_P, _I32, _I32, _P, _P, _I64, _I64, _I32, _I32, _I32, _I64, _F32, _I32, _P, _P, _I32, _P, _P, _I64,
                     _P, _P, _I64, _P, _I64, _I32, _F32, _I32, _P, _P, _I32, _I32],
}
RESTYPES = {"chunk_attention_fits": ctypes.c_int, "paged_chunk_attention": ctypes.c_int, "quant_matmul_available": ctypes.c_int,
            "quant_matmul_rounded_rows": ctypes.c_int, "quant_matmul_silu": ctypes.c_int}


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, RESTYPES.get(name)
    return lib


HAS_AMX = "amx_bf16" in cpu_flags().split() and not NO_AMX  # the C kernels' AMX paths apply
# bf16 tile products, on AMX or else on AVX512-BF16 vector units (csrc/amx.h): the chunk kernel serves
HAS_BF16_TILES = HAS_AMX or "avx512_bf16" in cpu_flags().split()
