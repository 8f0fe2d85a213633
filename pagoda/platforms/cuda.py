"""NVIDIA GPUs through torch.cuda; FlashAttention kernels when flash_attn is installed."""

from __future__ import annotations

import torch

from pagoda.platforms.base import Capabilities, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    capabilities = Capabilities(graph_capture=True)
    kernel_modules = ("pagoda.ops.cuda.flash_attn",)

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @property
    def _api(self):  # torch.cuda; MusaPlatform swaps in torch.musa
        return torch.cuda

    def total_memory(self) -> int:
        return self._api.get_device_properties(self.index).total_memory

    def free_memory(self) -> int:
        return self._api.mem_get_info(self.index)[0]

    def synchronize(self) -> None:
        self._api.synchronize(self.index)

    def load_kernels(self) -> None:
        super().load_kernels()
        if self.device_type == "cuda":
            # cuDNN's SDPA plans a graph for each new shape: 1.5 ms of host time per call on an
            # H200 when decode contexts grow a token a step, 60% of a step (docs/BENCHMARKS.md).
            # The flash, memory-efficient and math kernels take any shape without planning.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._api.manual_seed_all(seed)
