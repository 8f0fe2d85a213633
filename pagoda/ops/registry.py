"""Tiered operator dispatch.

Every op has a pure-PyTorch reference implementation (the spec, always available).
Kernel modules (the wings: pagoda/ops/cpu/, pagoda/ops/cuda/, and the portable
pagoda/ops/sdpa.py) mark their kernels with ``@kernel(op, priority)``; a platform
registers a module's marked kernels for its own device type (``register_module``), so one
module can serve several device types (CUDA and MUSA) and nothing registers on import.
A kernel may decline an input by returning ``DECLINE`` and dispatch falls through to
the next tier, ending at the reference. Dispatch keys on the device type of the first
tensor argument, so the same model code runs on CPU, CUDA and MUSA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from types import ModuleType

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


_KERNEL_MARK = "__pagoda_kernels__"
_registered: set[tuple[str, str]] = set()  # (module name, device type) pairs already registered


def kernel(name: str, priority: int = 10) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function in a kernel module as a kernel of op `name` (stackable: one function
    may serve several ops); `register_module` registers it for a device type."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        marks = getattr(fn, _KERNEL_MARK, ())
        setattr(fn, _KERNEL_MARK, (*marks, (name, priority)))
        return fn

    return wrap


def register_module(module: ModuleType, device_type: str) -> None:
    """Register every kernel `module` marks for `device_type` (once per pair)."""
    if (module.__name__, device_type) in _registered:
        return
    _registered.add((module.__name__, device_type))
    for fn in vars(module).values():
        if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
            for name, priority in getattr(fn, _KERNEL_MARK, ()):
                register_kernel(name, device_type, priority)(fn)


def _device_type(args: tuple[Any, ...]) -> str:
    """Device type of the first tensor argument (or of an argument with a `device`, e.g. packed weights)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cpu" if a.is_cpu else a.device.type  # is_cpu: no device object per call
        device = getattr(a, "device", None)
        if isinstance(device, torch.device):
            return device.type
    return "cpu"
