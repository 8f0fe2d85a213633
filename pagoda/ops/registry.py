"""Tiered operator dispatch.

Every op has a pure-PyTorch reference implementation (the spec, always available).
Platforms register faster kernels for a device type with a priority; a kernel may
decline an input by returning ``DECLINE`` and dispatch falls through to the next
tier, ending at the reference. Dispatch keys on the device type of the first tensor
argument, so the same model code runs on CPU, CUDA and MUSA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DECLINE: Any = NotImplemented
"""Returned by a kernel that cannot handle its input; dispatch tries the next tier."""


@dataclass
class Kernel:
    fn: Callable[..., Any]
    device_type: str
    priority: int
    name: str


@dataclass
class Op:
    """One operator: its reference implementation and the kernels registered over it."""

    name: str
    reference: Callable[..., Any]
    kernels: list[Kernel] = field(default_factory=list)
    _chains: dict[str, tuple[Callable[..., Any], ...]] = field(default_factory=dict)

    def chain(self, device_type: str) -> tuple[Callable[..., Any], ...]:
        """Kernels to try for a device type, best first (cached)."""
        chain = self._chains.get(device_type)
        if chain is None:
            ranked = sorted((k for k in self.kernels if k.device_type == device_type), key=lambda k: -k.priority)
            chain = tuple(k.fn for k in ranked)
            self._chains[device_type] = chain
        return chain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for fn in self.chain(_device_type(args)):
            out = fn(*args, **kwargs)
            if out is not DECLINE:
                return out
        return self.reference(*args, **kwargs)


OPS: dict[str, Op] = {}


def reference(name: str) -> Callable[[Callable[..., Any]], Op]:
    """Declare an op by its reference implementation; returns the dispatching Op."""

    def wrap(fn: Callable[..., Any]) -> Op:
        if name in OPS:
            raise ValueError(f"op {name!r} is already defined")
        op = Op(name=name, reference=fn)
        op.__doc__ = fn.__doc__
        OPS[name] = op
        return op

    return wrap


def register_kernel(name: str, device_type: str, priority: int = 10) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a faster kernel for `name` on `device_type` (higher priority is tried first)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        op = OPS.get(name)
        if op is None:
            raise KeyError(f"cannot register a kernel for unknown op {name!r}")
        op.kernels.append(Kernel(fn=fn, device_type=device_type, priority=priority, name=f"{fn.__module__}.{fn.__qualname__}"))
        op._chains.clear()
        return fn

    return wrap


def kernels_of(name: str) -> list[Kernel]:
    """The kernels registered over an op (for tests that check each against its reference)."""
    return list(OPS[name].kernels)


def _device_type(args: tuple[Any, ...]) -> str:
    """Device type of the first tensor argument (or of an argument with a `device`, e.g. packed weights)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cpu" if a.is_cpu else a.device.type  # is_cpu: no device object per call
        device = getattr(a, "device", None)
        if isinstance(device, torch.device):
            return device.type
    return "cpu"
