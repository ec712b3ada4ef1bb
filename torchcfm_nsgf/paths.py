r"""The served paths of a simulated Sinkhorn flow on torchcfm's normalised clock ``t in [0, 1]``.

A path turns a :class:`~torchcfm_nsgf.flow.SinkhornTrajectory` into *segments*: a start time ``t_s``, a start
point ``x_s`` and a constant velocity ``u``, covering ``t_s + s L`` for ``s in [0, 1)`` at ``x_s + s L u``
(``L``: the path's segment length). The pool stores segments, and a served item is a point of one.

* ``"straight"``: one segment per particle, :math:`X_0 \to X_T` on ``[0, 1]`` (``L = 1``).
* ``"polyline"``: the Euler polyline, step ``k`` on ``[k/T, (k+1)/T]`` with velocity :math:`u_k` (``L = 1/T``).
* ``"grid"``: the paper's Algorithm 1, the pairs :math:`(k/T, X_k, u_k)` only (``L = 0``).

A new path is one subclass of :class:`FlowPath` registered in :data:`PATH_CLASSES`.

**A given time.** :meth:`FlowPath.start_at` names, for a time ``t``, the segments that may be served at it:
the segment whose range holds ``t`` (``"polyline"``: step :math:`k = \min(\lfloor tT \rfloor, T - 1)`; every
segment for ``"straight"``), and for ``"grid"``, whose segments have no length, the grid time nearest below
``t``, :math:`k/T` with the same ``k``. :meth:`FlowPath.place` puts a segment at ``t``: ``x_s + (t - t_s) u``,
velocity ``u``, so that a grid pair is continued along its Euler step, exactly as :meth:`FlowPath.at` reads
the Euler polyline of one flow at ``t``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .flow import SinkhornTrajectory

__all__ = ["PATHS", "FlowPath", "PATH_CLASSES", "make_path"]

Path = Literal["straight", "polyline", "grid"]


def _pad(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (n,) reshaped to broadcast over the rows of ``like`` (n, *dim)."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


class FlowPath:
    """How the segments of a trajectory are cut, served and read at a time (one subclass per path)."""

    name: ClassVar[str]

    def __init__(self, flow_steps: int) -> None:
        self.flow_steps = flow_steps

    @property
    def segment_length(self) -> float:
        """Clock length ``L`` of one segment."""
        raise NotImplementedError

    def segments(self, traj: SinkhornTrajectory) -> tuple[Tensor, Tensor, Tensor]:
        """Start times (N,), start points (N, *dim), velocities (N, *dim): ``N = T n``, step-major."""
        T, n = traj.us.shape[:2]
        feature = traj.xs.shape[2:]
        return (
            traj.ts[:-1].repeat_interleave(n),
            traj.xs[:-1].reshape(T * n, *feature),
            traj.us.reshape(T * n, *feature),
        )

    def segment_labels(self, labels: Tensor) -> Tensor:
        """The class of each segment of :meth:`segments` from the class of each particle ``(n,)``."""
        return labels.repeat(self.flow_steps)

    def at(self, traj: SinkhornTrajectory, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""Position and velocity of particle ``i`` at its own time ``t[i]``: the Euler polyline,
        :math:`X_k + (t - k/T) u_k` with :math:`k = \min(\lfloor tT \rfloor, T - 1)`, and :math:`u_k`."""
        T, n = traj.us.shape[:2]
        t = t.to(traj.xs.dtype)
        k = (t * T).floor().long().clamp_(0, T - 1)
        idx = torch.arange(n, device=traj.xs.device)
        ut = traj.us[k, idx]
        return traj.xs[k, idx] + _pad(t - k.to(t.dtype) / T, ut) * ut, ut

    def start_at(self, t: Tensor) -> Tensor:
        """The start time (float64) of the segments served at each time ``t`` (bs,): :math:`k/T` with
        :math:`k = \\min(\\lfloor tT \\rfloor, T - 1)`. Starts of different steps lie at least ``1/T`` apart."""
        T = self.flow_steps
        return (t.double() * T).floor().clamp_(0, T - 1) / T

    def serve(self, t0: Tensor, xs: Tensor, u: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The point at fraction ``s`` (N,) in [0, 1) of each segment: ``(t0 + s L, xs + s L u, u)``."""
        step = s * self.segment_length
        return t0.to(u.dtype) + step, xs + _pad(step, u) * u, u

    @staticmethod
    def place(t0: Tensor, xs: Tensor, u: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Each segment continued to its row's time ``t`` (N,): ``(xs + (t - t0) u, u)``."""
        return xs + _pad(t.to(u.dtype) - t0.to(u.dtype), u) * u, u


class StraightPath(FlowPath):
    r"""The segment :math:`X_0 \to X_T` of each particle, served on all of ``[0, 1]``."""

    name = "straight"

    @property
    def segment_length(self) -> float:
        return 1.0

    def segments(self, traj: SinkhornTrajectory) -> tuple[Tensor, Tensor, Tensor]:
        T, n = traj.us.shape[:2]
        t0 = torch.zeros(n, dtype=traj.xs.dtype, device=traj.xs.device)
        return t0, traj.xs[0], traj.xs[T] - traj.xs[0]

    def segment_labels(self, labels: Tensor) -> Tensor:
        return labels

    def at(self, traj: SinkhornTrajectory, t: Tensor) -> tuple[Tensor, Tensor]:
        T = traj.us.shape[0]
        ut = traj.xs[T] - traj.xs[0]
        return traj.xs[0] + _pad(t.to(traj.xs.dtype), ut) * ut, ut

    def start_at(self, t: Tensor) -> Tensor:
        return torch.zeros(t.shape, dtype=torch.float64, device=t.device)


class PolylinePath(FlowPath):
    """The Euler polyline: step ``k`` served on ``[k/T, (k+1)/T]``."""

    name = "polyline"

    @property
    def segment_length(self) -> float:
        return 1.0 / self.flow_steps


class GridPath(FlowPath):
    """The pairs ``(k/T, X_k, u_k)`` of the paper's Algorithm 1, served at the grid times only."""

    name = "grid"

    @property
    def segment_length(self) -> float:
        return 0.0


#: The registry of paths: ``path=`` name -> class.
PATH_CLASSES: dict[str, type[FlowPath]] = {cls.name: cls for cls in (StraightPath, PolylinePath, GridPath)}

#: The targets the matcher can serve (``path=``): ``"straight"``, ``"polyline"`` or ``"grid"``.
PATHS = tuple(PATH_CLASSES)


def make_path(path: str, flow_steps: int) -> FlowPath:
    """The :class:`FlowPath` named ``path`` for flows of ``flow_steps`` steps (``ValueError`` if unknown)."""
    if path not in PATH_CLASSES:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    return PATH_CLASSES[path](flow_steps)
