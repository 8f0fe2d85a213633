"""The CPU platform: always available; kernels in pagoda/ops/cpu/."""

from __future__ import annotations

import os

import torch

from pagoda.ops.cpu import huge_pages
from pagoda.platforms.base import Capabilities, Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    capabilities = Capabilities(graph_capture=False)
    kernel_modules = (
        "pagoda.ops.cpu.elementwise", "pagoda.ops.cpu.linear", "pagoda.ops.cpu.attention",
        "pagoda.ops.cpu.decoder_stack", "pagoda.ops.cpu.lora",
    )

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self) -> torch.device:
        return torch.device("cpu")

    def default_dtype(self) -> torch.dtype:
        # float32 keeps parity with references; quantized and bf16 paths are opt-in.
        return torch.float32

    def kv_cache_budget(self) -> int:
        # Host RAM is shared with everything else; pages are touched lazily, so this is a cap.
        return min(int(self.free_memory() * 0.25), 4 << 30)

    def step_token_budget(self) -> int:
        # A few cores gain nothing from longer steps: the quantized matmuls are at their best
        # per row around 512 rows, and a 1,024-token step of prompts already takes ~0.4 s on 2
        # cores. Against 2,048, serving 32 clients kept its throughput and halved the time to
        # first token (docs/BENCHMARKS.md).
        return 1024

    def step_time_budget_ms(self) -> float:
        # A decoding stream's gap between tokens is one step. A prompt chunk over a long context
        # makes a step of seconds here (512 tokens after 30K: ~2.5 s on 2 cores); 250 ms keeps
        # streams fluid, leaves room for a second prompt's minimum chunk under 0.5 s, and still
        # gives short prompts steps of several hundred tokens, where the matmuls run at their best.
        return 250.0

    def alloc_streamed(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # On transparent huge pages: decode attention streams the KV cache, ~10% faster at 64
        # sequences than on 4 KiB pages (TLB misses under a hypervisor are long walks).
        return huge_pages.empty(shape, dtype)

    def kv_prefault_bytes(self) -> int:
        # Host memory is backed on its first write, and under a hypervisor that can be slow: on
        # this project's 2-core KVM guests ~2.4 ms per MiB never written before (0.42 GB/s; the
        # host takes freed guest memory back, so every new process pays), which made the KV
        # stores of fresh prompts 18% of a 1,024-token prefill step. vLLM and llama.cpp write
        # their whole KV cache at start-up; pagoda writes the first 512 MiB (23K tokens of the
        # default model's bf16 cache): three rounds of 32 new 128-token prompts took 0.87-0.90 s
        # each instead of 0.93-1.31 s, with start-up time and serving's peak memory unchanged
        # (docs/BENCHMARKS.md).
        return 512 << 20

    def total_memory(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self) -> int:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
