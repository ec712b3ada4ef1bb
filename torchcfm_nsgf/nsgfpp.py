r"""NSGF++ (Zhu et al., 2024, Algorithm 3): a short Sinkhorn flow, a time predictor and a neural straight flow.

Three networks, trained separately on the same source :math:`\mu_0` and target :math:`\mu^*`:

* the **NSGF field** :math:`v_\theta(t, x)`, regressed on a short simulated Sinkhorn flow (``T <= 5`` steps of
  a large step size η) by :class:`~torchcfm_nsgf.SinkhornFlowMatcher` with a trajectory pool;
* the **phase-transition time predictor** :math:`t_\phi(x) \in [0, 1]`, regressed (MSE) on straight
  interpolations :math:`X_t = (1 - t) X_0 + t X_1` with :math:`X_0 \sim \mu_0`, :math:`X_1 \sim \mu^*`,
  :math:`t \sim U[0, 1]`: it says where on a straight source-to-data path a point sits;
* the **neural straight flow** :math:`u_\delta(t, x)`, trained by torchcfm's
  ``ConditionalFlowMatcher(sigma=0)`` on the same straight paths (target :math:`X_1 - X_0`).

Sampling (:func:`nsgfpp_sample`): phase 1 takes ``T`` explicit-Euler steps of :math:`v_\theta` on the
matcher's normalised clock (``dt = 1/T``); then :math:`\tau = t_\phi(X_T)` per sample; phase 2 integrates
:math:`u_\delta` from each sample's own :math:`\tau` to 1. torchdyn integrates every sample over one shared
time span, so phase 2 is solved on a shared clock :math:`s \in [0, 1]` through the change of variable

.. math::
    t(s) = \tau + s (1 - \tau), \qquad
    \frac{dx}{ds} = (1 - \tau)\, u_\delta\big(\tau + s (1 - \tau),\, x\big),

which is one torchdyn solve for the whole batch (any solver: a step budget for fixed-step ones, a
tolerance for adaptive ones). A sample with :math:`\tau = 1` does not move; with :math:`\tau = 0` phase 2 is
plain straight-flow sampling over [0, 1].

Conventions
-----------
* Network signatures: ``nsgf(t, x)`` and ``straight(t, x)`` return ``dx/dt`` of ``x``'s shape; ``straight``
  must accept a per-sample time ``t`` of shape ``(bs,)`` (phase 2 and training call it so; torchcfm's
  ``UNetModelWrapper`` and :class:`~torchcfm_nsgf.networks.VelocityMLP` do). ``predictor(x)`` returns ``(bs,)``
  or ``(bs, 1)``.
* Predictor range: the shipped predictors end in a sigmoid. A user predictor whose output leaves [0, 1] is
  **clamped** to [0, 1] with a ``RuntimeWarning`` (per call, counting the offending samples); a NaN output
  raises ``ValueError``.
* Phase-1 length: ``n_steps`` (``T``) **must be at most 5** (:data:`MAX_PHASE1_STEPS`); a larger value raises
  ``ValueError`` — NSGF++ is designed around a few large steps; use plain NSGF for long flows.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from tqdm.auto import tqdm

from ._io import atomic_save
from ._validation import check_cloud, check_positive, check_same_features
from .matcher import SinkhornFlowMatcher
from .pool import TrajectoryPool
from .sampling import NFECounter, SampleResult, odeint_sample, solver_spec
from .sinkhorn import SinkhornOptions

__all__ = [
    "MAX_PHASE1_STEPS",
    "NSGFPlusPlus",
    "nsgfpp_sample",
    "predict_time",
    "straight_flow_from",
]

#: Largest number of NSGF steps of phase 1 (paper: ``T <= 5``).
MAX_PHASE1_STEPS = 5

_FORMAT = "torchcfm_nsgf.nsgfpp/1"
Sampler = Callable[[int], Tensor]


# ---------------------------------------------------------------------------------------------- checks
def _check_phase1_steps(n_steps: object, name: str = "n_steps") -> int:
    check_positive(n_steps, name, integer=True)
    if n_steps > MAX_PHASE1_STEPS:
        raise ValueError(
            f"{name} must be at most {MAX_PHASE1_STEPS} for NSGF++ (a few large Sinkhorn-flow steps), got "
            f"{n_steps}; use SinkhornFlowMatcher alone for a long flow"
        )
    return n_steps


def _check_callable(f: object, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name} must be callable, got {type(f).__name__}")


class _CallCounter(nn.Module):
    """Count the calls of a one-argument network (the predictor), like :class:`NFECounter` for fields."""

    def __init__(self, net: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.net(x)


# ---------------------------------------------------------------------------------------------- predictor
def predict_time(predictor: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Phase-transition times :math:`\tau = t_\phi(x)`, validated and clamped to [0, 1].

    Parameters
    ----------
    predictor : callable
        ``predictor(x)`` returning shape ``(bs,)`` or ``(bs, 1)``.
    x : Tensor, shape (bs, *dim)

    Returns
    -------
    Tensor, shape (bs,)
        :math:`\tau` in x's dtype. Values outside [0, 1] are clamped, with a ``RuntimeWarning``.

    Raises
    ------
    ValueError
        The output has another shape or contains NaN.
    """
    _check_callable(predictor, "predictor")
    tau = predictor(x)
    bs = x.shape[0]
    if not isinstance(tau, Tensor) or tau.shape not in ((bs,), (bs, 1)):
        shape = tuple(tau.shape) if isinstance(tau, Tensor) else type(tau).__name__
        raise ValueError(
            f"predictor(x) must return shape ({bs},) or ({bs}, 1) for x of shape "
            f"{tuple(x.shape)}, got {shape}"
        )
    tau = tau.reshape(bs).to(x.dtype)
    if bool(torch.isnan(tau).any()):
        raise ValueError("predictor(x) returned NaN times")
    outside = int(((tau < 0) | (tau > 1)).sum())
    if outside:
        warnings.warn(
            f"predictor output outside [0, 1] for {outside} of {bs} samples (range "
            f"[{float(tau.min()):.3g}, {float(tau.max()):.3g}]); clamped to [0, 1]",
            RuntimeWarning,
            stacklevel=2,
        )
        tau = tau.clamp(0.0, 1.0)
    return tau


