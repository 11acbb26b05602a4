"""Data-parallel training over the processes that ``torchrun`` starts (torch DistributedDataParallel).

Launch: ``torchrun --nproc_per_node N -m TibiaReconstructionLib.cli train step1 --config FILE``. Every
process (rank) trains the same models on its slice of each global batch; DDP averages the gradients,
so all ranks hold the same weights after every step. A configuration's ``batch_size`` is per process:
the global batch is ``batch_size x N``. Rank 0 alone writes logs, checkpoints, figures and models
(fitting PCA included) and shows progress. The output folder must be one all ranks can read (resume).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op and
training runs in one process as it always did.
"""

from __future__ import annotations

import atexit
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

_device = torch.device("cpu")  # where collectives put their tensors (CUDA for nccl)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) if there is one; the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    global _device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    _device = device
    return device


def world() -> int:
    """The number of training processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes files (the only one without torchrun)."""
    return rank() == 0


def describe() -> str:
    return f"{world()} processes ({dist.get_backend()})" if dist.is_initialized() else "1 process"


class _Joint(nn.Module):
    """All trainable modules of a run as one module whose forward calls a step function, so that one
    DDP wrapper all-reduces the gradients of every parameter the step uses (a step calls methods other
    than ``forward``, e.g. ``Autoencoder.loss``, and several modules)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable, *args):
        return fn(*args)


def wrap(modules: dict[str, nn.Module]) -> Callable:
    """``call(fn, *args)`` running ``fn(*args)`` so that the gradients of ``modules`` are averaged over the
    ranks at ``backward()``; with one process it is ``fn(*args)``. Broadcasts rank 0's weights first."""
    if world() == 1:
        return lambda fn, *args: fn(*args)
    return nn.parallel.DistributedDataParallel(_Joint(modules))


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's consecutive part of a global batch (a batch shorter than the world is repeated)."""
    n = world()
    if n == 1:
        return indices
    if len(indices) < n:
        indices = indices.repeat(-(-n // len(indices)))[:n]
    return indices.tensor_split(n)[rank()]


def mean(values: dict[str, float]) -> dict[str, float]:
    """``values`` averaged over the ranks (every rank passes the same keys)."""
    if world() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world()).tolist()))


def same_everywhere(value: int) -> bool:
    """True when every rank passes the same integer."""
    if world() == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a model the others read next)."""
    if world() > 1:
        dist.barrier(device_ids=[_device.index]) if _device.type == "cuda" else dist.barrier()
