"""Argument checks shared by the public functions (private module).

Every check raises a ``TypeError`` or ``ValueError`` whose message names the offending argument,
so that bad input never turns into a silent NaN further down.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_cloud(x: object, name: str, *, finite: bool = True) -> Tensor:
    """A point cloud ``(n, *dim)``: floating tensor, at least one point, finite entries.

    ``finite=False`` leaves out the finiteness check, the only one that reads the data back to the host (a
    caller that checks it on the device instead, see :class:`torchcfm_nsgf.replay.DeviceChecks`).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (n, *dim) with at least 2 dimensions, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one point, got shape {tuple(x.shape)}")
    if x[0].numel() == 0:
        raise ValueError(f"{name} has zero features per point, got shape {tuple(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    return x


def check_same_features(x: Tensor, y: Tensor, xname: str = "x", yname: str = "y") -> None:
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{xname} and {yname} must have the same feature shape, got {tuple(x.shape[1:])} "
            f"and {tuple(y.shape[1:])}"
        )


def check_same_device(*named: tuple[str, Tensor | None]) -> None:
    tensors = [(n, t) for n, t in named if isinstance(t, Tensor)]
    if not tensors:
        return
    first_name, first = tensors[0]
    for n, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n} is on {t.device} but {first_name} is on {first.device}: move them to one device"
            )


def check_weights(w: Tensor | None, n: int, name: str, ref: Tensor) -> Tensor:
    """Probability weights of length ``n``; uniform when ``None``. Returned in ``ref``'s dtype."""
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=ref.dtype, device=ref.device)
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {w.dtype}")
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match its point cloud, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    if bool((w < 0).any()):
        raise ValueError(f"{name} has negative entries: weights must be non-negative")
    total = float(w.double().sum())
    if abs(total - 1.0) > 1e-5:
        raise ValueError(f"{name} must sum to 1 (a probability vector), got sum {total:.6g}")
    return w.to(ref.dtype)


def check_positive(value: object, name: str, *, integer: bool = False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")


def check_open_unit(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value}")


def check_non_negative(value: object, name: str) -> float:
    """A finite number >= 0 (not a bool), returned as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_labels(
    y: object, k: int, name: str, like: str, *, column: bool = False, read: bool = True
) -> Tensor:
    """``y`` as an integer tensor of shape ``(k,)`` with non-negative entries, or an error naming it.

    ``column=True`` also takes labels of shape ``(k, 1)`` (torchcfm's guided tests pass them so) and returns
    them as ``(k,)``. ``read=False`` leaves out the sign check, the only one that reads the labels back to the
    host.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if column and y.shape == (k, 1):
        y = y.reshape(k)
    if y.shape != (k,):
        shapes = f"({k},) or ({k}, 1)" if column else f"({k},)"
        raise ValueError(f"{name} must have shape {shapes} to match {like}, got {tuple(y.shape)}")
    if read and k and int(y.min()) < 0:
        raise ValueError(f"{name} must hold non-negative class labels, got {int(y.min())}")
    return y
