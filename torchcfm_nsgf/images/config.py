"""The settings of one image training run (:class:`TrainConfig`) and the defaults that scale with its length.

Short runs: unless given, the warm-up and the EMA decay scale with ``train_steps`` (:func:`default_warmup`,
:func:`default_ema_decay`), so that a run of a few hundred steps still ends with an EMA of trained weights;
the values a run starts with are stored in its checkpoint and kept when it resumes
(:func:`resolve_defaults`). Dataset facts (UNet preset, horizontal flips, classes) come from the dataset's
record (:data:`~torchcfm_nsgf.images.data.DATASETS`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from .._cli import decay, non_negative_int, positive_float, positive_int, probability, resume_mode
from .._deprecation import rename_keywords
from .data import DATASETS
from .settings import NSGFSettings
from .unet import UNET_PRESETS

__all__ = ["CLOCKS", "ConfigError", "TrainConfig", "default_ema_decay", "default_warmup", "resolve_defaults"]

# torchcfm's CIFAR-10 recipe, the ceilings of the values that scale with the run's length
_MAX_WARMUP = 5000
_MAX_EMA_DECAY = 0.9999
#: The clocks of ``time_budget_s``.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _flag(default: Any, group: str, help: str, **metadata: Any) -> Any:  # noqa: A002
    """A field with the command-line flag it generates (``torchcfm_nsgf._cli.add_dataclass_flags``)."""
    return field(default=default, metadata={"group": group, "help": help, **metadata})


class ConfigError(ValueError):
    """Settings that cannot work: with each other, with the checkpoint being resumed, or with the disk."""


def default_warmup(train_steps: int) -> int:
    """Warm-up steps when none is given: 5% of the run, at most torchcfm's 5000."""
    return min(_MAX_WARMUP, train_steps // 20)


def default_ema_decay(train_steps: int) -> float:
    """EMA decay when none is given: torchcfm's 0.9999, lowered until the EMA horizon ``1 / (1 - decay)``
    is at most a tenth of the run (0.98 for 500 steps, 0.9995 for 20 000, 0.9999 from 100 000 on)."""
    return max(0.0, min(_MAX_EMA_DECAY, 1.0 - 10.0 / train_steps))


@dataclass
class TrainConfig:
    """Settings of :func:`train`. The example scripts' flags are generated from the fields' ``metadata`` (help,
    flag name, value type, group; :func:`~torchcfm_nsgf._cli.add_dataclass_flags`).

    Attributes
    ----------
    dataset : {"mnist", "cifar10"}
    data_root : str
        torchvision root holding ``MNIST/raw`` or ``cifar-10-batches-py``.
    method : str
        ``nsgf++``, ``nsgf``, ``otcfm``, ``icfm``, ``fm`` or ``rf`` (those this installation offers).
    train_steps : int
        Optimiser steps of the whole run (across resumptions); formerly ``total_steps`` (still accepted, with
        a ``DeprecationWarning``).
    batch_size : int
        Images per step and per process.
    lr, grad_clip : float
        Adam learning rate, gradient-norm clip per network.
    warmup : int, optional
        Linear learning-rate warm-up steps; default :func:`default_warmup` of ``train_steps``.
    ema_decay : float, optional
        EMA decay; default :func:`default_ema_decay` of ``train_steps``. A decay too slow for the run (the
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
    resume : bool or "auto"
        Continue from ``ckpt_dir/checkpoint.pt`` (an error if it is missing). Without it, an existing
        checkpoint is never overwritten: the run refuses to start. ``"auto"``: continue when the checkpoint
        exists, else start a fresh run (:attr:`TrainResult.resumed_from` and the log say which).
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
    data_root: str = _flag("./data", "data", "torchvision root folder of the dataset")
    method: str = "otcfm"
    train_steps: int = _flag(
        400_000, "recipe", "optimiser steps of the whole run, resumptions included", type=positive_int
    )
    batch_size: int = _flag(128, "recipe", "images per step and per process", type=positive_int)
    lr: float = _flag(2e-4, "recipe", "Adam learning rate", type=positive_float)
    warmup: int | None = _flag(
        None,
        "recipe",
        "linear learning-rate warm-up steps (default: min(5000, train-steps / 20); a resumed run keeps its own)",
        type=non_negative_int,
    )
    grad_clip: float = _flag(1.0, "recipe", "gradient-norm clip, per network", type=positive_float)
    ema_decay: float | None = _flag(
        None,
        "recipe",
        "decay of the exponential moving average of the weights (default: 0.9999, lowered until the EMA "
        "horizon 1 / (1 - decay) is at most train-steps / 10; a resumed run keeps its own)",
        type=decay,
    )
    hflip: bool | None = _flag(None, "data", "random horizontal flips (default: the dataset's recipe)")
    preset: str | None = _flag(
        None, "recipe", "UNet configuration", flag="--unet", choices=lambda: sorted(UNET_PRESETS)
    )
    sigma: float = _flag(0.0, "recipe", "sigma of the icfm/otcfm/fm probability paths")
    seed: int = _flag(0, "recipe", "random seed (each process adds its rank)")
    ckpt_dir: str | None = _flag(
        None,
        "checkpoints",
        "the run's folder: checkpoints and the sample grid (default: none, no checkpoints)",
    )
    ckpt_every: int = _flag(5000, "checkpoints", "checkpoint every N steps and at the end", type=positive_int)
    resume: bool | str = _flag(
        False,
        "checkpoints",
        "continue the run in --ckpt-dir; with --train-steps equal to its step nothing is trained, to --sample "
        "or --fid it. --resume auto: continue when --ckpt-dir holds a checkpoint, else start fresh (for a "
        "job that is requeued with the same command)",
        type=resume_mode,
        nargs="?",
        const=True,
        metavar="auto",
    )
    stop_after: int | None = _flag(
        None,
        "checkpoints",
        "stop after N steps of this invocation without checkpointing, as if killed (default: never)",
        type=positive_int,
    )
    time_budget_s: float | None = _flag(
        None,
        "recipe",
        "stop (and checkpoint) after this many seconds of training (default: no limit)",
        flag="--time-budget",
        type=positive_float,
    )
    budget_clock: str = _flag(
        "wall",
        "recipe",
        "clock of --time-budget: wall time, or this process's CPU time (fair budgets for runs sharing a "
        "machine, one thread each) (default: wall)",
        choices=("wall", "cpu"),
    )
    device: str | None = _flag(
        None, "recipe", "torch device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)"
    )
    progress: bool = _flag(True, "checkpoints", "progress bars")
    log_every: int = _flag(100, "checkpoints", "log the loss every N steps", type=positive_int)
    download: bool = _flag(False, "data", "let torchvision download missing files")
    verify_checksums: bool = _flag(True, "data", "torchvision's md5 check of the dataset's files")
    sample_steps: int = 100
    conditional: bool = _flag(
        False,
        "recipe",
        "class-conditional training on the dataset's labels (every method; fixed on resume)",
    )
    cfg_dropout: float = _flag(
        0.0,
        "recipe",
        "label-dropout probability for classifier-free guidance, e.g. 0.1 (needs --conditional)",
        type=probability,
    )
    nsgf: NSGFSettings = field(default_factory=NSGFSettings)

    def __post_init__(self) -> None:
        for name in ("train_steps", "batch_size", "ckpt_every", "log_every", "sample_steps"):
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
        if self.budget_clock not in CLOCKS:
            raise ValueError(f"budget_clock must be one of {sorted(CLOCKS)}, got {self.budget_clock!r}")
        if self.resume not in (False, True, "auto"):
            raise ValueError(f"resume must be False, True or 'auto', got {self.resume!r}")
        if self.resume and self.ckpt_dir is None:
            raise ValueError(f"resume={self.resume!r} needs ckpt_dir: the folder that holds checkpoint.pt")
        if not isinstance(self.cfg_dropout, (int, float)) or not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must lie in [0, 1), got {self.cfg_dropout!r}")
        if self.cfg_dropout > 0 and not self.conditional:
            raise ValueError("cfg_dropout needs conditional=True (label dropout of a class-conditional run)")
        if not isinstance(self.nsgf, NSGFSettings):
            raise TypeError(f"nsgf must be an NSGFSettings, got {type(self.nsgf).__name__}")

    @property
    def total_steps(self) -> int:
        """Deprecated name of :attr:`train_steps`."""
        warnings.warn(
            "TrainConfig.total_steps is renamed train_steps; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.train_steps

    @property
    def resolved_preset(self) -> str:
        """``preset``, or the dataset's UNet preset."""
        return self.preset or DATASETS[self.dataset].unet_preset

    @property
    def resolved_hflip(self) -> bool:
        """``hflip``, or whether the dataset's recipe flips."""
        return DATASETS[self.dataset].hflip if self.hflip is None else bool(self.hflip)

    @property
    def num_classes(self) -> int | None:
        """Data classes of a conditional run (None when unconditional)."""
        return DATASETS[self.dataset].classes if self.conditional else None


_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    _dataclass_init(self, *args, **rename_keywords(kwargs, {"total_steps": "train_steps"}, "TrainConfig"))


TrainConfig.__init__ = _init  # type: ignore[method-assign]


def resolve_defaults(config: TrainConfig, stored: dict[str, Any] | None = None) -> TrainConfig:
    """``config`` with a warm-up and EMA decay left unset filled in: the values ``stored`` in the checkpoint
    being resumed (a run keeps those it started with), else the defaults for ``train_steps``."""
    stored = stored or {}
    warmup, decay = config.warmup, config.ema_decay
    if warmup is None:
        warmup = stored.get("warmup")
        warmup = default_warmup(config.train_steps) if warmup is None else int(warmup)
    if decay is None:
        decay = stored.get("ema_decay")
        decay = default_ema_decay(config.train_steps) if decay is None else float(decay)
    return dataclasses.replace(config, warmup=warmup, ema_decay=decay)


def warn_if_too_short(config: TrainConfig) -> None:
    """Warn when the run ends before its warm-up, or while the EMA is still mostly its initial weights."""
    if config.warmup > config.train_steps:
        warnings.warn(
            f"warmup={config.warmup} > train_steps={config.train_steps}: the learning rate never reaches "
            f"lr={config.lr}; lower warmup or leave it unset to scale it with train_steps",
            stacklevel=4,  # the caller of train()
        )
    left = config.ema_decay**config.train_steps
    if left > 0.1:
        warnings.warn(
            f"ema_decay={config.ema_decay} averages over ~{1 / (1 - config.ema_decay):.0f} steps but the run "
            f"has train_steps={config.train_steps}: {left:.0%} of the final EMA weights are the initial random "
            "ones, so samples drawn with the EMA look like noise; lower ema_decay (or leave it unset to scale "
            "it with train_steps), or sample with the raw weights",
            stacklevel=4,  # the caller of train()
        )
