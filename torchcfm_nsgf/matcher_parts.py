"""The matcher's parts as its own attributes and methods: the face of each part on the matcher.

:class:`MatcherParts` names the settings and counters of :class:`~torchcfm_nsgf.SinkhornFlowMatcher`'s parts
(:class:`~torchcfm_nsgf.flow.SinkhornFlow` as ``self.flow``, :class:`~torchcfm_nsgf.paths.FlowPath` as
``self.geometry``, :class:`~torchcfm_nsgf.replay.Replay` as ``self.replay``) as the matcher's attributes
(``flow_steps``, ``blur``, ``n_flows``, ``pool``, ``refresh_every``, ...), and gives their methods
(``simulate``, ``segments``, ``path_at``, ...) the matcher's names, as the single-class matcher had them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flow import SinkhornTrajectory
from .pool import TrajectoryPool
from .sinkhorn import SinkhornOptions

__all__ = ["MatcherParts"]


class MatcherParts:
    """The attributes and methods of the matcher's parts, under the matcher's names."""

    # ------------------------------------------------------------------ the flow's settings and counters
    @property
    def flow_steps(self) -> int:
        """Number of Euler steps ``T`` of each flow."""
        return self.flow.flow_steps

    @property
    def step_sizes(self) -> tuple[float, ...]:
        """Euler step of each flow step, in the flow's own time."""
        return self.flow.step_sizes

    @property
    def flow_time(self) -> float:
        """Total time :math:`\\sum_k \\eta_k` of the simulated flow in its own units."""
        return self.flow.flow_time

    @property
    def sinkhorn(self) -> SinkhornOptions:
        """The engine's settings."""
        return self.flow.sinkhorn

    @property
    def blur(self) -> float | None:
        """The absolute blur of the latest flow (the given blur for an absolute one; None before a flow)."""
        return self.flow.blur

    @blur.setter
    def blur(self, value: float | None) -> None:
        self.flow.blur = value

    @property
    def n_flows(self) -> int:
        """Simulated flows."""
        return self.flow.n_flows

    @n_flows.setter
    def n_flows(self, value: int) -> None:
        self.flow.n_flows = value

    @property
    def n_solves(self) -> int:
        """Sinkhorn solves."""
        return self.flow.n_solves

    @n_solves.setter
    def n_solves(self, value: int) -> None:
        self.flow.n_solves = value

    @property
    def _sim_seconds(self) -> float:
        return self.flow.sim_seconds

    @property
    def generator(self) -> torch.Generator | None:
        """The CPU generator of the matcher's draws (shared by its parts)."""
        return self.flow.generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self.flow.generator = self.replay.generator = value

    @property
    def progress(self) -> bool:
        return self.flow.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self.flow.progress = value

    # ------------------------------------------------------------------ the path's and the replay's
    @property
    def path(self) -> str:
        """The served path: ``"straight"``, ``"polyline"`` or ``"grid"``."""
        return self.geometry.name

    @property
    def pool(self) -> TrajectoryPool | None:
        """The trajectory pool (None without one, and before the first call with ``pool="auto"``)."""
        return self.replay.pool

    @property
    def _auto_pool(self) -> bool:
        return self.replay.auto

    @property
    def refresh_every(self) -> int:
        return self.replay.refresh_every

    @refresh_every.setter
    def refresh_every(self, value: int) -> None:
        self.replay.refresh_every = value

    @property
    def flow_size(self) -> int | None:
        return self.replay.flow_size

    # ------------------------------------------------------------------ the path's geometry
    @property
    def segment_length(self) -> float:
        """Clock length of one served segment: 1 (straight), 1/T (polyline) or 0 (grid)."""
        return self.geometry.segment_length

    def segments(self, traj: SinkhornTrajectory) -> tuple[Tensor, Tensor, Tensor]:
        """The served segments of a trajectory: start times (N,), start points (N, *dim), velocities (N, *dim).

        A segment starting at ``(t_s, x_s)`` with velocity ``u`` covers ``t_s + s * L`` for ``s in [0, 1)``,
        ``L = segment_length``, at ``x_s + s * L * u``. ``N = n`` for ``"straight"``, ``T * n`` otherwise.
        """
        return self.geometry.segments(traj)

    def segment_labels(self, labels: Tensor) -> Tensor:
        """The class of each served segment (:meth:`segments`) from the class of each particle ``(n,)``."""
        return self.geometry.segment_labels(labels)

    def path_at(self, traj: SinkhornTrajectory, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""Position and velocity of each particle's path at its own time ``t`` (n,) in [0, 1].

        ``"straight"``: :math:`X_0 + t (X_T - X_0)` and :math:`X_T - X_0`. ``"polyline"`` and ``"grid"``: the
        Euler polyline, :math:`X_k + (t - k/T) u_k` with :math:`k = \min(\lfloor tT \rfloor, T - 1)`, and
        :math:`u_k` (the right derivative; ``t = 1`` gives :math:`X_T` and :math:`u_{T-1}`).
        """
        return self.geometry.at(traj, t)

    # ------------------------------------------------------------------ the flow
    def flow_blur(self, x1: Tensor) -> float:
        """The absolute blur of a flow towards the targets ``x1`` (m, *dim); reads no state and sets none.

        ``sinkhorn.blur`` times the targets' scale (:meth:`SinkhornOptions.scale_of`) for a relative blur,
        where the default options take ``HIGH_DIM_BLUR`` instead of their 0.1 on targets with more than
        ``HIGH_DIM_FEATURES`` features per sample; ``sinkhorn.blur`` itself for an absolute one.
        """
        return self.flow.flow_blur(x1)

    def simulate(self, x0: Tensor, x1: Tensor) -> SinkhornTrajectory:
        r"""Simulate the empirical Sinkhorn flow of the particles ``x0`` towards the samples ``x1``.

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source particles :math:`X_0`.
        x1 : Tensor, shape (m, *dim)
            Target samples (``m`` may differ from ``n``).

        Returns
        -------
        SinkhornTrajectory
            Positions (T+1, n, *dim), normalised-clock velocities (T, n, *dim), times (T+1,), in the promoted
            dtype of ``x0`` and ``x1``, on their device. A step starts from the previous step's potentials
            when the particles moved by less than one blur (root mean square); after a larger step the engine
            anneals afresh, which is cheaper than iterating from potentials of a distant cloud.
        """
        return self.flow.simulate(x0, x1)

    def simulate_guided(
        self, x0: Tensor, x1: Tensor, y1: Tensor, y0: Tensor | None = None
    ) -> tuple[SinkhornTrajectory, Tensor]:
        r"""Class-conditional flow: one Sinkhorn flow per class, particles of class ``c`` towards ``x1[y1 == c]``.

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source particles.
        x1 : Tensor, shape (m, *dim)
            Target samples.
        y1 : Tensor, shape (m,) or (m, 1)
            Integer class labels of ``x1``.
        y0 : Tensor, shape (n,) or (n, 1), optional
            Class of each source particle; every class in ``y0`` must occur in ``y1``. Default: the
            particles are split among the classes of ``y1`` in proportion to their counts (for ``n == m``
            exactly the counts, particle ``i`` taking class ``y1[i]``; otherwise a largest-remainder split
            over a random permutation drawn with ``generator``). With ``distributed`` every process's
            particles must cover the same classes (each class's solve is a collective); a ``ValueError`` on
            every process otherwise.

        Returns
        -------
        trajectory : SinkhornTrajectory
            As :meth:`simulate`, particles in the rows of ``x0``; ``marginal_errors`` holds the largest
            error over the classes at each step and ``n_iters`` the summed iterations.
        labels : Tensor, shape (n,)
            The class of each particle (``y1``'s dtype, on ``x0``'s device).

        Notes
        -----
        The blur is resolved once against the whole ``x1``. Counters: one flow, ``T`` solves per class.
        Why one flow per class rather than one solve with a cost that forbids cross-class transport:
        :meth:`torchcfm_nsgf.flow.SinkhornFlow.simulate_guided`.
        """
        return self.flow.simulate_guided(x0, x1, y1, y0)
