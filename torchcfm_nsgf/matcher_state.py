"""What :class:`~torchcfm_nsgf.SinkhornFlowMatcher` keeps: the attributes of its parts, and its checkpoints.

:class:`MatcherState` is the part of the matcher that names the settings and counters of its parts
(:class:`~torchcfm_nsgf.flow.SinkhornFlow`, :class:`~torchcfm_nsgf.paths.FlowPath`,
:class:`~torchcfm_nsgf.replay.Replay`) as the matcher's own attributes, and writes and reads its state.

**The state's format.** :meth:`MatcherState.state_dict` returns the keys of the first format (``calls``,
``flows``, ``solves``, ``blur``, ``targets``, ``warned_drift``, ``fixed_blur``, ``staged``, ``since_flow``,
``last_flow_n``, ``generator``, ``pool``) plus ``format`` (:data:`STATE_FORMAT`), ``settings`` (the matcher's
class, ``flow_steps``, ``step_sizes``, ``path`` and the sample shape it holds) and ``pending`` (the device
checks of the latest call, when they are read one call late). :meth:`MatcherState.load_state_dict` reads
both formats (a state without ``format`` is of the first), checks everything before changing anything, and
raises a ``ValueError`` naming the key or setting and both values for a foreign dict, another format, or a
state of another class, ``flow_steps``, step sizes, path or sample shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .flow import SinkhornTrajectory
from .pool import TrajectoryPool
from .sinkhorn import SinkhornOptions

__all__ = ["STATE_FORMAT", "MatcherState"]

#: The format written by :meth:`MatcherState.state_dict` (states without ``format`` are of format 1).
STATE_FORMAT = "SinkhornFlowMatcher/2"


class MatcherState:
    """The matcher's attributes, read from (and written to) its parts, and its ``state_dict``."""

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

    # ------------------------------------------------------------------ checkpoints
    def _sample_shape(self) -> list[int] | None:
        """The sample shape the matcher holds items or rows of (None when it holds none)."""
        pool, staged = self.replay.pool, self.replay.staged
        if pool is not None and pool.feature_shape is not None:
            return list(pool.feature_shape)
        if staged is not None:
            return list(staged["x0"].shape[1:])
        return None

    def _settings(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "flow_steps": self.flow_steps,
            "step_sizes": list(self.step_sizes),
            "path": self.path,
            "sample_shape": self._sample_shape(),
        }

    def state_dict(self) -> dict:
        """Resumable state: counters, the latest flow's blur, the statistics of its targets (for the
        distribution-change warning), the staged rows, the generator, the pool, and the settings it was
        written under (module docstring of :mod:`torchcfm_nsgf.matcher_state`)."""
        replay = self.replay.state_dict()
        return {
            "format": STATE_FORMAT,
            "settings": self._settings(),
            "calls": self.n_calls,
            "flows": self.n_flows,
            "solves": self.n_solves,
            "blur": self.blur,
            "targets": replay["targets"],
            "warned_drift": replay["warned_drift"],
            "fixed_blur": self.flow.fixed_blur,
            "staged": replay["staged"],
            "since_flow": replay["since_flow"],
            "last_flow_n": replay["last_flow_n"],
            "pending": replay["pending"],
            "generator": None if self.generator is None else self.generator.get_state(),
            "pool": replay["pool"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, of this version or the first (the matcher must have been
        built the same way).

        Everything is checked before anything changes: a foreign dict, another format, or a state written by
        another class or under other ``flow_steps``, step sizes, path or sample shape raises a ``ValueError``
        naming the key or setting and both values, and leaves the matcher as it was. The state replaces
        everything the matcher held (as after :meth:`reset`). A state written before the blur was resolved
        per flow (it holds ``"sinkhorn_blur"``) continues as it was run: every later flow keeps the blur its
        first call fixed, until :meth:`reset`.
        """
        self._check_state(state)
        flow = self.flow
        flow.reset()
        self.n_calls = int(state["calls"])
        flow.n_flows = int(state.get("flows", 0))
        flow.n_solves = int(state.get("solves", 0))
        if state.get("blur") is not None:
            flow.blur = float(state["blur"])
        if state.get("fixed_blur") is not None:
            flow.fixed_blur = float(state["fixed_blur"])
        elif "sinkhorn_blur" in state and state.get("blur") is not None:
            flow.fixed_blur = float(state["blur"])
        self.replay.load_state_dict(state)
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])  # after the auto pool's seed draw

    def _check_state(self, state: object) -> None:
        """Raise for a state this matcher cannot load; change nothing."""
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from SinkhornFlowMatcher.state_dict, got {type(state).__name__}"
            )
        name = type(self).__name__
        fmt = state.get("format", "SinkhornFlowMatcher/1")
        if fmt not in ("SinkhornFlowMatcher/1", STATE_FORMAT):
            raise ValueError(
                f"state has format {fmt!r}, but this version of {name} reads 'SinkhornFlowMatcher/1' and "
                f"{STATE_FORMAT!r}"
            )
        if "calls" not in state:  # a holder may add keys of its own (NSGF++'s "endpoints"): not checked
            raise ValueError(
                f"state is not a {name} state_dict: it has no key 'calls' (its keys: {sorted(map(str, state))})"
            )
        settings = state.get("settings") or {}
        ours = self._settings()
        for key in ("class", "flow_steps", "step_sizes", "path"):
            if key in settings and settings[key] != ours[key]:
                raise ValueError(
                    f"state was written with {key}={settings[key]!r}, but this matcher has "
                    f"{key}={ours[key]!r}: build the matcher with the settings of the checkpoint"
                )
        pool_state = state.get("pool")
        theirs = settings.get("sample_shape")
        if theirs is None and isinstance(pool_state, dict):
            theirs = pool_state.get("feature_shape")
        held = None if self.replay.auto else ours["sample_shape"]
        if theirs is not None and held is not None and list(theirs) != list(held):
            raise ValueError(
                f"state holds samples of shape {tuple(theirs)}, but this matcher's pool holds items of shape "
                f"{tuple(held)}: pass a new TrajectoryPool, or load the checkpoint of this data"
            )
        for key in ("calls", "flows", "solves", "since_flow", "last_flow_n"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}] must be a non-negative int, got {value!r}")
        if pool_state is not None:
            if self.replay.pool is None and not self.replay.auto:
                raise ValueError("state holds a pool but this matcher has none (it was built with pool=None)")
            pool = self.replay.pool
            TrajectoryPool.check_state(pool_state, None if pool is None else pool.storage)
        generator = state.get("generator")
        if generator is not None and self.generator is not None:
            current = self.generator.get_state()
            if not (
                isinstance(generator, Tensor)
                and generator.dtype == torch.uint8
                and generator.shape == current.shape
            ):
                raise ValueError(
                    f"state['generator'] is not the state of a generator like this matcher's (a uint8 tensor of "
                    f"shape {tuple(current.shape)})"
                )

    def __repr__(self) -> str:
        steps = self.step_sizes
        eta = f"{steps[0]:g}" if len(set(steps)) == 1 else "[" + ", ".join(f"{s:g}" for s in steps) + "]"
        pool = "auto" if self._auto_pool else ("yes" if self.pool is not None else "no")
        return (
            f"{type(self).__name__}(sigma={self.sigma:g}, flow_steps={self.flow_steps}, step_size={eta}, "
            f"path={self.path!r}, sinkhorn={self.sinkhorn}, pool={pool}, refresh_every={self.refresh_every}"
            + ("" if self.flow_size is None else f", flow_size={self.flow_size}")
            + (", balanced=True)" if self.balanced else ")")
        )