# ---------------------------------------------------------------------------------------------- phase 2
class _SharedClockField(nn.Module):
    r"""``g(s, x) = (1 - τ) u_δ(τ + s (1 - τ), x)``: the straight flow from per-sample times on one clock s."""

    def __init__(self, straight: NFECounter, tau: Tensor, feature_dims: int) -> None:
        super().__init__()
        self.straight = straight
        self.tau = tau
        self.scale = (1.0 - tau).reshape(-1, *([1] * feature_dims))

    def forward(self, s: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        t = self.tau + s.reshape(-1)[:1] * (1.0 - self.tau)  # (bs,): s is 0-d (fixed-step) or (1,) (adaptive)
        u = self.straight(t, x)
        if not isinstance(u, Tensor) or u.shape != x.shape:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"straight(t, x) must return x's shape {tuple(x.shape)}, got {shape}")
        return self.scale * u


def _check_solver(solver: object, n_steps: int | None) -> None:
    if solver_spec(solver).adaptive:
        if n_steps is not None:
            raise ValueError(
                f"straight_steps has no meaning for the adaptive solver {solver!r}; leave it None"
            )
    elif n_steps is None:
        raise ValueError(f"straight_steps is required for the fixed-step solver {solver!r}")
    else:
        check_positive(n_steps, "straight_steps", integer=True)


