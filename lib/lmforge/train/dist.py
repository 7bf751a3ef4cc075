"""Process topology: one process, or `torchrun` data parallel (DDP).

Under torchrun the environment carries RANK, LOCAL_RANK and WORLD_SIZE; `setup()` joins the
process group (NCCL on CUDA, gloo on CPU, so data parallel is testable on a laptop) and
`teardown()` leaves it. Only rank 0 writes outputs, checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("train.device is 'cuda' but no CUDA device is visible (fix: device: auto or cpu)")
    return torch.device(name)


def setup(device: str = "auto") -> Dist:
    dev = pick_device(device)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(0, 1, 0, dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few floats over all processes (float64, so sums of losses stay exact enough)."""
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()
