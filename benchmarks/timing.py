"""Timing shared by the micro-benchmarks (imported by scripts run from this folder)."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_and_min_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Milliseconds of fn(): the median and the minimum of `repeats` calls after `warmup` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3, times[0] * 1e3
