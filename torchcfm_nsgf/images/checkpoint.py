"""Atomic checkpoint files and the random-number-generator state of one process.

A checkpoint is written to a temporary file in the destination folder, flushed, ``fsync``-ed and moved over
the destination with :func:`os.replace` (atomic on POSIX and Windows), then the folder entry is ``fsync``-ed:
a crash leaves either the old file or the new one, never a torn one.

Files are loaded with ``torch.load(weights_only=True)``: every state stored here is made of tensors and
plain python containers, so a checkpoint cannot run code when it is read.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from typing import Any

import numpy as np
import torch

from .._io import atomic_save

__all__ = ["CheckpointError", "atomic_save", "get_rng_state", "load_checkpoint", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or does not hold what this code expects."""


def load_checkpoint(path: str | os.PathLike, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` on the CPU.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        The file cannot be read (truncated, not a torch file) or misses one of the ``required`` keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch checkpoint ({first})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} misses the entries {missing}")
    return state


def get_rng_state() -> dict[str, Any]:
    """Every global generator this process draws from: torch (CPU and each CUDA device), NumPy, python.

    NumPy's global generator matters because torchcfm's ``OTPlanSampler`` draws the OT pairing from it.
    Returned as tensors and python scalars only (loadable with ``weights_only=True``).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - torchcfm draws from it
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - torchcfm draws from the global generator
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
