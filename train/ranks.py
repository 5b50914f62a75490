"""This process's place in a distributed run, and the two collectives the trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from curate.device import pick_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank ``rank`` of ``world`` (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_ranks(device_name: str) -> Ranks:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); NCCL for CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device_name: str, ranks: Ranks) -> torch.device:
    """The device ``device_name`` picks; under torchrun on CUDA, this rank's own GPU."""
    device = pick_device(device_name)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (a collective: every rank must call it)."""
    if ranks.world == 1:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def from_main(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (a collective)."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (a collective)."""
    if ranks.world > 1:
        dist.all_reduce(values)
        values /= ranks.world
    return values