def straight_flow_from(
    straight: Callable[..., Tensor],
    x: Tensor,
    tau: Tensor,
    *,
    solver: str = "euler",
    n_steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
) -> SampleResult:
    r"""Integrate :math:`dx/dt = u_\delta(t, x)` from each sample's own time :math:`\tau_i` to 1 (phase 2).

    One torchdyn solve (:func:`~torchcfm_nsgf.odeint_sample`) on the shared clock :math:`s \in [0, 1]` with
    :math:`t(s) = \tau + s (1 - \tau)` and :math:`dx/ds = (1 - \tau) u_\delta(t(s), x)`.

    Parameters
    ----------
    straight : callable
        ``straight(t, x)`` with ``t`` of shape ``(bs,)``; returns ``(bs, *dim)``.
    x : Tensor, shape (bs, *dim)
        States at the times ``tau``.
    tau : Tensor, shape (bs,)
        Start times in [0, 1].
    solver : str
        ``euler``, ``midpoint``, ``rk4`` (with ``n_steps`` steps on the s-clock) or ``dopri5``, ``tsit5``
        (with ``atol``, ``rtol``).
    n_steps : int, optional
        Step budget of a fixed-step solver.
    atol, rtol : float
        Tolerances of an adaptive solver.
    return_trajectory : bool
        Also return the states on the s-grid.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``nfe == {"straight": calls}``, counted; if asked, ``trajectory``
        ``(n_s, bs, *dim)`` at the clock values ``times`` ``(n_s,)`` = ``s`` (sample ``i`` is at time
        ``tau_i + s (1 - tau_i)``).
    """
    _check_callable(straight, "straight")
    x = check_cloud(x, "x")
    _check_solver(solver, n_steps)
    if not isinstance(tau, Tensor) or tau.shape != (x.shape[0],):
        shape = tuple(tau.shape) if isinstance(tau, Tensor) else type(tau).__name__
        raise ValueError(f"tau must be a tensor of shape ({x.shape[0]},) to match x, got {shape}")
    tau = tau.to(device=x.device, dtype=x.dtype)
    if not bool(((tau >= 0) & (tau <= 1)).all()):
        raise ValueError("tau must lie in [0, 1] (and not be NaN)")
    counter = NFECounter(straight)
    g = _SharedClockField(counter, tau, x.dim() - 1)
    out = odeint_sample(
        g, x, solver=solver, n_steps=n_steps, atol=atol, rtol=rtol, return_trajectory=return_trajectory
    )
    return SampleResult(
        samples=out.samples, nfe={"straight": counter.nfe}, trajectory=out.trajectory, times=out.times
    )


