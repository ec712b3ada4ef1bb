"""Processes and devices of an image training run: torchrun's process group, each process's device and
seeds, and the data order every process follows.

Several processes: launch with ``torchrun --nproc_per_node=K``; the loop wraps the networks in
:class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, gloo on CPUs), shards the data with a
:class:`DistributedSampler` (:class:`DataOrder`), gives each rank its own pool shard and random streams
(``seed + rank``), and logs and writes the shared checkpoint on rank 0.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from .config import ConfigError

__all__ = ["DataOrder", "barrier", "init_distributed", "resolve_device", "seed_everything"]


def init_distributed() -> tuple[int, int, int, bool]:
    """``(rank, world_size, local_rank, initialised_here)``; initialises the process group under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), True
    return 0, 1, 0, False


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - torchcfm's OT pairing draws from NumPy's global generator
    random.seed(seed)


class DataOrder:
    """Batch indices of step ``s``: a DistributedSampler permutation of epoch ``s // steps_per_epoch``."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.sampler = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.steps_per_epoch = len(self.sampler) // batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {len(self.sampler)} images each of the {world} "
                "process(es) sees: lower it"
            )
        self._epoch = -1
        self._indices: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._indices = torch.tensor(list(self.sampler), dtype=torch.long)
            self._epoch = epoch
        return self._indices[offset * self.batch_size : (offset + 1) * self.batch_size]


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The device of this process: ``device`` as given, with a bare ``"cuda"`` (or None when CUDA is
    available) meaning ``cuda:{local_rank}``, the GPU of this process under torchrun; else the CPU."""
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    resolved = torch.device("cuda" if device is None else device)
    if resolved.type != "cuda" or resolved.index is not None:
        return resolved
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"process {local_rank} on this machine has no GPU of its own (CUDA sees {count}): start at most "
            f"{count} process(es) per machine (torchrun --nproc_per_node), or train on the CPU (device='cpu')"
        )
    return torch.device("cuda", local_rank)
