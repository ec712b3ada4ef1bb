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

Files under ``ckpt_dir``: see :mod:`~torchcfm_nsgf.images.checkpointing`. ``ckpt_dir`` must be writable: it is
checked (and created) before anything else happens. Settings and the defaults that scale with the run's
length: :mod:`~torchcfm_nsgf.images.config`.

Class-conditional runs (``conditional=True``): the data loader yields each batch's labels, every method's
networks take them (torchcfm's UNet with ``class_cond=True``, 10 classes for MNIST and CIFAR-10, plus a null
label with ``cfg_dropout > 0`` for classifier-free guidance), NSGF's pool stores them, and the checkpoint
records the setting, which cannot change on resume.

Several processes (``torchrun``): :mod:`~torchcfm_nsgf.images.distributed`. ``batch_size`` is per process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import check_writable_dir
from .._progress import bar_disable
from .checkpointing import CHECKPOINT_NAME, checkpoint_step, read_checkpoint, remove_temps, write_checkpoint
from .config import (
    CLOCKS,
    ConfigError,
    TrainConfig,
    default_ema_decay,
    default_warmup,
    resolve_defaults,
    warn_if_too_short,
)
from .data import ImageData, load_images, to_unit_range
from .distributed import DataOrder, barrier, init_distributed, resolve_device, seed_everything
from .methods import ImageMethod
from .registry import make_method

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
    resumed_from : int, optional
        The step of the checkpoint this invocation resumed from; None for a fresh run.
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
    resumed_from: int | None = None


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


