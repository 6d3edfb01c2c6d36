"""Data-parallel training across the processes `torchrun` starts (NCCL on GPUs, gloo on CPU).

torchrun sets `RANK`, `LOCAL_RANK` and `WORLD_SIZE`; without them every helper here is the
single-process no-op, so one training loop serves both. Each step's global batch is the one a
single process would train on; every rank takes a contiguous share of it, and the loss is
normalised by the answer-token count of the whole global batch, so the averaged gradient (and
the trained adapter) matches the single-process run up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, local rank (its GPU) and world size."""

    rank: int = 0
    local: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """From torchrun's environment; a plain `python -m` run is rank 0 of 1."""
        env = os.environ
        return cls(
            int(env.get("RANK", "0")),
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("WORLD_SIZE", "1")),
        )

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process trains."""
        return self.world > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch (slice sizes differ by at most one)."""
        n = len(items)
        return list(items[self.rank * n // self.world : (self.rank + 1) * n // self.world])

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU (`LOCAL_RANK`) on CUDA."""
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local)
        return torch.device("cuda", self.local)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the job's process group for the block (no-op for a single process)."""
    if not ranks.distributed:
        yield
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def data_parallel(module: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """`module` under DistributedDataParallel when several processes train, else itself.

    Buffers (rotary tables) are constants here, so they are not re-broadcast every forward.
    """
    if not ranks.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def all_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`values` summed over every rank (in place; the tensor itself for a single process)."""
    if ranks.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def agree(value: int, ranks: Ranks, what: str) -> int:
    """Check every rank holds the same `value` (e.g. the step it resumes from) and return it."""
    if not ranks.distributed:
        return value
    seen: list[int | None] = [None] * ranks.world
    dist.all_gather_object(seen, value)
    if len(set(seen)) != 1:
        raise RuntimeError(f"ranks disagree on {what}: {seen}")
    return value


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ranks.distributed:
        dist.barrier()
