r"""NSGF++ sampling (Algorithm 3): ``T`` NSGF Euler steps, the phase-transition time, the straight flow to 1.

Phase 1 takes ``T`` explicit-Euler steps of :math:`v_\theta` on the matcher's normalised clock (``dt = 1/T``);
then phase 2 integrates :math:`u_\delta` from a start time to 1: :math:`\tau = t_\phi(X_T)` per sample (variants
with a predictor) or 0 (no predictor call). torchdyn integrates every sample over one shared time span, so
phase 2 is solved on a shared clock :math:`s \in [0, 1]` through the change of variable

.. math::
    t(s) = \tau + s (1 - \tau), \qquad
    \frac{dx}{ds} = (1 - \tau)\, u_\delta\big(\tau + s (1 - \tau),\, x\big),

which is one torchdyn solve for the whole batch (any solver: a step budget for fixed-step ones, a
tolerance for adaptive ones). A sample with :math:`\tau = 1` does not move; with :math:`\tau = 0` phase 2 is
plain straight-flow sampling over [0, 1].

Predictor range: the shipped predictors end in a sigmoid. A user predictor whose output leaves [0, 1] is
**clamped** to [0, 1] with a ``RuntimeWarning`` (per call, counting the offending samples); a NaN output
raises ``ValueError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._deprecation import renamed_keywords
from .._validation import check_cloud
from ..sampling import NFECounter, SampleResult, check_step_budget, default_steps, odeint_sample
from .options import check_flow_steps, option_default

__all__ = ["STRAIGHT_STEPS", "nsgfpp_sample", "predict_time", "straight_flow_from"]

#: Phase-2 steps of a fixed-step solver when none are given.
STRAIGHT_STEPS = 5


def _check_callable(f: object, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name} must be callable, got {type(f).__name__}")


class _CallCounter(nn.Module):
    """Count the calls of a one-argument network (the predictor), like :class:`NFECounter` for fields."""

    def __init__(self, net: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, x: Tensor, **extra_args: Any) -> Tensor:
        self.nfe += 1
        return self.net(x, **extra_args)


# ---------------------------------------------------------------------------------------------- predictor
def predict_time(
    predictor: Callable[..., Tensor], x: Tensor, extra_args: Mapping[str, Any] | None = None
) -> Tensor:
    r"""Phase-transition times :math:`\tau = t_\phi(x)`, validated and clamped to [0, 1].

    Parameters
    ----------
    predictor : callable
        ``predictor(x)`` returning shape ``(bs,)`` or ``(bs, 1)``.
    x : Tensor, shape (bs, *dim)
    extra_args : dict, optional
        Keyword arguments of the predictor, e.g. ``{"y": labels}``.

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
    tau = predictor(x, **(extra_args or {}))
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
    extra_args: Mapping[str, Any] | None = None,
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
    extra_args : dict, optional
        Keyword arguments passed to ``straight`` on every call (class labels ``{"y": y}``).

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``nfe == {"straight": calls}``, counted; if asked, ``trajectory``
        ``(n_s, bs, *dim)`` at the clock values ``times`` ``(n_s,)`` = ``s`` (sample ``i`` is at time
        ``tau_i + s (1 - tau_i)``).
    """
    _check_callable(straight, "straight")
    x = check_cloud(x, "x")
    check_step_budget(solver, n_steps, "straight_steps")
    if not isinstance(tau, Tensor) or tau.shape != (x.shape[0],):
        shape = tuple(tau.shape) if isinstance(tau, Tensor) else type(tau).__name__
        raise ValueError(f"tau must be a tensor of shape ({x.shape[0]},) to match x, got {shape}")
    tau = tau.to(device=x.device, dtype=x.dtype)
    if not bool(((tau >= 0) & (tau <= 1)).all()):
        raise ValueError("tau must lie in [0, 1] (and not be NaN)")
    counter = NFECounter(straight, extra_args)
    g = _SharedClockField(counter, tau, x.dim() - 1)
    out = odeint_sample(
        g, x, solver=solver, n_steps=n_steps, atol=atol, rtol=rtol, return_trajectory=return_trajectory
    )
    return SampleResult(
        samples=out.samples, nfe={"straight": counter.nfe}, trajectory=out.trajectory, times=out.times
    )


# ---------------------------------------------------------------------------------------------- sampler
@renamed_keywords(n_steps="flow_steps")
def nsgfpp_sample(
    nsgf: Callable[..., Tensor],
    predictor: Callable[[Tensor], Tensor] | None,
    straight: Callable[..., Tensor],
    x0: Tensor,
    *,
    flow_steps: int | None = None,
    solver: str = "euler",
    straight_steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    progress: bool = False,
    extra_args: Mapping[str, Any] | None = None,
) -> SampleResult:
    r"""NSGF++ sampling (Algorithm 3): ``T`` NSGF Euler steps, :math:`\tau = t_\phi(X_T)`, straight flow to 1.

    Without a predictor (variant ``"ot"``) phase 2 starts every sample at :math:`\tau = 0`: the straight flow
    is integrated over its whole clock [0, 1] from :math:`X_T`, and the predictor's NFE is 0.

    Parameters
    ----------
    nsgf : callable
        NSGF field ``nsgf(t, x)`` on the matcher's normalised clock (``t`` a 0-d tensor).
    predictor : callable or None
        ``predictor(x) -> (bs,)``; see :func:`predict_time` for the range convention. None: :math:`\tau = 0`.
    straight : callable
        Straight flow ``straight(t, x)`` with per-sample ``t`` of shape ``(bs,)``.
    x0 : Tensor, shape (bs, *dim)
        Source samples.
    flow_steps : int, optional
        ``T``, the phase-1 Euler steps (``1 .. 5``; ``> 5`` raises ``ValueError``). Default: the trainer's,
        ``NSGFPlusPlusOptions().flow_steps`` (2), so that a call without it integrates what a model trained
        at the defaults learned. Formerly ``n_steps`` (still accepted, with a ``DeprecationWarning``).
    solver, straight_steps, atol, rtol
        Phase-2 solver (see :func:`straight_flow_from`); ``straight_steps`` defaults to
        :data:`STRAIGHT_STEPS` for fixed-step solvers.
    return_trajectory : bool
        Also return both phases' states.
    progress : bool
        Progress bar over the phase-1 steps.
    extra_args : dict, optional
        Keyword arguments passed to all three networks on every call, e.g. class labels ``{"y": y}``:
        ``nsgf(t, x, y=y)``, ``predictor(x, y=y)``, ``straight(t, x, y=y)``.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``nfe == {"nsgf": T, "predictor": 1 (0 without one), "straight": n}``,
        counted; ``extras["tau"]`` ``(bs,)``: the phase-2 start times, :math:`t_\phi(X_T)` (clamped to
        [0, 1]) or zeros without a predictor. With ``return_trajectory``: ``trajectory`` ``(T + n_s, bs, *dim)`` holds phase 1,
        :math:`X_0, \dots, X_T` (``trajectory[: T + 1]``, NSGF clock ``k / T``), then phase 2 from
        :math:`X_T` (``trajectory[T:]``) at the shared clock values ``extras["phase2_clock"]`` ``(n_s,)``,
        sample ``i`` at time ``tau[i] + s * (1 - tau[i])``; ``times`` is None (two clocks).
    """
    _check_callable(nsgf, "nsgf")
    if predictor is not None:
        _check_callable(predictor, "predictor")
    _check_callable(straight, "straight")
    x0 = check_cloud(x0, "x0")
    flow_steps = check_flow_steps(option_default("flow_steps") if flow_steps is None else flow_steps)
    straight_steps = default_steps(solver, straight_steps, STRAIGHT_STEPS)
    check_step_budget(solver, straight_steps, "straight_steps")

    phase1 = odeint_sample(
        nsgf,
        x0,
        solver="euler",
        n_steps=flow_steps,
        return_trajectory=return_trajectory,
        progress=progress,
        extra_args=extra_args,
    )
    if predictor is None:
        n_predictor = 0
        tau = torch.zeros(x0.shape[0], dtype=phase1.samples.dtype, device=phase1.samples.device)
    else:
        pred_counter = _CallCounter(predictor)
        with torch.no_grad():
            tau = predict_time(pred_counter, phase1.samples, extra_args)
        n_predictor = pred_counter.nfe
    phase2 = straight_flow_from(
        straight,
        phase1.samples,
        tau,
        solver=solver,
        n_steps=straight_steps,
        atol=atol,
        rtol=rtol,
        return_trajectory=return_trajectory,
        extra_args=extra_args,
    )
    extras = {"tau": tau}
    trajectory = None
    if return_trajectory:
        trajectory = torch.cat([phase1.trajectory, phase2.trajectory[1:]])
        extras["phase2_clock"] = phase2.times
    return SampleResult(
        samples=phase2.samples,
        nfe={"nsgf": phase1.nfe["field"], "predictor": n_predictor, **phase2.nfe},
        trajectory=trajectory,
        extras=extras,
    )
