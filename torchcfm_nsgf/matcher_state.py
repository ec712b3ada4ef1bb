"""What :class:`~torchcfm_nsgf.SinkhornFlowMatcher` keeps between calls, written and read as one state.

:class:`MatcherState` writes the state of the matcher's parts (:class:`~torchcfm_nsgf.flow.SinkhornFlow`,
:class:`~torchcfm_nsgf.replay.Replay` with its pool) and reads it back.

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

import math
from typing import Any

import torch
from torch import Tensor

from .pool import TrajectoryPool
from .replay import CHECKS

__all__ = ["STATE_FORMAT", "MatcherState"]

#: The format written by :meth:`MatcherState.state_dict` (states without ``format`` are of format 1).
STATE_FORMAT = "SinkhornFlowMatcher/2"


def _is_finite_float(value: object) -> bool:
    """Whether ``value`` is a finite real number (a bool or a string is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MatcherState:
    """The matcher's ``state_dict`` and ``load_state_dict`` over its parts (module docstring)."""

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
        everything the matcher held (as after :meth:`reset`). A state of the first format names no settings:
        for the ``"polyline"`` and ``"grid"`` paths its ``flow_steps`` is read from the start times of its
        pool's segments (multiples of ``1/T``) and checked; a pool of the ``"straight"`` path (every segment
        starts at 0), an empty pool or one on disk tells nothing, and such a state loads unchecked, as it
        did. A state written before the blur was resolved
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
        pending = state.get("pending")
        if pending is not None and not (isinstance(pending, dict) and set(pending) == set(CHECKS)):
            raise ValueError(
                f"state['pending'] must be None or a dict of the checks {list(CHECKS)}, got {pending!r}"
            )
        for key in ("calls", "flows", "solves", "since_flow", "last_flow_n"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}] must be a non-negative int, got {value!r}")
        for key in ("blur", "fixed_blur"):
            value = state.get(key)
            if value is not None and not _is_finite_float(value):
                raise ValueError(f"state[{key!r}] must be a finite float or None, got {value!r}")
        targets = state.get("targets")
        if targets is not None and not (
            isinstance(targets, dict)
            and isinstance(targets.get("mean"), Tensor)
            and targets["mean"].is_floating_point()
            and _is_finite_float(targets.get("scale"))
        ):
            raise ValueError(
                f"state['targets'] must be None or a dict with a float tensor 'mean' and a float 'scale', "
                f"got {targets!r}"
            )
        staged = state.get("staged")
        if staged is not None and not (
            isinstance(staged, dict)
            and set(staged) == {"x0", "x1", "y1"}
            and isinstance(staged["x0"], Tensor)
            and isinstance(staged["x1"], Tensor)
            and (staged["y1"] is None or isinstance(staged["y1"], Tensor))
        ):
            raise ValueError(
                f"state['staged'] must be None or a dict of tensors 'x0', 'x1' and 'y1' (a tensor or None), "
                f"got {staged!r}"
            )
        if pool_state is not None:
            if self.replay.pool is None and not self.replay.auto:
                raise ValueError("state holds a pool but this matcher has none (it was built with pool=None)")
            pool = self.replay.pool
            TrajectoryPool.check_state(pool_state, None if pool is None else pool.storage)
            if "flow_steps" not in settings:
                self._check_inferred_flow_steps(pool_state, ours["flow_steps"])
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

    def _check_inferred_flow_steps(self, pool_state: dict[str, Any], flow_steps: int) -> None:
        """Raise when a state without settings holds segments of another ``flow_steps`` (polyline, grid).

        Their start times are the multiples ``k/T`` of the writer's ``T``, the latest ``(T - 1)/T``. A pool
        whose segments all start at 0 (the straight path, or ``T = 1``), an empty pool or a pool kept on
        disk tells nothing: its state loads unchecked.
        """
        starts = pool_state.get("t")
        if self.path not in ("polyline", "grid") or not isinstance(starts, Tensor) or starts.numel() == 0:
            return
        latest = float(starts.double().max())
        if not 0 < latest < 1:
            return
        theirs = round(1 / (1 - latest))
        if theirs != flow_steps:
            raise ValueError(
                f"state was written with flow_steps={theirs} (its pool's segments start at multiples of "
                f"1/{theirs}), but this matcher has flow_steps={flow_steps}: build the matcher with the "
                f"settings of the checkpoint"
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