def _data_batch(
    data: ImageData, idx: Tensor, device: torch.device, hflip: bool, labels: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Images ``(B, C, H, W)`` in [-1, 1] and, with ``labels``, their int64 labels ``(B,)`` (else None)."""
    x1 = to_unit_range(data.images[idx]).to(device)
    if hflip:
        flip = torch.rand(x1.shape[0], device=device) < 0.5
        x1 = torch.where(flip[:, None, None, None], x1.flip(-1), x1)
    return x1, (data.labels[idx].long().to(device) if labels else None)


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
        ``ckpt_dir`` is not writable; settings that differ from the checkpoint's, or ``train_steps`` below
        its step (equal to it: nothing is trained, the checkpoint's state is returned).
    ValueError
        Unknown method.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    rank, world, local_rank, initialised_here = init_distributed()
    try:
        return _train(config, data, rank, world, local_rank)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _open_run(config: TrainConfig, rank: int, world: int) -> tuple[TrainConfig, Any, Any]:
    """Check ``ckpt_dir`` and read the checkpoint being resumed: ``(config resolved, main state, rank state)``,
    the states None for a fresh run."""
    ckpt_dir = config.ckpt_dir
    main_state = rank_state = None
    if ckpt_dir is not None:
        reason = check_writable_dir(ckpt_dir)
        if reason is not None:
            raise ConfigError(f"ckpt_dir {ckpt_dir!r} is not a writable folder ({reason})")
        path = os.path.join(ckpt_dir, CHECKPOINT_NAME)
        if config.resume and os.path.isfile(path):
            config, main_state, rank_state = read_checkpoint(ckpt_dir, rank, world, config)
        elif config.resume == "auto":
            if rank == 0:
                logger.info("resume='auto': no checkpoint at %s, starting a fresh run", path)
        elif config.resume:
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
        elif os.path.exists(path):
            raise FileExistsError(
                f"{path!r} already exists: pass --resume (or --resume auto) to continue that run, or choose "
                "another --ckpt-dir (it is never overwritten by a fresh run)"
            )
        remove_temps(ckpt_dir, rank)
    if main_state is None:
        config = resolve_defaults(config)
    return config, main_state, rank_state


def _load_data(config: TrainConfig, data: ImageData | None, rank: int, world: int) -> ImageData:
    """The training images: ``data`` if given, else loaded (downloaded by rank 0 alone)."""
    if data is not None:
        return data
    if rank == 0 or not config.download:
        data = load_images(
            config.dataset,
            config.data_root,
            download=config.download and rank == 0,
            verify_checksums=config.verify_checksums,
        )
    barrier(world)
    if data is None:
        data = load_images(config.dataset, config.data_root, verify_checksums=config.verify_checksums)
    return data


@dataclass
class _Run:
    """What the loop steps: the method, its networks (and their DDP-wrapped loss), EMA, optimiser, scheduler."""

    method: ImageMethod
    nets: nn.ModuleDict
    objective: nn.Module
    ema: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0


def _build(config: TrainConfig, data: ImageData, rank: int, world: int, device: torch.device) -> _Run:
    """Seed this process, build the method and the optimiser state on ``device``."""
    nsgf = config.nsgf
    if nsgf.pool_storage == "disk" and nsgf.pool_path is None and config.ckpt_dir is not None:
        nsgf = dataclasses.replace(nsgf, pool_path=os.path.join(config.ckpt_dir, "pool"))
    seed_everything(config.seed + rank)
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
    return _Run(method, nets, objective, ema, optimizer, scheduler)


def _restore(run: _Run, main_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
    """Load a checkpoint's states into ``run`` (and this process's random generators)."""
    from .checkpoint import set_rng_state

    run.nets.load_state_dict(main_state["nets"])
    run.ema.load_state_dict(main_state["ema"])
    run.optimizer.load_state_dict(main_state["optimizer"])
    run.scheduler.load_state_dict(main_state["scheduler"])
    run.step = int(main_state["step"])
    run.method.load_state_dict(rank_state["method"])
    set_rng_state(rank_state["rng"])


def _over_budget(config: TrainConfig, elapsed: float, world: int, device: torch.device) -> bool:
    """Whether the time budget is spent; with several processes, whether it is spent on any (all stop)."""
    over = config.time_budget_s is not None and elapsed > config.time_budget_s
    if world > 1 and config.time_budget_s is not None:
        flag = torch.tensor([float(over)], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag.item() > 0)
    return over


def _train(
    config: TrainConfig, data: ImageData | None, rank: int, world: int, local_rank: int
) -> TrainResult:
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config, main_state, rank_state = _open_run(config, rank, world)
    warn_if_too_short(config)
    if rank == 0:
        logger.info(
            "%s: %d steps, warm-up %d steps, EMA decay %g (horizon %.0f steps)",
            config.method,
            config.train_steps,
            config.warmup,
            config.ema_decay,
            1.0 / (1.0 - config.ema_decay),
        )
    data = _load_data(config, data, rank, world)
    run = _build(config, data, rank, world, device)
    resumed_from = None
    if main_state is not None:
        _restore(run, main_state, rank_state)
        resumed_from = run.step
        if rank == 0:
            logger.info("resumed from %s at step %d", config.ckpt_dir, run.step)
            if run.step == config.train_steps:
                logger.info("the checkpoint is at train_steps=%d already: nothing to train", run.step)
    order = DataOrder(len(data), config.batch_size, rank, world, config.seed)
    hflip = config.resolved_hflip
    t_start, cpu_start = time.perf_counter(), time.process_time()
    clock = CLOCKS[config.budget_clock]
    clock_start = clock()
    if main_state is None:

        def fresh_batch() -> tuple[Tensor, Tensor | None]:
            idx = torch.randint(len(data), (config.batch_size,))
            return _data_batch(data, idx, device, hflip, config.conditional)

        run.method.prepare(fresh_batch, progress=config.progress and rank == 0)
    losses, start_step = _loop(config, run, data, order, hflip, device, rank, world, clock, clock_start)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    stopped = config.stop_after is not None and run.step - start_step >= config.stop_after
    if rank == 0 and not stopped:
        logger.info("trained %s to step %d in %.1f s", config.method, run.step, wall)
    return TrainResult(
        method=run.method,
        ema=run.ema,
        step=run.step,
        steps_this_run=run.step - start_step,
        wall_time_s=wall,
        cpu_time_s=cpu,
        shape=data.shape,
        losses=losses,
        resumed_from=resumed_from,
    )


def _loop(
    config, run, data, order, hflip, device, rank, world, clock, clock_start
) -> tuple[list[float], int]:
    """The training loop: one optimiser step per batch, EMA, logging, checkpoints, the stops. Returns the
    losses of this invocation and the step it started from."""
    losses: list[float] = []
    start_step = run.step
    bar = tqdm(
        total=config.train_steps,
        initial=run.step,
        disable=bar_disable(config.progress and rank == 0),
        desc=f"train {config.method}",
        dynamic_ncols=True,
    )
    run.nets.train()
    while run.step < config.train_steps:
        x1, y1 = _data_batch(data, order.indices(run.step), device, hflip, config.conditional)
        x0 = torch.randn_like(x1)
        loss = run.objective(x0, x1) if y1 is None else run.objective(x0, x1, y1)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for net in run.nets.values():
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        ema_update(run.ema, run.nets, config.ema_decay)
        run.step += 1
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value} at step {run.step}")
        bar.update(1)
        if rank == 0 and run.step % config.log_every == 0:
            bar.set_postfix(loss=f"{value:.4f}")
            logger.info("step %d loss %.5f lr %.3g", run.step, value, run.scheduler.get_last_lr()[0])
        if config.stop_after is not None and run.step - start_step >= config.stop_after:
            break  # as if killed: no final checkpoint
        over_budget = _over_budget(config, clock() - clock_start, world, device)
        if config.ckpt_dir is not None and (
            run.step % config.ckpt_every == 0 or run.step == config.train_steps or over_budget
        ):
            write_checkpoint(
                config.ckpt_dir,
                step=run.step,
                rank=rank,
                world=world,
                config=config,
                method=run.method,
                ema=run.ema,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
            )
        if over_budget:
            if rank == 0:
                logger.info("time budget of %.0f s reached at step %d", config.time_budget_s, run.step)
            break
    bar.close()
    return losses, start_step
