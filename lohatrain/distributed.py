"""Data-parallel training over the processes torchrun starts (`torchrun --nproc-per-node N -m lohatrain train …`).

Every process builds the same model, dataset and seeded streams, and draws the same global batches; each takes
its equal share of a batch's images, DistributedDataParallel averages the network's gradients, and every
process then takes the same optimizer step. Rank 0 alone reports progress and writes files. One process
without torchrun is rank 0 of 1 (`ALONE`): no process group, and the run is exactly the plain one.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import dataset as ds
from .errors import LohatrainError

# How long a collective waits for a process that has stopped answering: a process that exits is noticed at
# once (its connections close, and torchrun stops the others); this bounds a hung one. Processes meet every
# step and after caching the latents, which each does for its own images: well within this.
TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that reports and writes."""
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise LohatrainError(f"the batch size ({batch_size}) is the batch of all {self.world_size} processes "
                                 f"together and must divide evenly among them: choose a multiple of "
                                 f"{self.world_size}")

    def share(self, size: int) -> slice:
        """This process's part of a batch of `size` images: an equal slice. A bucket's smaller last batch that
        does not divide evenly is trained whole by every process (the average of equal gradients is that
        gradient), rather than leaving a process without an image."""
        if size % self.world_size:
            return slice(0, size)
        part = size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def images_needed(self, sampler: ds.BucketBatchSampler, steps: int, count: int) -> set[int]:
        """The images (of `count`) whose latents this process caches: alone, all of them, as it always has;
        one of several, those in its shares of the next `steps` batches (a large dataset trained for an epoch
        or two is then encoded once over all the processes, not once by each)."""
        if self.world_size == 1:
            return set(range(count))
        return {i for batch in sampler.upcoming(steps) for i in batch[self.share(len(batch))]}

    def parallel(self, module: nn.Module) -> nn.Module:
        """`module` wrapped in DistributedDataParallel when there are several processes: its parameters are
        broadcast from rank 0 once, and their gradients averaged in each backward pass. The same parameters
        train at every step, and some never do (a text encoder's layers past CLIP skip): a static graph lets
        DDP find those in the first step and leave them without a gradient, as one process does."""
        if self.world_size == 1:
            return module
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                   static_graph=True)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the processes (detached)."""
        value = value.detach()
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def any(self, flag: bool) -> bool:
        """Whether any process says yes, so that all stop at the same step."""
        if self.world_size == 1:
            return flag
        votes = torch.tensor([int(flag)])  # a CPU tensor: gloo carries it (join_torchrun sets gloo up for the CPU)
        dist.all_reduce(votes)
        return bool(votes.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


ALONE = Ranks()


def join_torchrun() -> Ranks:
    """Join torchrun's process group when torchrun started this process (it sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT; multi-node runs meet through its own rendezvous); else `ALONE`.
    Each process takes the GPU of its LOCAL_RANK; NCCL carries GPU tensors, gloo CPU ones."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        return ALONE
    # When a process fails, torchrun stops the others with SIGTERM: stop as on Ctrl-C rather than at once, so
    # rank 0 keeps the run's state to resume from and no temporary file is left.
    signal.signal(signal.SIGTERM, _interrupt)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _interrupt(signum, frame):
    if sys.exc_info()[0] is None:  # else this process is already stopping on an error (keeping its state)
        raise KeyboardInterrupt


def leave() -> None:
    """Close the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
