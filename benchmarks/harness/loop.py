r"""torchcfm's training loop for any matcher, with a step count or a time budget, EMA weights and snapshots.

:func:`train_flow_matching` is torchcfm's loop, ``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1);
loss = mean((v(t, xt) - ut)^2)``, Adam, for any matcher, NSGF's :class:`~torchcfm_nsgf.SinkhornFlowMatcher`
included. It stops after ``train_steps`` optimiser steps or once the training has used ``time_budget_s``
seconds of its ``clock``: ``"cpu"`` (``time.process_time``, the process's CPU time, which neither other jobs on
the machine nor a paused process add to) or ``"wall"`` (``time.perf_counter``). Only the training steps are
timed (data draws, the matcher's simulation, the optimiser and the EMA update); snapshots and evaluations are
not. With ``ema`` it keeps an exponential moving average of the weights, and the returned field (the one
every benchmark evaluates) holds those; with ``snapshot_every`` it keeps a copy of the evaluated weights every
that many steps, so that one run is scored at several training times after it ends.

Class-conditional tasks: the loop takes torchcfm's guided targets,
``matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)``, and a label-taking field
``v(t, x, y)`` (:func:`make_conditional_model`), and samples with ``extra_args={"y": y}``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torchcfm.models import MLP
from torchcfm.utils import torch_wrapper
from tqdm.auto import tqdm

from torchcfm_nsgf.networks import VelocityMLP
from torchcfm_nsgf.sampling import odeint_sample

__all__ = [
    "CLOCKS",
    "EMA",
    "Sampler",
    "Snapshot",
    "StepClock",
    "TrainedField",
    "make_conditional_model",
    "make_model",
    "train_flow_matching",
]

#: ``sample_batch(n) -> (x0, x1)``, or ``(x0, x1, y1)`` for class-conditional training.
BatchFn = Callable[[int], "tuple[Tensor, ...]"]

#: The clocks a time budget can be measured on.
CLOCKS = ("cpu", "wall")


# ---------------------------------------------------------------------------------------------- fields
def make_model(width: int = 64, dim: int = 2) -> nn.Module:
    """torchcfm's time-varying ``MLP(dim, w=width)``: input ``cat([x, t[:, None]], -1)``, output (n, dim)."""
    return MLP(dim=dim, w=width, time_varying=True)


def make_conditional_model(num_classes: int, width: int = 64, dim: int = 2) -> nn.Module:
    """A class-conditional field ``v(t, x, y)``: torchcfm's MLP with a label embedding in the input
    (:class:`~torchcfm_nsgf.networks.VelocityMLP` with ``num_classes``)."""
    return VelocityMLP(dim, width, num_classes=num_classes)


class Sampler(Protocol):
    """What a benchmark asks of a trained method: ``sample(x0, nfe, solver) -> (samples, nfe_used)`` and the
    training seconds ``train_time_s`` (on the clock of the method's budget). A method may also give
    ``n_opt_steps`` and ``snapshots`` (a list of :class:`Snapshot`, each with its own ``sample``)."""

    train_time_s: float

    def sample(self, x0: Tensor, nfe: int | None, solver: str = "euler") -> tuple[Tensor, int]: ...


def _integrate(module: nn.Module, x0: Tensor, nfe: int | None, solver: str, y: Tensor | None):
    extra = None if y is None else {"y": y}
    with torch.no_grad():
        result = odeint_sample(module, x0, solver=solver, n_steps=nfe, extra_args=extra)
    return result.samples, result.total_nfe


