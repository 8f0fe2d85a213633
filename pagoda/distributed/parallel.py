"""ParallelContext: what a tensor-parallel model needs to know about its group, and its two
collectives. A model holds one; with one rank every method is the identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pagoda.errors import ConfigError


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` (which the world size must divide)."""
        if total % self.world_size:
            raise ConfigError(f"--tensor-parallel-size {self.world_size} does not divide the model's {total} {what}")
        return total // self.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (row-parallel outputs), summed in float32 whatever x's dtype."""
        if not self.enabled:
            return x
        y = x if x.dtype == torch.float32 else x.float()
        dist.all_reduce(y, group=self.group)
        return y if y is x else y.to(x.dtype)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension (vocabulary-parallel logits)."""
        if not self.enabled:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