# ---------------------------------------------------------------------------------------------- sampler
def nsgfpp_sample(
    nsgf: Callable[..., Tensor],
    predictor: Callable[[Tensor], Tensor],
    straight: Callable[..., Tensor],
    x0: Tensor,
    *,
    n_steps: int = 5,
    solver: str = "euler",
    straight_steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleResult:
    r"""NSGF++ sampling (Algorithm 3): ``T`` NSGF Euler steps, :math:`\tau = t_\phi(X_T)`, straight flow to 1.

    Parameters
    ----------
    nsgf : callable
        NSGF field ``nsgf(t, x)`` on the matcher's normalised clock (``t`` a 0-d tensor).
    predictor : callable
        ``predictor(x) -> (bs,)``; see :func:`predict_time` for the range convention.
    straight : callable
        Straight flow ``straight(t, x)`` with per-sample ``t`` of shape ``(bs,)``.
    x0 : Tensor, shape (bs, *dim)
        Source samples.
    n_steps : int
        ``T``, the phase-1 Euler steps (``1 .. 5``; ``> 5`` raises ``ValueError``).
    solver, straight_steps, atol, rtol
        Phase-2 solver (see :func:`straight_flow_from`); ``straight_steps`` defaults to 5 for fixed-step
        solvers.
    return_trajectory : bool
        Also return both phases' states.
    progress : bool
        Progress bar over the phase-1 steps.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``nfe == {"nsgf": T, "predictor": 1, "straight": n}``, counted;
        ``extras["tau"]`` ``(bs,)``: the predicted phase-transition times :math:`t_\phi(X_T)` (clamped to
        [0, 1]). With ``return_trajectory``: ``trajectory`` ``(T + n_s, bs, *dim)`` holds phase 1,
        :math:`X_0, \dots, X_T` (``trajectory[: T + 1]``, NSGF clock ``k / T``), then phase 2 from
        :math:`X_T` (``trajectory[T:]``) at the shared clock values ``extras["phase2_clock"]`` ``(n_s,)``,
        sample ``i`` at time ``tau[i] + s * (1 - tau[i])``; ``times`` is None (two clocks).
    """
    _check_callable(nsgf, "nsgf")
    _check_callable(predictor, "predictor")
    _check_callable(straight, "straight")
    x0 = check_cloud(x0, "x0")
    n_steps = _check_phase1_steps(n_steps)
    if straight_steps is None and not solver_spec(solver).adaptive:
        straight_steps = 5
    _check_solver(solver, straight_steps)

    phase1 = odeint_sample(
        nsgf, x0, solver="euler", n_steps=n_steps, return_trajectory=return_trajectory, progress=progress
    )
    pred_counter = _CallCounter(predictor)
    with torch.no_grad():
        tau = predict_time(pred_counter, phase1.samples)
    phase2 = straight_flow_from(
        straight,
        phase1.samples,
        tau,
        solver=solver,
        n_steps=straight_steps,
        atol=atol,
        rtol=rtol,
        return_trajectory=return_trajectory,
    )
    extras = {"tau": tau}
    trajectory = None
    if return_trajectory:
        trajectory = torch.cat([phase1.trajectory, phase2.trajectory[1:]])
        extras["phase2_clock"] = phase2.times
    return SampleResult(
        samples=phase2.samples,
        nfe={"nsgf": phase1.nfe["field"], "predictor": pred_counter.nfe, **phase2.nfe},
        trajectory=trajectory,
        extras=extras,
    )


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class _Settings:
    n_steps: int
    step_size: float
    sinkhorn: SinkhornOptions
    pool_capacity: int
    refresh_every: int
    lr: float
    feature_shape: tuple[int, ...] | None = None
    iterations: dict[str, int] = field(default_factory=lambda: {"nsgf": 0, "predictor": 0, "straight": 0})


class NSGFPlusPlus:
    r"""Train and sample NSGF++: the NSGF field, the time predictor and the straight flow.

    Parameters
    ----------
    nsgf : nn.Module
        NSGF field ``nsgf(t, x)`` (``t`` of shape ``(bs,)`` in training, 0-d in sampling).
    predictor : nn.Module
        Time predictor ``predictor(x) -> (bs,)`` (for example :class:`~torchcfm_nsgf.networks.TimePredictorMLP`
        or :class:`~torchcfm_nsgf.networks.TimePredictorCNN`).
    straight : nn.Module
        Straight flow ``straight(t, x)`` with ``t`` of shape ``(bs,)``.
    n_steps : int
        ``T`` of the NSGF phase, ``1 .. 5`` (``> 5`` raises ``ValueError``). Paper (CIFAR-10): 5.
    step_size : float
        η of the NSGF phase (paper, CIFAR-10: 0.2).
    sinkhorn : SinkhornOptions, optional
        Sinkhorn settings of the NSGF phase (default ``SinkhornOptions()``: blur 0.1 of the target's scale).
    pool_capacity : int
        Items of the trajectory pool of the NSGF phase.
    refresh_every : int
        A new flow is simulated into the pool every ``refresh_every`` NSGF training batches.
    lr : float
        Adam learning rate of all three networks.
    generator : torch.Generator, optional
        CPU generator for all the trainer's randomness (data rows, times ``t``, pool draws, step indices).
    progress : bool
        tqdm progress bars in the training loops.

    Notes
    -----
    ``source`` and ``target`` of the training methods are either a tensor ``(N, *dim)`` from which rows are
    drawn with ``generator``, or a function ``n -> Tensor (n, *dim)``. Each network has its own Adam
    optimiser. :meth:`save` writes the three networks, the optimisers, the settings, the iteration counters
    the generator state and the NSGF phase's matcher (its trajectory pool and call counter, which decides
    the next refresh) in one atomically written file, so that training resumes exactly.
    """

    def __init__(
        self,
        nsgf: nn.Module,
        predictor: nn.Module,
        straight: nn.Module,
        *,
        n_steps: int = 5,
        step_size: float = 0.2,
        sinkhorn: SinkhornOptions | None = None,
        pool_capacity: int = 100_000,
        refresh_every: int = 5,
        lr: float = 1e-3,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        for name, net in (("nsgf", nsgf), ("predictor", predictor), ("straight", straight)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(net).__name__}")
        _check_phase1_steps(n_steps)
        check_positive(step_size, "step_size")
        if sinkhorn is None:
            sinkhorn = SinkhornOptions()
        elif not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions or None, got {type(sinkhorn).__name__}")
        check_positive(pool_capacity, "pool_capacity", integer=True)
        check_positive(refresh_every, "refresh_every", integer=True)
        check_positive(lr, "lr")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.nets = nn.ModuleDict({"nsgf": nsgf, "predictor": predictor, "straight": straight})
        self.settings = _Settings(
            n_steps=n_steps,
            step_size=float(step_size),
            sinkhorn=sinkhorn,
            pool_capacity=pool_capacity,
            refresh_every=refresh_every,
            lr=float(lr),
        )
        self.generator = generator
        self.progress = progress
        self.cfm = ConditionalFlowMatcher(sigma=0.0)
        self.optimizers = {k: torch.optim.Adam(net.parameters(), lr=lr) for k, net in self.nets.items()}
        self._build_matcher()

    def _build_matcher(self) -> None:
        s = self.settings
        self.matcher = SinkhornFlowMatcher(
            flow_steps=s.n_steps,
            step_size=s.step_size,
            path="grid",
            sinkhorn=s.sinkhorn,
            pool=TrajectoryPool(s.pool_capacity, generator=self.generator),
            refresh_every=s.refresh_every,
            generator=self.generator,
        )

    @property
    def n_steps(self) -> int:
        """``T``, the NSGF steps of phase 1."""
        return self.settings.n_steps

    @property
    def iterations(self) -> dict[str, int]:
        """Optimiser steps taken so far per network."""
        return dict(self.settings.iterations)

    # ------------------------------------------------------------------ data
    def _draw(self, data: Tensor | Sampler, n: int, name: str) -> Tensor:
        if isinstance(data, Tensor):
            check_cloud(data, name)
            idx = torch.randint(data.shape[0], (n,), generator=self.generator).to(data.device)
            return data[idx]
        if callable(data):
            batch = data(n)
            if not isinstance(batch, Tensor) or batch.dim() < 2 or batch.shape[0] != n:
                shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(f"{name}({n}) must return a tensor of shape ({n}, *dim), got {shape}")
            return check_cloud(batch, f"{name}({n})")
        raise TypeError(
            f"{name} must be a tensor (N, *dim) or a function n -> tensor, got {type(data).__name__}"
        )

    def _pair(self, source: Tensor | Sampler, target: Tensor | Sampler, n: int) -> tuple[Tensor, Tensor]:
        """A source and a target batch ``(n, *dim)``, on the source's device and dtype."""
        x0 = self._draw(source, n, "source")
        x1 = self._draw(target, n, "target")
        check_same_features(x0, x1, "source", "target")
        shape = tuple(x0.shape[1:])
        if self.settings.feature_shape is None:
            self.settings.feature_shape = shape
        elif shape != self.settings.feature_shape:
            raise ValueError(
                f"source and target have feature shape {shape}, but this model was trained on "
                f"{self.settings.feature_shape}"
            )
        return x0, x1.to(device=x0.device, dtype=x0.dtype)

    def _loop(self, key: str, n_iters: int, batch_size: int, loss_fn: Callable[[int], Tensor]) -> list[float]:
        check_positive(n_iters, "n_iters", integer=True)
        check_positive(batch_size, "batch_size", integer=True)
        net, opt = self.nets[key], self.optimizers[key]
        net.train()
        losses: list[float] = []
        bar = tqdm(range(n_iters), desc=f"NSGF++ {key}", disable=not self.progress, leave=False)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch_size)
            loss.backward()
            opt.step()
            self.settings.iterations[key] += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"the {key} loss became {losses[-1]} at iteration "
                    f"{self.settings.iterations[key]}: lower lr"
                )
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        return losses

    def _uniform_t(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self.generator).to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ training
    def train_nsgf(
        self, source: Tensor | Sampler, target: Tensor | Sampler, n_iters: int, batch_size: int = 256
    ) -> list[float]:
        r"""Train :math:`v_\theta` on the pool of short simulated Sinkhorn flows (Algorithm 1, ``T`` steps).

        Loss: :math:`\lVert v_\theta(t, x_t) - u_t \rVert^2` averaged over the batch. Returns the losses.
        """

        def loss(n: int) -> Tensor:
            x0, x1 = self._pair(source, target, n)
            t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
            return torch.mean((self.nets["nsgf"](t, xt) - ut) ** 2)

        return self._loop("nsgf", n_iters, batch_size, loss)

    def train_predictor(
        self, source: Tensor | Sampler, target: Tensor | Sampler, n_iters: int, batch_size: int = 256
    ) -> list[float]:
        r"""Train :math:`t_\phi` to regress ``t`` from :math:`X_t = (1 - t) X_0 + t X_1` (MSE). Returns losses.

        The straight interpolation comes from torchcfm's ``ConditionalFlowMatcher(sigma=0)`` with ``t`` drawn
        from the trainer's generator.
        """

        def loss(n: int) -> Tensor:
            x0, x1 = self._pair(source, target, n)
            t, xt, _ = self.cfm.sample_location_and_conditional_flow(x0, x1, t=self._uniform_t(n, x0))
            tau = self.nets["predictor"](xt)
            if not isinstance(tau, Tensor) or tau.shape not in ((n,), (n, 1)):
                shape = tuple(tau.shape) if isinstance(tau, Tensor) else type(tau).__name__
                raise ValueError(f"predictor(x) must return shape ({n},) or ({n}, 1), got {shape}")
            return torch.mean((tau.reshape(n) - t) ** 2)

        return self._loop("predictor", n_iters, batch_size, loss)

    def train_straight(
        self, source: Tensor | Sampler, target: Tensor | Sampler, n_iters: int, batch_size: int = 256
    ) -> list[float]:
        r"""Train :math:`u_\delta` by flow matching on straight paths (``ConditionalFlowMatcher(sigma=0)``).

        Loss: :math:`\lVert u_\delta(t, x_t) - (X_1 - X_0) \rVert^2`. Returns the losses.
        """

        def loss(n: int) -> Tensor:
            x0, x1 = self._pair(source, target, n)
            t, xt, ut = self.cfm.sample_location_and_conditional_flow(x0, x1, t=self._uniform_t(n, x0))
            return torch.mean((self.nets["straight"](t, xt) - ut) ** 2)

        return self._loop("straight", n_iters, batch_size, loss)

    def fit(
        self,
        source: Tensor | Sampler,
        target: Tensor | Sampler,
        *,
        nsgf_iters: int,
        predictor_iters: int,
        straight_iters: int,
        batch_size: int = 256,
    ) -> dict[str, list[float]]:
        """Train the three parts in turn (NSGF field, predictor, straight flow); returns their losses."""
        return {
            "nsgf": self.train_nsgf(source, target, nsgf_iters, batch_size),
            "predictor": self.train_predictor(source, target, predictor_iters, batch_size),
            "straight": self.train_straight(source, target, straight_iters, batch_size),
        }

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        x0: Tensor,
        *,
        solver: str = "euler",
        straight_steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        return_trajectory: bool = False,
    ) -> SampleResult:
        """:func:`nsgfpp_sample` with this model's networks (in eval mode) and ``T``; ``x0`` is ``(bs, *dim)``."""
        x0 = check_cloud(x0, "x0")
        shape = self.settings.feature_shape
        if shape is not None and tuple(x0.shape[1:]) != shape:
            raise ValueError(
                f"x0 has feature shape {tuple(x0.shape[1:])}, but this model was trained on {shape}"
            )
        modes = {k: net.training for k, net in self.nets.items()}
        self.nets.eval()
        try:
            return nsgfpp_sample(
                self.nets["nsgf"],
                self.nets["predictor"],
                self.nets["straight"],
                x0,
                n_steps=self.settings.n_steps,
                solver=solver,
                straight_steps=straight_steps,
                atol=atol,
                rtol=rtol,
                return_trajectory=return_trajectory,
                progress=self.progress,
            )
        finally:
            for k, net in self.nets.items():
                net.train(modes[k])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, settings, iteration counters, generator state and the NSGF matcher (pool)."""
        s = self.settings
        return {
            "format": _FORMAT,
            "settings": {
                "n_steps": s.n_steps,
                "step_size": s.step_size,
                "sinkhorn": asdict(s.sinkhorn),
                "pool_capacity": s.pool_capacity,
                "refresh_every": s.refresh_every,
                "lr": s.lr,
                "feature_shape": None if s.feature_shape is None else list(s.feature_shape),
                "iterations": dict(s.iterations),
            },
            "nets": {k: net.state_dict() for k, net in self.nets.items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "generator_state": None if self.generator is None else self.generator.get_state(),
            "matcher": self.matcher.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into these networks (same architectures); settings come from ``state``."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"state is not an NSGF++ checkpoint (expected format {_FORMAT!r})")
        missing = [k for k in ("settings", "nets", "optimizers") if k not in state]
        if missing:
            raise ValueError(f"state misses the entries {missing}")
        st = dict(state["settings"])
        _check_phase1_steps(st["n_steps"], "settings['n_steps']")
        shape = st.pop("feature_shape")
        if "sinkhorn" in st:
            st["sinkhorn"] = SinkhornOptions(**st["sinkhorn"])
        else:  # checkpoints written before SinkhornOptions: an absolute blur
            st["sinkhorn"] = SinkhornOptions(
                blur=st.pop("blur"), relative_blur=False, scaling=st.pop("scaling"), max_iter=5000
            )
        iterations = st.pop("iterations")
        for k, net in self.nets.items():
            try:
                net.load_state_dict(state["nets"][k])
            except (RuntimeError, KeyError) as err:
                raise ValueError(
                    f"the checkpoint's {k} network does not fit this model's {k}: {err}"
                ) from err
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.settings = _Settings(
            **st, feature_shape=None if shape is None else tuple(shape), iterations=dict(iterations)
        )
        self._build_matcher()
        if state.get("matcher") is not None:  # absent in checkpoints written before the pool was saved
            self.matcher.load_state_dict(state["matcher"])
        if state.get("generator_state") is not None and self.generator is not None:
            self.generator.set_state(state["generator_state"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
        atomic_save(self.state_dict(), os.fspath(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a file written by :meth:`save` (``torch.load(weights_only=True)``, mapped to the CPU)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"checkpoint {path!r} is corrupt or not a torch file: {err}") from err
        self.load_state_dict(state)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"{type(self).__name__}(n_steps={s.n_steps}, step_size={s.step_size:g}, sinkhorn={s.sinkhorn}, "
            f"iterations={s.iterations})"
        )