@dataclass
class Snapshot:
    """The evaluated weights after ``steps`` optimiser steps and ``cpu_s`` / ``wall_s`` seconds of training.

    ``stats`` holds the matcher's counters at that point (``sinkhorn_s``: its simulation seconds, ``flows``:
    the flows it simulated), where it has them."""

    steps: int
    cpu_s: float
    wall_s: float
    loss: float
    field: nn.Module
    stats: dict = field(default_factory=dict)

    def sample(
        self, x0: Tensor, nfe: int | None, solver: str = "euler", y: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """Integrate ``x0`` (n, d) as :meth:`TrainedField.sample` does, with these weights."""
        return _integrate(self.field, x0, nfe, solver, y)


@dataclass
class TrainedField:
    """A learned velocity field ``field(t, x)`` integrated from t = 0 to 1, and what training it cost.

    Attributes
    ----------
    field : nn.Module
        ``field(t, x) -> dx/dt`` (torchcfm's ``torch_wrapper`` around the trained MLP), x of shape (n, 2); for
        a class-conditional model ``field(t, x, y=labels)``. The EMA weights when the loop kept an EMA.
    train_time_s : float
        Seconds of training on the budget's clock (``"wall"`` unless the loop was given ``clock="cpu"``),
        simulation (NSGF) or pair generation (2-RF) included.
    n_opt_steps : int
        Optimiser steps taken.
    losses : list of float
        The training loss at every step.
    cpu_s, wall_s : float
        Training seconds on both clocks.
    last : nn.Module or None
        The last weights (wrapped like ``field``) when ``field`` holds the EMA; None otherwise.
    snapshots : list of Snapshot
        The evaluated weights every ``snapshot_every`` steps and at the end (empty without ``snapshot_every``).
    """

    field: nn.Module
    train_time_s: float
    n_opt_steps: int
    losses: list[float]
    cpu_s: float = 0.0
    wall_s: float = 0.0
    last: nn.Module | None = None
    snapshots: list[Snapshot] = field(default_factory=list)

    def sample(
        self, x0: Tensor, nfe: int | None, solver: str = "euler", y: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """Integrate ``x0`` (n, 2) with ``nfe`` steps of a fixed-step ``solver``, or with an adaptive one
        (``nfe=None``), by :func:`~torchcfm_nsgf.odeint_sample`; labels ``y`` (n,) for a conditional field.

        Returns the samples (n, 2) and the number of field evaluations actually used.
        """
        return _integrate(self.field, x0, nfe, solver, y)


# ---------------------------------------------------------------------------------------------- pieces
class EMA:
    """An exponential moving average of a module's parameters, ``θ̄ ← d_k θ̄ + (1 - d_k) θ`` after step k, with
    ``d_k = min(decay, (1 + k) / (10 + k))`` (a warm-up, so that short runs are not held near the initial
    weights) or ``d_k = decay`` (``warmup=False``); buffers are copied. ``module`` is the averaged copy (in
    eval mode)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup, self.k = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.k) / (10 + self.k)) if self.warmup else self.decay
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(p, 1.0 - d)
        for avg, b in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
        self.k += 1


class StepClock:
    """CPU and wall seconds of the timed sections only (``with clock: ...``), plus an offset of seconds spent
    before (e.g. 2-RF's first stage); :meth:`spent` reads the budget's ``clock``."""

    def __init__(self, clock: str = "wall", offset_s: float = 0.0) -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.clock, self.cpu_s, self.wall_s = clock, offset_s, offset_s

    def __enter__(self) -> StepClock:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s += time.process_time() - self._cpu
        self.wall_s += time.perf_counter() - self._wall

    def spent(self) -> float:
        return self.cpu_s if self.clock == "cpu" else self.wall_s


def matcher_stats(matcher: object) -> dict:
    """The matcher's simulation seconds and flows so far, where it counts them (NSGF's matchers do)."""
    return {
        "sinkhorn_s": float(getattr(matcher, "_sim_seconds", 0.0)),
        "flows": getattr(matcher, "n_flows", 0),
    }


def check_stop_rule(train_steps: int | None, time_budget_s: float | None) -> None:
    """Exactly one of a step count (>= 1) and a time budget (> 0)."""
    if (train_steps is None) == (time_budget_s is None):
        raise ValueError("give exactly one of train_steps and time_budget_s")
    if train_steps is not None and train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0, got {time_budget_s}")


# ---------------------------------------------------------------------------------------------- training
def train_flow_matching(
    model: nn.Module,
    matcher,
    sample_batch: BatchFn,
    *,
    train_steps: int | None,
    batch_size: int = 256,
    lr: float = 1e-3,
    time_budget_s: float | None = None,
    time_offset_s: float = 0.0,
    clock: str = "wall",
    ema: float | None = None,
    ema_warmup: bool = True,
    snapshot_every: int | None = None,
    progress: bool = False,
    desc: str = "training",
) -> TrainedField:
    """torchcfm's training loop: ``t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)``,
    ``vt = model(cat([xt, t[:, None]], -1))``, ``loss = mean((vt - ut)^2)``, Adam.

    Class-conditional when ``sample_batch`` returns ``(x0, x1, y1)``: ``t, xt, ut, _, y =
    matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)`` (a matcher without that method, e.g.
    ``ConditionalFlowMatcher``, keeps ``y = y1`` with its independent pairs) and ``vt = model(t, xt, y=y)``.

    Parameters
    ----------
    model : nn.Module
        torchcfm's time-varying MLP (see :func:`make_model`), or a field ``model(t, x, y)`` for
        class-conditional training (:func:`make_conditional_model`); trained in place.
    matcher
        Any torchcfm matcher (``sample_location_and_conditional_flow``), NSGF's included.
    sample_batch : callable
        ``sample_batch(batch_size) -> (x0, x1)``, each (batch_size, 2), or ``(x0, x1, y1)`` with labels
        ``y1`` (batch_size,).
    train_steps : int or None
        Number of optimiser steps; None trains until ``time_budget_s`` instead.
    batch_size, lr : int, float
        Minibatch size and Adam learning rate.
    time_budget_s : float, optional
        Stop once the training time on ``clock`` (``time_offset_s`` included) reaches it; exactly one of
        ``train_steps`` and ``time_budget_s`` must be given.
    time_offset_s : float
        Seconds already spent before this loop (2-RF's first rectified flow), added to the training time.
    clock : {"wall", "cpu"}
        What ``time_budget_s`` and ``train_time_s`` measure: ``time.perf_counter`` or ``time.process_time``.
    ema : float, optional
        EMA decay; the returned ``field`` (and every snapshot) then holds the averaged weights.
    ema_warmup : bool
        The EMA's warm-up ``min(decay, (1 + k) / (10 + k))`` at step k (:class:`EMA`); False: ``decay`` always.
    snapshot_every : int, optional
        Keep a copy of the evaluated weights every this many steps, and at the last step.
    progress : bool
        Show a tqdm bar.
    """
    check_stop_rule(train_steps, time_budget_s)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    averaged = None if ema is None else EMA(model, ema, ema_warmup)
    timer = StepClock(clock, time_offset_s)
    losses: list[float] = []
    snapshots: list[Snapshot] = []
    conditional = False

    def wrap(module: nn.Module) -> nn.Module:
        return module if conditional else torch_wrapper(module)

    def snapshot() -> None:
        source = model if averaged is None else averaged.module
        frozen = copy.deepcopy(source).eval()
        snapshots.append(
            Snapshot(len(losses), timer.cpu_s, timer.wall_s, losses[-1], wrap(frozen), matcher_stats(matcher))
        )

    with tqdm(total=train_steps, desc=desc, disable=None if progress else True, leave=False) as bar:
        while True:
            with timer:
                batch = sample_batch(batch_size)
                conditional = len(batch) == 3
                if conditional:
                    x0, x1, y1 = batch
                    guided = getattr(matcher, "guided_sample_location_and_conditional_flow", None)
                    if guided is None:
                        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
                        y = y1
                    else:
                        t, xt, ut, _, y = guided(x0, x1, y1=y1)[:5]
                    vt = model(t, xt, y=y)
                else:
                    x0, x1 = batch
                    t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
                    vt = model(torch.cat([xt, t[:, None]], dim=-1))
                loss = torch.mean((vt - ut) ** 2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    averaged.update(model)
                losses.append(loss.item())
            bar.update(1)
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3g}")
            done = (train_steps is not None and len(losses) >= train_steps) or (
                time_budget_s is not None and timer.spent() >= time_budget_s
            )
            if snapshot_every and (done or len(losses) % snapshot_every == 0):
                snapshot()
            if done:
                break
    model.eval()
    return TrainedField(
        field=wrap(model if averaged is None else averaged.module),
        train_time_s=timer.spent(),
        n_opt_steps=len(losses),
        losses=losses,
        cpu_s=timer.cpu_s,
        wall_s=timer.wall_s,
        last=None if averaged is None else wrap(model),
        snapshots=snapshots,
    )
