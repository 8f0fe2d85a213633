"""Platform detection: MUSA, then CUDA, then CPU; `--device` overrides."""

from __future__ import annotations

from pagoda.errors import ConfigError
from pagoda.platforms.base import Capabilities, Platform
from pagoda.platforms.cpu import CpuPlatform
from pagoda.platforms.cuda import CudaPlatform
from pagoda.platforms.musa import MusaPlatform

PLATFORMS: dict[str, type[Platform]] = {"musa": MusaPlatform, "cuda": CudaPlatform, "cpu": CpuPlatform}
DETECTION_ORDER = ("musa", "cuda", "cpu")


def detect_platform_name(device: str = "auto") -> str:
    """The platform's name ("cpu", "cuda", "musa") that ``device`` resolves to, without loading kernels."""
    if device == "auto":
        return next(n for n in DETECTION_ORDER if PLATFORMS[n].is_available())
    name = device.partition(":")[0]
    if name not in PLATFORMS:
        raise ConfigError(f"unknown device {device!r} (choose auto, {', '.join(PLATFORMS)})")
    return name


def get_platform(device: str = "auto") -> Platform:
    """Resolve "auto", "cpu", "cuda", "cuda:1", "musa:0" ... to a Platform (kernels loaded)."""
    if device == "auto":
        name = next(n for n in DETECTION_ORDER if PLATFORMS[n].is_available())
        index = 0
    else:
        name, _, idx = device.partition(":")
        if name not in PLATFORMS:
            raise ConfigError(f"unknown device {device!r} (choose auto, {', '.join(PLATFORMS)})")
        if not PLATFORMS[name].is_available():
            raise ConfigError(f"device {device!r} was requested but is not available on this machine")
        if idx and not idx.isdigit():
            raise ConfigError(f"invalid device index in {device!r}")
        index = int(idx or 0)
    platform = PLATFORMS[name](index)
    platform.load_kernels()
    return platform


__all__ = ["Capabilities", "Platform", "PLATFORMS", "get_platform", "detect_platform_name", "CpuPlatform", "CudaPlatform", "MusaPlatform"]
