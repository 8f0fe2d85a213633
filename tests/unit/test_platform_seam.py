"""The hardware seam stays a seam: device APIs appear only in platforms/ and the kernel wings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagoda.errors import ConfigError
from pagoda.platforms import CpuPlatform, MusaPlatform, Platform, get_platform

ROOT = Path(__file__).resolve().parents[2] / "pagoda"
ALLOWED = {ROOT / "platforms", ROOT / "ops" / "cpu", ROOT / "ops" / "cuda"}
DEVICE_API = re.compile(r"torch\.(cuda|musa)\b|torch_musa|[\"'](cuda|musa)(:\d+)?[\"']")


def _allowed(path: Path) -> bool:
    return any(path == a or a in path.parents for a in ALLOWED)


def test_no_device_api_outside_platforms() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        if _allowed(path):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DEVICE_API.search(line):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}")
    assert not offenders, "device APIs outside pagoda/platforms:\n" + "\n".join(offenders)


def test_seam_check_catches_a_violation() -> None:
    assert DEVICE_API.search("x = torch.cuda.is_available()")
    assert DEVICE_API.search('device = "cuda:0"')
    assert not DEVICE_API.search("device = platform.device()")


def test_cpu_detected_here_and_musa_absent() -> None:
    assert isinstance(get_platform(), CpuPlatform) or get_platform().name in ("cuda", "musa")
    assert get_platform("cpu").device().type == "cpu"
    assert MusaPlatform.dist_backend == "mccl" and MusaPlatform.device_type == "musa"


def test_bad_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        get_platform("tpu")
    if not MusaPlatform.is_available():
        with pytest.raises(ConfigError, match="not available"):
            get_platform("musa")


def test_misspelled_platform_hook_fails_at_definition() -> None:
    with pytest.raises(TypeError, match="free_mem is not a Platform hook"):
        class Broken(Platform):  # noqa: F841
            def free_mem(self) -> int:
                return 0


def test_step_budget_is_the_platforms_unless_named(tiny_config_path) -> None:
    from pagoda import LLM

    kw = dict(model_config=str(tiny_config_path), load_format="dummy", kv_cache_memory=0.01)
    budget = LLM(**kw).engine.scheduler.config.max_batched_tokens
    assert budget == get_platform("cpu").step_token_budget() == 1024 != Platform().step_token_budget()
    assert LLM(**kw, max_batched_tokens=300).engine.scheduler.config.max_batched_tokens == 300
    with pytest.raises(ConfigError, match="max_batched_tokens must be a positive integer"):
        LLM(**kw, max_batched_tokens=0)


def test_cuda_platform_turns_off_cudnn_attention(monkeypatch) -> None:
    """cuDNN's SDPA re-plans for every new shape (a decode's context grows each step); the CUDA
    platform leaves attention to the kernels that do not (musa's mapping leaves torch.cuda alone)."""
    import torch

    from pagoda.platforms import CudaPlatform

    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: calls.append(on))
    calls: list[bool] = []
    MusaPlatform().load_kernels()
    assert calls == []
    CudaPlatform().load_kernels()
    assert calls == [False]
