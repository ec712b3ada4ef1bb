"""The checkpoint files of an image training run: what they hold, how they are written and read back.

Files under ``ckpt_dir``: ``checkpoint.pt`` (written by rank 0: networks, EMA, optimiser, scheduler, step,
the settings that must not change on resume and the whole config) and ``rank{r}-step{s}.pt`` (one per process:
its random generators and the method's state, e.g. the NSGF pool), all written atomically;
``checkpoint.pt`` is replaced last, so it always names complete files. Temporaries an interrupted write left
behind are deleted when the run starts and at every checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .._io import remove_stale_temps
from .checkpoint import CheckpointError, atomic_save, get_rng_state, load_checkpoint
from .config import ConfigError, TrainConfig, resolve_defaults
from .distributed import barrier
from .methods import ImageMethod

__all__ = ["CHECKPOINT_NAME", "checkpoint_step", "read_checkpoint", "remove_temps", "write_checkpoint"]

logger = logging.getLogger("torchcfm_nsgf.images.training")

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "torchcfm_nsgf.images.checkpoint/1"


def rank_file(rank: int, step: int) -> str:
    return f"rank{rank}-step{step}.pt"


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


def fixed_settings(config: TrainConfig) -> dict[str, Any]:
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
        "phase2": config.nsgf.nsgfpp.phase2 if config.method == "nsgf++" else None,
        # one network for both phases, or one per phase; checkpoints written before the option: one per phase
        "nsgfpp.network": config.nsgf.nsgfpp.network if config.method == "nsgf++" else None,
        # drift's self term; checkpoints written before the option: the image default of then, "independent"
        "drift.self_term": config.nsgf.drift_self_term if config.method == "drift" else None,
        "conditional": config.conditional,
        "cfg_dropout": config.cfg_dropout,
    }


def remove_temps(ckpt_dir: str, rank: int) -> None:
    """Delete what interrupted writes of this process's checkpoint files left (no write is in flight)."""
    names = remove_stale_temps(ckpt_dir, f"rank{rank}-step")
    if rank == 0:
        names += remove_stale_temps(ckpt_dir, CHECKPOINT_NAME)
    if names:
        logger.info("removed temporary files of interrupted checkpoint writes: %s", ", ".join(names))


def write_checkpoint(
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
        os.path.join(ckpt_dir, rank_file(rank, step)),
    )
    barrier(world)
    if rank == 0:
        state = {
            "format": _FORMAT,
            "step": step,
            "world_size": world,
            "settings": fixed_settings(config),
            "config": asdict(config),
            "nets": method.nets.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rank_files": [rank_file(r, step) for r in range(world)],
        }
        atomic_save(state, os.path.join(ckpt_dir, CHECKPOINT_NAME))
        logger.info("checkpoint at step %d written to %s", step, ckpt_dir)
    barrier(world)
    prefix = f"rank{rank}-step"
    for name in os.listdir(ckpt_dir):
        if name.startswith(prefix) and name.endswith(".pt") and name != rank_file(rank, step):
            os.unlink(os.path.join(ckpt_dir, name))
    remove_temps(ckpt_dir, rank)


def read_checkpoint(
    ckpt_dir: str, rank: int, world: int, config: TrainConfig
) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """Read and check the shared checkpoint and this rank's file; nothing is modified.

    Returns ``config`` resolved against the checkpoint's (:func:`~torchcfm_nsgf.images.config.resolve_defaults`) and the two states.
    """
    path = os.path.join(ckpt_dir, CHECKPOINT_NAME)
    main = load_checkpoint(path, required=("format", "step", "world_size", "settings", "nets", "ema"))
    if main["format"] != _FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format {main['format']!r}, expected {_FORMAT!r}")
    config = resolve_defaults(config, main.get("config"))
    if config.train_steps < main["step"]:
        raise ConfigError(
            f"train_steps={config.train_steps} is below the step {main['step']} of checkpoint {path!r}: "
            "raise it to continue the run"
        )
    if main["world_size"] != world:
        raise ConfigError(
            f"checkpoint {path!r} was written by {main['world_size']} processes; resume it with the same "
            f"number (got {world})"
        )
    wanted = fixed_settings(config)
    saved = {
        "phase2": "paper" if config.method == "nsgf++" else None,
        "nsgfpp.network": "separate" if config.method == "nsgf++" else None,
        "drift.self_term": "independent" if config.method == "drift" else None,
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
