"""Tensor parallelism over torch.distributed: the process group, the parallel context a model
gets, the per-step broadcast of the ForwardBatch, and the worker processes.

The model and the ops never name a backend: the platform does (`Platform.dist_backend`:
gloo on CPU, nccl on CUDA, mccl on MUSA), and this package opens the group with it.
"""

from pagoda.distributed.parallel import ParallelContext, SINGLE

__all__ = ["ParallelContext", "SINGLE"]
