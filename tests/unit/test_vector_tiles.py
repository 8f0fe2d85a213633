"""The AVX512-BF16 form of the bf16 tile products (csrc/amx.h) on a CPU that would build the AMX
form: the chunk-attention, quantized-matmul and kernels-used tests again, in a process whose C
kernels are built with PAGODA_NO_AMX=1. On a CPU without AMX those tests run the vector form
already, and this one is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.ops.cpu import native

REPO = Path(__file__).resolve().parents[2]
TESTS = ("tests/unit/test_chunk_attention.py", "tests/unit/test_quant.py", "tests/unit/test_cpu_kernels_used.py")


@pytest.mark.slow
@pytest.mark.skipif(not native.HAS_AMX or "avx512_bf16" not in native.cpu_flags().split(),
                    reason="only where AMX hides the vector form (without AMX the kernel tests run it)")
def test_the_vector_form_passes_the_kernel_tests(tmp_path) -> None:
    # a cache of its own: a build with other flags would replace the AMX build in the shared one
    env = {**os.environ, "PAGODA_NO_AMX": "1", "PAGODA_CACHE_DIR": str(tmp_path)}
    probe = "from pagoda.ops.cpu import native; print(native.HAS_AMX, native.HAS_BF16_TILES)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "True"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]
