"""Training in several processes with ``torchrun``: who this process is, and what they share.

``torchrun --nproc-per-node N [--nnodes M ...] -m busdx train ...`` starts N copies of busdx
per node and tells each its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). :func:`init_world` joins them into one process group (gloo on CPUs, NCCL on
GPUs); training then runs PyTorch's DistributedDataParallel, each process on its share of every
batch. Process 0 (:attr:`World.is_main`) alone writes the run directory, logs and checkpoints.
Launched without torchrun, busdx is a world of one and nothing here costs anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["World", "all_sum", "barrier", "broadcast", "current_world", "init_world"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this node: the GPU this process drives
    local_size: int = 1  # processes on this node (they share its cores)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """``device`` as this process uses it: its own GPU on a multi-GPU node."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def init_world(device: torch.device) -> World:
    """Join torchrun's process group when launched by torchrun (gloo on a CPU, NCCL on CUDA);
    a world of one otherwise. Processes other than rank 0 log warnings only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = current_world()
    if not world.is_main:
        logging.getLogger("busdx").setLevel(logging.WARNING)
    return world


def current_world() -> World:
    """The process group joined by :func:`init_world`, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes (``values`` itself in a world of one)."""
    if not current_world().distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), in every process."""
    if not current_world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a file)."""
    if current_world().distributed:
        dist.barrier()
