"""NVIDIA GPUs through torch.cuda: Triton kernels (pagoda/ops/cuda/) when triton is installed,
FlashAttention's when flash_attn is, captured decode graphs."""

from __future__ import annotations

import torch

from pagoda.platforms.base import Capabilities, Platform


class DeviceGraph:
    """One decode step captured on torch.cuda's graph API (torch.musa mirrors it)."""

    def __init__(self, api, graph_class: str) -> None:
        self.api, self.graph = api, getattr(api, graph_class)()

    def capture(self, fn, pool=None):
        side = self.api.Stream()
        side.wait_stream(self.api.current_stream())
        with self.api.stream(side):
            fn()  # warm-up outside the capture: lazy set-up (workspaces, autotuning) must not be recorded
        self.api.current_stream().wait_stream(side)
        with self.api.graph(self.graph, pool=pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def pool(self):
        return self.graph.pool()


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    capabilities = Capabilities(graph_capture=True)
    kernel_modules = (
        "pagoda.ops.cuda.flash_attn", "pagoda.ops.cuda.triton_attention", "pagoda.ops.cuda.triton_elementwise",
    )

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    _graph_class = "CUDAGraph"

    @property
    def _api(self):  # torch.cuda; MusaPlatform swaps in torch.musa
        return torch.cuda

    def new_graph(self) -> DeviceGraph:
        return DeviceGraph(self._api, self._graph_class)

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
