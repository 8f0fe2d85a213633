"""Platform: everything pagoda needs to know about a kind of accelerator.

Core code asks the platform (never torch.cuda / torch.musa directly) for its device,
dtypes, memory, allocation and synchronisation, and the platform names the kernel modules
(pagoda/ops/cpu/, pagoda/ops/cuda/) whose kernels it registers for its device type.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from pagoda.ops.registry import register_module


@dataclass(frozen=True)
class Capabilities:
    graph_capture: bool = False  # new_graph() captures decode steps
    supports_bfloat16: bool = True


class Platform:
    name: ClassVar[str] = "base"
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    capabilities: ClassVar[Capabilities] = Capabilities()
    kernel_modules: ClassVar[tuple[str, ...]] = ()
    # Pure-torch kernels every platform registers for its own device type.
    portable_kernel_modules: ClassVar[tuple[str, ...]] = ("pagoda.ops.sdpa",)
    _HOOKS: ClassVar[tuple[str, ...]] = (
        "is_available", "device", "default_dtype", "total_memory", "free_memory", "synchronize", "seed",
        "kv_cache_budget", "step_token_budget", "step_time_budget_ms", "alloc_streamed", "new_graph",
    )

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Fail at class definition if a subclass misspells a hook (e.g. `free_mem`)."""
        super().__init_subclass__(**kwargs)
        for attr in vars(cls):
            if attr.startswith("_") or attr in Platform.__dict__:
                continue
            if callable(getattr(cls, attr)) and attr not in cls._HOOKS:
                raise TypeError(f"{cls.__name__}.{attr} is not a Platform hook")

    def __init__(self, index: int = 0) -> None:
        self.index = index

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    def device(self) -> torch.device:
        return torch.device(self.device_type, self.index)

    def default_dtype(self) -> torch.dtype:
        """The compute dtype `--dtype auto` resolves to."""
        return torch.bfloat16 if self.capabilities.supports_bfloat16 else torch.float16

    def total_memory(self) -> int:
        raise NotImplementedError

    def free_memory(self) -> int:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def kv_cache_budget(self) -> int:
        """Bytes of KV cache to reserve when the user names no budget (after weights are loaded)."""
        return int(self.free_memory() * 0.8)

    def step_token_budget(self) -> int:
        """Tokens one engine step may carry when the user names no budget: enough rows to keep
        the device's matmuls busy, few enough that decoding streams are not held up long by a
        step full of prompt chunks."""
        return 8192

    def step_time_budget_ms(self) -> float:
        """Milliseconds one engine step may take when the user names no budget (0: none, the
        token budget alone bounds a step). 0 on accelerators for now: their steps of 8192 tokens
        are short for the models served there, and no cost model has been measured on one."""
        return 0.0

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def alloc_streamed(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised memory for a buffer every step streams whole (the KV cache)."""
        return torch.empty(shape, dtype=dtype, device=self.device())

    def kv_prefault_bytes(self) -> int:
        """Bytes of the KV cache to write once at start-up, so the first requests do not pay for
        the memory's first touch (0: none; device memory is backed when it is allocated)."""
        return 0

    def new_graph(self):
        """A graph to capture one decode step into (pagoda/engine/graph_runner.py's DeviceGraph),
        where capabilities.graph_capture says the platform has them."""
        raise NotImplementedError(f"{self.name} has no graph capture")

    def load_kernels(self) -> None:
        """Register the kernels of this platform's modules for its device type (idempotent)."""
        for name in (*self.portable_kernel_modules, *self.kernel_modules):
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                if (e.name or "").startswith("pagoda"):
                    raise  # our own code is broken: say so
                continue  # an optional vendor library is missing: the tiers below serve
            register_module(module, self.device_type)

    def describe(self) -> str:
        return f"{self.name} ({self.device()})"
