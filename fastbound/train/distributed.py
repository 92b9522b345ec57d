"""Multi-process data parallelism with `torch.distributed` under ``torchrun``.

``torchrun --nproc_per_node=N -m fastbound.train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
each process then trains on its ``batch_size / N`` rows of every global batch and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPU). Without torchrun the
program runs as one process and none of this is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, global_batch: int) -> slice:
        """This process's rows of a global batch (equal shards)."""
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def topology_from_env() -> Topology:
    return Topology(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str, topo: Topology) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun each process takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("this torch has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", topo.local_rank if topo.world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def start(topo: Topology, device: torch.device) -> None:
    if topo.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The mean of a scalar over all processes (the value itself in one process)."""
    if topo.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / topo.world_size


def barrier(topo: Topology) -> None:
    if topo.world_size > 1:
        dist.barrier()
