"""Moore Threads GPUs through torch_musa (untested here: no MUSA device on our CI).

torch_musa mirrors torch.cuda's API under torch.musa, registers the "musa" device
type and the "mccl" collective backend. Moore Threads' MATE library installs a
FlashAttention-compatible module under the import name `flash_attn`, so the same
kernel module serves CUDA and MUSA.
"""

from __future__ import annotations

import importlib

import torch

from pagoda.platforms.base import Capabilities
from pagoda.platforms.cuda import CudaPlatform


class MusaPlatform(CudaPlatform):
    name = "musa"
    device_type = "musa"
    dist_backend = "mccl"
    capabilities = Capabilities(graph_capture=True)
    _graph_class = "MUSAGraph"  # torch_musa's name for torch.cuda.CUDAGraph

    @classmethod
    def is_available(cls) -> bool:
        try:
            importlib.import_module("torch_musa")
        except ImportError:
            return False
        musa = getattr(torch, "musa", None)
        return bool(musa is not None and musa.is_available())

    @property
    def _api(self):
        return torch.musa
