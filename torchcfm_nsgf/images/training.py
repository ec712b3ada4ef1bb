"""One training loop for every image method (NSGF, NSGF++ and torchcfm's flow-matching baselines).

The recipe is torchcfm's CIFAR-10 one: Adam, linear learning-rate warm-up, gradient clipping (per network),
an exponential moving average (EMA) of the weights, data in ``[-1, 1]``, random horizontal flips (CIFAR-10).
The source is ``x0 ~ N(0, I)`` of the data's shape.

Resuming is exact: a run interrupted after any checkpoint and resumed with ``resume=True`` ends with the
same parameters as an uninterrupted run (same seed, same number of processes, CPU). A checkpoint holds the
networks, their EMA, the optimiser, the scheduler, the step and, per process, every global random generator
(torch CPU/CUDA, NumPy — torchcfm's OT pairing draws from it — and python) and the method's state. The data
order is a pure function of ``(seed, epoch, step)`` (a :class:`DistributedSampler` permutation), so it needs
no state of its own.

**The NSGF trajectory pool is restored, not rebuilt**: a memory pool is stored in the per-process file
(items and counters: resuming is exact, at the cost of the pool's size on disk); a disk pool keeps its
memory-mapped files and the checkpoint stores its counters only, so slots rewritten after the checkpoint
are not rolled back (resuming continues the run but is not bit-exact).

Files under ``ckpt_dir``: ``checkpoint.pt`` (written by rank 0) and ``rank{r}-step{s}.pt`` (one per
process), all written atomically; ``checkpoint.pt`` is replaced last, so it always names complete files.
Temporaries an interrupted write left behind (``.checkpoint.pt.partial-*.tmp``, ``.rank{r}-step*.partial-*.tmp``)
are deleted when the run starts and at every checkpoint. ``ckpt_dir`` must be writable: it is checked (and
created) before anything else happens.

Short runs: unless given, the warm-up and the EMA decay scale with ``total_steps``
(:func:`default_warmup`, :func:`default_ema_decay`), so that a run of a few hundred steps still ends with an
EMA of trained weights; the values a run starts with are stored in its checkpoint and kept when it resumes.

Class-conditional runs (``conditional=True``): the data loader yields each batch's labels, every method's
networks take them (torchcfm's UNet with ``class_cond=True``, 10 classes for MNIST and CIFAR-10, plus a null
label with ``cfg_dropout > 0`` for classifier-free guidance), NSGF's pool stores them, and the checkpoint
records the setting, which cannot change on resume.

Several processes: launch with ``torchrun --nproc_per_node=K``; the loop wraps the networks in
:class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs, gloo on CPUs), shards the data with a
:class:`DistributedSampler`, gives each rank its own pool shard and random streams (``seed + rank``), and
logs and writes the shared checkpoint on rank 0. ``batch_size`` is per process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .._io import check_writable_dir, remove_stale_temps
from .checkpoint import CheckpointError, atomic_save, get_rng_state, load_checkpoint, set_rng_state
from .data import NUM_CLASSES, ImageData, load_images, to_unit_range
from .methods import ImageMethod, NSGFSettings, make_method

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "checkpoint_step",
    "default_ema_decay",
    "default_warmup",
    "ema_update",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "torchcfm_nsgf.images.checkpoint/1"
# settings that must not change between a run and its resumption
_FIXED_ON_RESUME = (
    "dataset",
    "method",
    "preset",
    "sigma",
    "batch_size",
    "seed",
    "hflip",
    "ema_decay",
    "conditional",
    "cfg_dropout",
)
# torchcfm's CIFAR-10 recipe, the ceilings of the values that scale with the run's length
_MAX_WARMUP = 5000
_MAX_EMA_DECAY = 0.9999
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class ConfigError(ValueError):
    """Settings that cannot work: with each other, with the checkpoint being resumed, or with the disk."""


def default_warmup(total_steps: int) -> int:
    """Warm-up steps when none is given: 5% of the run, at most torchcfm's 5000."""
    return min(_MAX_WARMUP, total_steps // 20)


def default_ema_decay(total_steps: int) -> float:
    """EMA decay when none is given: torchcfm's 0.9999, lowered until the EMA horizon ``1 / (1 - decay)``
    is at most a tenth of the run (0.98 for 500 steps, 0.9995 for 20 000, 0.9999 from 100 000 on)."""
    return max(0.0, min(_MAX_EMA_DECAY, 1.0 - 10.0 / total_steps))


@dataclass
class TrainConfig:
    """Settings of :func:`train` (the example scripts expose each as a ``--flag``).

    Attributes
    ----------
    dataset : {"mnist", "cifar10"}
    data_root : str
        torchvision root holding ``MNIST/raw`` or ``cifar-10-batches-py``.
    method : str
        ``nsgf++``, ``nsgf``, ``otcfm``, ``icfm``, ``fm`` or ``rf`` (those this installation offers).
    total_steps : int
        Optimiser steps of the whole run (across resumptions).
    batch_size : int
        Images per step and per process.
    lr, grad_clip : float
        Adam learning rate, gradient-norm clip per network.
    warmup : int, optional
        Linear learning-rate warm-up steps; default :func:`default_warmup` of ``total_steps``.
    ema_decay : float, optional
        EMA decay; default :func:`default_ema_decay` of ``total_steps``. A decay too slow for the run (the
        initial random weights keep more than 10% of the final EMA) draws a warning.
    hflip : bool, optional
        Random horizontal flips; default on for CIFAR-10, off for MNIST.
    preset : str, optional
        UNet preset (``cifar10``, ``mnist``, ``tiny``); default: the dataset's.
    sigma : float
        σ of the I-CFM / OT-CFM / FM paths.
    seed : int
    ckpt_dir : str, optional
        Where checkpoints go; None disables them.
    ckpt_every : int
        Checkpoint every this many steps (and at the end of the run).
    resume : bool
        Continue from ``ckpt_dir/checkpoint.pt`` (an error if it is missing). Without it, an existing
        checkpoint is never overwritten: the run refuses to start.
    stop_after : int, optional
        Stop after this many steps of this invocation without a final checkpoint, as if killed (tests).
    time_budget_s : float, optional
        Stop (and checkpoint) once the training time exceeds this many seconds (pool warm-up included).
    budget_clock : {"wall", "cpu"}
        The clock of ``time_budget_s``: wall time, or this process's CPU time (all its threads). With one
        thread per process the CPU clock is the wall time of an unloaded core, so methods trained side by
        side on a shared machine still get equal budgets.
    device : str, optional
        Default: ``cuda:{local_rank}`` when CUDA is available, else ``cpu``; a bare ``"cuda"`` also means
        ``cuda:{local_rank}``.
    progress : bool
        tqdm progress bars on rank 0.
    log_every : int
    download, verify_checksums : bool
        Passed to :func:`~torchcfm_nsgf.images.data.load_images`.
    sample_steps : int
        Default Euler steps of the flow-matching baselines' sampler.
    conditional : bool
        Class-conditional training on the dataset's labels (every method).
    cfg_dropout : float
        Label-dropout probability for classifier-free guidance (needs ``conditional``); 0.1 is the usual
        value. Sampling then accepts a guidance scale.
    nsgf : NSGFSettings
    """

    dataset: str = "cifar10"
    data_root: str = "./data"
    method: str = "otcfm"
    total_steps: int = 400_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int | None = None
    grad_clip: float = 1.0
    ema_decay: float | None = None
    hflip: bool | None = None
    preset: str | None = None
    sigma: float = 0.0
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 5000
    resume: bool = False
    stop_after: int | None = None
    time_budget_s: float | None = None
    budget_clock: str = "wall"
    device: str | None = None
    progress: bool = True
    log_every: int = 100
    download: bool = False
    verify_checksums: bool = True
    sample_steps: int = 100
    conditional: bool = False
    cfg_dropout: float = 0.0
    nsgf: NSGFSettings = field(default_factory=NSGFSettings)

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size", "ckpt_every", "log_every", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup is not None and (
            isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0
        ):
            raise ValueError(f"warmup must be a non-negative int or None, got {self.warmup!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.ema_decay is not None and (
            not isinstance(self.ema_decay, (int, float)) or not 0.0 <= self.ema_decay < 1.0
        ):
            raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {self.ema_decay!r}")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ValueError(f"stop_after must be a positive int or None, got {self.stop_after!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive or None, got {self.time_budget_s!r}")
        if self.budget_clock not in _CLOCKS:
            raise ValueError(f"budget_clock must be one of {sorted(_CLOCKS)}, got {self.budget_clock!r}")
        if self.resume and self.ckpt_dir is None:
            raise ValueError("resume=True needs ckpt_dir: the folder that holds checkpoint.pt")
        if not isinstance(self.cfg_dropout, (int, float)) or not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must lie in [0, 1), got {self.cfg_dropout!r}")
        if self.cfg_dropout > 0 and not self.conditional:
            raise ValueError("cfg_dropout needs conditional=True (label dropout of a class-conditional run)")
        if not isinstance(self.nsgf, NSGFSettings):
            raise TypeError(f"nsgf must be an NSGFSettings, got {type(self.nsgf).__name__}")

    @property
    def resolved_preset(self) -> str:
        return self.preset or self.dataset

    @property
    def resolved_hflip(self) -> bool:
        return self.dataset == "cifar10" if self.hflip is None else bool(self.hflip)

    @property
    def num_classes(self) -> int | None:
        """Data classes of a conditional run (None when unconditional)."""
        return NUM_CLASSES[self.dataset] if self.conditional else None


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    method : ImageMethod
        The method with its trained networks (``method.nets``, unwrapped from DDP).
    ema : nn.ModuleDict
        EMA of ``method.nets`` (use it for sampling).
    step : int
        Optimiser steps done in total.
    steps_this_run : int
    wall_time_s : float
        Training wall time of this invocation, pool warm-up included.
    cpu_time_s : float
        CPU time of this process (all threads) over the same span.
    losses : list[float]
        Loss of each step of this invocation (this process's batch).
    shape : (C, H, W)
        Image shape.
    """

    method: ImageMethod
    ema: nn.ModuleDict
    step: int
    steps_this_run: int
    wall_time_s: float
    shape: tuple[int, int, int]
    cpu_time_s: float = 0.0
    losses: list[float] = field(default_factory=list)


class _Objective(nn.Module):
    """The method's loss as a module, so that DistributedDataParallel sees one forward per step."""

    def __init__(self, method: ImageMethod) -> None:
        super().__init__()
        self.nets = method.nets
        self._method = [method]  # a list keeps the (non-module) method out of the module tree

    def forward(self, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        if y1 is None:
            return self._method[0].loss(self.nets, x0, x1)
        return self._method[0].loss(self.nets, x0, x1, y1)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError("ema and model must have the same parameters")
    for p_ema, p in zip(ema_params, params, strict=True):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def _distributed() -> tuple[int, int, int, bool]:
    """``(rank, world_size, local_rank, initialised_here)``; initialises the process group under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), True
    return 0, 1, 0, False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - torchcfm's OT pairing draws from NumPy's global generator
    random.seed(seed)


def _rank_file(rank: int, step: int) -> str:
    return f"rank{rank}-step{step}.pt"


def _resolve(config: TrainConfig, stored: dict[str, Any] | None = None) -> TrainConfig:
    """``config`` with a warm-up and EMA decay left unset filled in: the values ``stored`` in the checkpoint
    being resumed (a run keeps those it started with), else the defaults for ``total_steps``."""
    stored = stored or {}
    warmup, decay = config.warmup, config.ema_decay
    if warmup is None:
        warmup = stored.get("warmup")
        warmup = default_warmup(config.total_steps) if warmup is None else int(warmup)
    if decay is None:
        decay = stored.get("ema_decay")
        decay = default_ema_decay(config.total_steps) if decay is None else float(decay)
    return dataclasses.replace(config, warmup=warmup, ema_decay=decay)


def _warn_if_too_short(config: TrainConfig) -> None:
    """Warn when the run ends before its warm-up, or while the EMA is still mostly its initial weights."""
    if config.warmup > config.total_steps:
        warnings.warn(
            f"warmup={config.warmup} > total_steps={config.total_steps}: the learning rate never reaches "
            f"lr={config.lr}; lower warmup or leave it unset to scale it with total_steps",
            stacklevel=4,  # the caller of train()
        )
    left = config.ema_decay**config.total_steps
    if left > 0.1:
        warnings.warn(
            f"ema_decay={config.ema_decay} averages over ~{1 / (1 - config.ema_decay):.0f} steps but the run "
            f"has total_steps={config.total_steps}: {left:.0%} of the final EMA weights are the initial random "
            "ones, so samples drawn with the EMA look like noise; lower ema_decay (or leave it unset to scale "
            "it with total_steps), or sample with the raw weights",
            stacklevel=4,  # the caller of train()
        )


def checkpoint_step(ckpt_dir: str | os.PathLike) -> int:
    """The step of ``ckpt_dir/checkpoint.pt``, read without loading its tensors.

    Raises
    ------
    FileNotFoundError
        There is no checkpoint.
    CheckpointError
        It is unreadable or holds no step.
    """
    path = os.path.join(os.fspath(ckpt_dir), CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"there is no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_checkpoint gives the precise error
        state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path!r} holds no step")
    return state["step"]


def _fixed_settings(config: TrainConfig) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "method": config.method,
        "preset": config.resolved_preset,
        "sigma": config.sigma,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "hflip": config.resolved_hflip,
        "ema_decay": config.ema_decay,
        # nsgf++'s networks depend on it; checkpoints written before the variant existed are "paper"
        "phase2": config.nsgf.phase2 if config.method == "nsgf++" else None,
        "conditional": config.conditional,
        "cfg_dropout": config.cfg_dropout,
    }


def _remove_stale_temps(ckpt_dir: str, rank: int) -> None:
    """Delete what interrupted writes of this process's checkpoint files left (no write is in flight)."""
    names = remove_stale_temps(ckpt_dir, f"rank{rank}-step")
    if rank == 0:
        names += remove_stale_temps(ckpt_dir, CHECKPOINT_NAME)
    if names:
        logger.info("removed temporary files of interrupted checkpoint writes: %s", ", ".join(names))


def _save(
    ckpt_dir: str,
    *,
    step: int,
    rank: int,
    world: int,
    config: TrainConfig,
    method: ImageMethod,
    ema: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Per-rank file first, then (rank 0) ``checkpoint.pt`` naming them, then old per-rank files go."""
    atomic_save(
        {"step": step, "rank": rank, "rng": get_rng_state(), "method": method.state_dict()},
        os.path.join(ckpt_dir, _rank_file(rank, step)),
    )
    _barrier(world)
    if rank == 0:
        state = {
            "format": _FORMAT,
            "step": step,
            "world_size": world,
            "settings": _fixed_settings(config),
            "config": asdict(config),
            "nets": method.nets.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rank_files": [_rank_file(r, step) for r in range(world)],
        }
        atomic_save(state, os.path.join(ckpt_dir, CHECKPOINT_NAME))
        logger.info("checkpoint at step %d written to %s", step, ckpt_dir)
    _barrier(world)
    prefix = f"rank{rank}-step"
    for name in os.listdir(ckpt_dir):
        if name.startswith(prefix) and name.endswith(".pt") and name != _rank_file(rank, step):
            os.unlink(os.path.join(ckpt_dir, name))
    _remove_stale_temps(ckpt_dir, rank)


def _load(
    ckpt_dir: str, rank: int, world: int, config: TrainConfig
) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """Read and check the shared checkpoint and this rank's file; nothing is modified.

    Returns ``config`` resolved against the checkpoint's (:func:`_resolve`) and the two states.
    """
    path = os.path.join(ckpt_dir, CHECKPOINT_NAME)
    main = load_checkpoint(path, required=("format", "step", "world_size", "settings", "nets", "ema"))
    if main["format"] != _FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format {main['format']!r}, expected {_FORMAT!r}")
    config = _resolve(config, main.get("config"))
    if config.total_steps < main["step"]:
        raise ConfigError(
            f"total_steps={config.total_steps} is below the step {main['step']} of checkpoint {path!r}: "
            "raise it to continue the run"
        )
    if main["world_size"] != world:
        raise ConfigError(
            f"checkpoint {path!r} was written by {main['world_size']} processes; resume it with the same "
            f"number (got {world})"
        )
    wanted = _fixed_settings(config)
    saved = {
        "phase2": "paper" if config.method == "nsgf++" else None,
        "conditional": False,  # checkpoints written before class-conditional runs
        "cfg_dropout": 0.0,
        **main["settings"],
    }
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"cannot resume {path!r} with different settings ({diff})")
    rank_path = os.path.join(ckpt_dir, main["rank_files"][rank])
    mine = load_checkpoint(rank_path, required=("step", "rng", "method"))
    if mine["step"] != main["step"]:
        raise CheckpointError(
            f"{rank_path!r} is for step {mine['step']}, checkpoint.pt for step {main['step']}"
        )
    return config, main, mine


class _DataOrder:
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


def _data_batch(
    data: ImageData, idx: Tensor, device: torch.device, hflip: bool, labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Images ``(B, C, H, W)`` in [-1, 1] and, with ``labels``, their int64 labels ``(B,)`` (else None)."""
    x1 = to_unit_range(data.images[idx]).to(device)
    if hflip:
        flip = torch.rand(x1.shape[0], device=device) < 0.5
        x1 = torch.where(flip[:, None, None, None], x1.flip(-1), x1)
    return x1, (data.labels[idx].long().to(device) if labels else None)


def _resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
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


def train(config: TrainConfig, data: ImageData | None = None) -> TrainResult:
    """Train ``config.method`` on ``config.dataset`` with the shared recipe; see the module docstring.

    Parameters
    ----------
    config : TrainConfig
    data : ImageData, optional
        Preloaded training images (default: loaded from ``config.data_root``).

    Returns
    -------
    TrainResult

    Raises
    ------
    FileNotFoundError
        Dataset files missing, or ``resume=True`` without a checkpoint.
    FileExistsError
        ``ckpt_dir`` already holds a checkpoint and ``resume`` is false.
    CheckpointError
        The checkpoint is corrupt; nothing is written in that case.
    ConfigError
        ``ckpt_dir`` is not writable; settings that differ from the checkpoint's, or ``total_steps`` below
        its step (equal to it: nothing is trained, the checkpoint's state is returned).
    ValueError
        Unknown method.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    rank, world, local_rank, initialised_here = _distributed()
    try:
        return _train(config, data, rank, world, local_rank)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _train(
    config: TrainConfig, data: ImageData | None, rank: int, world: int, local_rank: int
) -> TrainResult:
    device = _resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt_dir = config.ckpt_dir
    main_state = rank_state = None
    if ckpt_dir is not None:
        reason = check_writable_dir(ckpt_dir)
        if reason is not None:
            raise ConfigError(f"ckpt_dir {ckpt_dir!r} is not a writable folder ({reason})")
        path = os.path.join(ckpt_dir, CHECKPOINT_NAME)
        if config.resume:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
            config, main_state, rank_state = _load(ckpt_dir, rank, world, config)
        elif os.path.exists(path):
            raise FileExistsError(
                f"{path!r} already exists: pass --resume to continue that run, or choose another --ckpt-dir "
                "(it is never overwritten by a fresh run)"
            )
        _remove_stale_temps(ckpt_dir, rank)
    if main_state is None:
        config = _resolve(config)
    _warn_if_too_short(config)
    if rank == 0:
        logger.info(
            "%s: %d steps, warm-up %d steps, EMA decay %g (horizon %.0f steps)",
            config.method,
            config.total_steps,
            config.warmup,
            config.ema_decay,
            1.0 / (1.0 - config.ema_decay),
        )

    if data is None:
        if rank == 0 or not config.download:
            data = load_images(
                config.dataset,
                config.data_root,
                download=config.download and rank == 0,
                verify_checksums=config.verify_checksums,
            )
        _barrier(world)
        if data is None:
            data = load_images(config.dataset, config.data_root, verify_checksums=config.verify_checksums)

    nsgf = config.nsgf
    if nsgf.pool_storage == "disk" and nsgf.pool_path is None and ckpt_dir is not None:
        nsgf = dataclasses.replace(nsgf, pool_path=os.path.join(ckpt_dir, "pool"))
    _seed_everything(config.seed + rank)
    method = make_method(
        config.method,
        data.shape,
        preset=config.resolved_preset,
        sigma=config.sigma,
        sample_steps=config.sample_steps,
        nsgf=nsgf,
        rank=rank,
        num_classes=config.num_classes,
        cfg_dropout=config.cfg_dropout,
    )
    nets = method.nets.to(device)
    objective: nn.Module = _Objective(method)
    if world > 1:  # DDP broadcasts rank 0's initial weights: build it before copying the EMA
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(nets.parameters(), lr=config.lr)
    warmup = config.warmup

    def warmup_factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(step + 1, warmup) / warmup

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)
    step = 0
    if main_state is not None:
        nets.load_state_dict(main_state["nets"])
        ema.load_state_dict(main_state["ema"])
        optimizer.load_state_dict(main_state["optimizer"])
        scheduler.load_state_dict(main_state["scheduler"])
        step = int(main_state["step"])
        method.load_state_dict(rank_state["method"])
        set_rng_state(rank_state["rng"])
        if rank == 0:
            logger.info("resumed from %s at step %d", ckpt_dir, step)
            if step == config.total_steps:
                logger.info("the checkpoint is at total_steps=%d already: nothing to train", step)

    order = _DataOrder(len(data), config.batch_size, rank, world, config.seed)
    hflip = config.resolved_hflip
    t_start, cpu_start = time.perf_counter(), time.process_time()
    clock = _CLOCKS[config.budget_clock]
    clock_start = clock()

    if main_state is None:

        def fresh_batch() -> tuple[Tensor, Tensor | None]:
            idx = torch.randint(len(data), (config.batch_size,))
            return _data_batch(data, idx, device, hflip, config.conditional)

        method.prepare(fresh_batch, progress=config.progress and rank == 0)

    losses: list[float] = []
    start_step = step
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        disable=not (config.progress and rank == 0),
        desc=f"train {config.method}",
        dynamic_ncols=True,
    )
    nets.train()
    stopped = False
    while step < config.total_steps:
        x1, y1 = _data_batch(data, order.indices(step), device, hflip, config.conditional)
        x0 = torch.randn_like(x1)
        loss = objective(x0, x1) if y1 is None else objective(x0, x1, y1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for net in nets.values():
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        ema_update(ema, nets, config.ema_decay)
        step += 1
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value} at step {step}")
        bar.update(1)
        if rank == 0 and step % config.log_every == 0:
            bar.set_postfix(loss=f"{value:.4f}")
            logger.info("step %d loss %.5f lr %.3g", step, value, scheduler.get_last_lr()[0])
        if config.stop_after is not None and step - start_step >= config.stop_after:
            stopped = True  # as if killed: no final checkpoint
            break
        over_budget = config.time_budget_s is not None and clock() - clock_start > config.time_budget_s
        if world > 1 and config.time_budget_s is not None:  # every rank must stop at the same step
            flag = torch.tensor([float(over_budget)], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over_budget = bool(flag.item() > 0)
        if ckpt_dir is not None and (
            step % config.ckpt_every == 0 or step == config.total_steps or over_budget
        ):
            _save(
                ckpt_dir,
                step=step,
                rank=rank,
                world=world,
                config=config,
                method=method,
                ema=ema,
                optimizer=optimizer,
                scheduler=scheduler,
            )
        if over_budget:
            if rank == 0:
                logger.info("time budget of %.0f s reached at step %d", config.time_budget_s, step)
            break
    bar.close()
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    if rank == 0 and not stopped:
        logger.info("trained %s to step %d in %.1f s", config.method, step, wall)
    return TrainResult(
        method=method,
        ema=ema,
        step=step,
        steps_this_run=step - start_step,
        wall_time_s=wall,
        cpu_time_s=cpu,
        shape=data.shape,
        losses=losses,
    )
