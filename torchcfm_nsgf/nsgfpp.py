r"""NSGF++ (Zhu et al., 2024, Algorithm 3): a short Sinkhorn flow, then a neural straight flow.

Networks, trained together on the same source :math:`\mu_0` and target :math:`\mu^*`:

* the **NSGF field** :math:`v_\theta(t, x)`, regressed on a short simulated Sinkhorn flow (``T <= 5`` steps of
  a large step size η) by :class:`~torchcfm_nsgf.SinkhornFlowMatcher` with a trajectory pool;
* the **neural straight flow** :math:`u_\delta(t, x)`, trained by flow matching on straight segments
  (torchcfm's ``ConditionalFlowMatcher(sigma=0)``). Where the segments start is the variant (``phase2``):

  - ``"paper"`` (Algorithm 3): noise-to-data interpolations :math:`X_t = (1 - t) X_0 + t X_1` with
    :math:`X_0 \sim \mu_0`, :math:`X_1 \sim \mu^*`, target :math:`X_1 - X_0`; a third network, the
    **phase-transition time predictor** :math:`t_\phi(x) \in [0, 1]`, regresses ``t`` from :math:`X_t` and
    says where on such a path the NSGF output sits;
  - ``"ot"`` (the first author's precursor of NSGF++, ``NSGF.md`` §3): the straight flow is trained on the
    distribution it will see. Noise batches are moved by the NSGF phase's simulated Sinkhorn flow
    (:meth:`SinkhornFlowMatcher.simulate`, ``T`` steps) into a bounded buffer of end points :math:`X_T`; each
    step draws a batch of them, pairs it with the data batch by **exact minibatch OT** (torchcfm's
    ``OTPlanSampler("exact")``), and the straight flow learns the segments :math:`X_T \to X_1` on its own
    clock :math:`s \in [0, 1]`. No predictor.
  - ``"ot-source"``: the segments start at the phase-1 end points of the call's *own* source batch
    (simulated towards the call's data batch, or ``T`` steps of the NSGF network) and end at the data point
    that the **exact minibatch OT plan between the sources and the data** (OT-CFM's coupling) pairs with
    their source: :math:`X_T(x_{0,i}) \to x_{1,\pi(i)}`. No buffer and no predictor; ``T`` Sinkhorn
    solves or ``T`` network forward passes per call. Where ``"ot"`` pairs end points of earlier flows with
    a batch they never flowed to (on MNIST its segments are as long as the gap between two digits,
    BENCHMARKS.md §5a), this keeps the coupling the noise came with.
  - ``"ot-predictor"``: the ``"ot"`` segments, plus a time predictor trained on them (:math:`t_\phi(x_s)
    \approx s` on :math:`x_s = (1 - s) X_T + s X_1`); sampling starts phase 2 at :math:`\tau = t_\phi(\hat X_T)`
    of the network's end point, which helps where the NSGF network stops short of (or beyond) the simulated
    :math:`X_T`.

  Where the end points come from is the option ``endpoints``. ``"simulated"``: from simulating the matcher's
  flow, not from the NSGF network; ``"network"``: from ``T`` Euler steps of the NSGF network being trained
  (:meth:`NSGFPlusPlusObjective.network_endpoints`, refreshed like the simulated ones), which is exactly the
  distribution phase 2 starts from at sampling: where the network cannot reproduce the flow (images: a few
  large Sinkhorn steps map each noise sample to a near-copy of one batch image, which a network regressing
  the flow can only average into a blurred digit), phase 2 then learns to carry the network's output to the
  data instead of starting off its training distribution. For ``"simulated"``: the simulation is what
  the network is trained to reproduce (Euler with ``T`` steps of the served velocity lands on :math:`X_T`
  exactly), needs no trained network (all parts train from the first step, in one loop) and carries no
  network error into phase 2's training data. A flow costs ``T`` Sinkhorn solves of the batch, so, like
  the matcher's pool, the buffer is refreshed with a new flow only every ``refresh_every`` steps. The other side of
  the choice: at sampling, phase 2 starts from the *network's* :math:`X_T`, so the straight flow corrects the
  NSGF field's error only where that error stays within what the simulated end points cover; and when the
  simulated flow has already reached the data, the segments :math:`X_T \to X_1` are short and phase 2 does
  little.

:class:`NSGFPlusPlusObjective` is the one training interface: ``losses(nets, x0, x1) -> {name: loss}`` (one
loss per network) and ``sample(nets, x0, ...) -> SampleResult``. :class:`NSGFPlusPlus` (vectors, 2D) and the
image method (``torchcfm_nsgf.images``) both train through it.

Sampling (:func:`nsgfpp_sample`): phase 1 takes ``T`` explicit-Euler steps of :math:`v_\theta` on the
matcher's normalised clock (``dt = 1/T``); then phase 2 integrates :math:`u_\delta` from a start time to 1:
:math:`\tau = t_\phi(X_T)` per sample (``"paper"``, ``"ot-predictor"``) or 0 (``"ot"``, ``"ot-source"``, no
predictor call). torchdyn integrates every sample over one shared time span, so phase 2 is solved on a
shared clock :math:`s \in [0, 1]` through the change of variable

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
* NFE: ``{"nsgf": T, "predictor": 1 or 0, "straight": n}``, counted from real calls (a classifier-free-guided
  field counts its two network calls per evaluation).
* Class conditioning: ``losses(nets, x0, x1, y1)`` trains every network on the labels of ``x1`` (the NSGF field on
  guided targets, :meth:`~torchcfm_nsgf.SinkhornFlowMatcher.guided_sample_location_and_conditional_flow`; the
  ``"ot"`` variant's end points carry labels and are paired with data of their own class), and
  ``sample(nets, x0, y=labels)`` passes the labels to every network: ``nsgf(t, x, y=y)``,
  ``predictor(x, y=y)``, ``straight(t, x, y=y)``.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from torchcfm.optimal_transport import OTPlanSampler
from tqdm.auto import tqdm

from ._io import atomic_save
from ._validation import check_cloud, check_labels, check_non_negative, check_positive, check_same_features
from .guidance import CFGField, drop_labels
from .matcher import SinkhornFlowMatcher
from .pool import TrajectoryPool
from .sampling import NFECounter, SampleResult, odeint_sample, solver_spec
from .sinkhorn import SinkhornOptions

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_PHASE2",
    "ENDPOINT_SOURCES",
    "MAX_PHASE1_STEPS",
    "PHASE2_VARIANTS",
    "PREDICTOR_VARIANTS",
    "NSGFPlusPlus",
    "NSGFPlusPlusObjective",
    "nsgfpp_sample",
    "predict_time",
    "straight_flow_from",
]

#: Largest number of NSGF steps of phase 1 (paper: ``T <= 5``).
MAX_PHASE1_STEPS = 5
#: Where the straight flow's training segments start: noise (``"paper"``) or the phase-1 end points (the others).
PHASE2_VARIANTS = ("paper", "ot", "ot-source", "ot-predictor")
#: The variants that start phase 2 at a predicted time (a third network).
PREDICTOR_VARIANTS = ("paper", "ot-predictor")
#: Where the ``"ot"`` variants' end points :math:`X_T` come from: the simulated Sinkhorn flow, or the NSGF network.
ENDPOINT_SOURCES = ("simulated", "network")
#: The end-point source used when none is given: on the 2D tasks the simulated end points gave the lower W2
#: (BENCHMARKS.md §4); on images the network's are far better (§5), so the image settings default to those.
DEFAULT_ENDPOINTS = "simulated"
#: The variant used when none is given.
DEFAULT_PHASE2 = "ot"
Phase2 = Literal["paper", "ot", "ot-source", "ot-predictor"]

_FORMAT = "torchcfm_nsgf.nsgfpp/2"
_FORMAT_V1 = "torchcfm_nsgf.nsgfpp/1"  # three separately trained networks, variant "paper"
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
    _check_solver(solver, n_steps)
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
def nsgfpp_sample(
    nsgf: Callable[..., Tensor],
    predictor: Callable[[Tensor], Tensor] | None,
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
    n_steps : int
        ``T``, the phase-1 Euler steps (``1 .. 5``; ``> 5`` raises ``ValueError``).
    solver, straight_steps, atol, rtol
        Phase-2 solver (see :func:`straight_flow_from`); ``straight_steps`` defaults to 5 for fixed-step
        solvers.
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
    n_steps = _check_phase1_steps(n_steps)
    if straight_steps is None and not solver_spec(solver).adaptive:
        straight_steps = 5
    _check_solver(solver, straight_steps)

    phase1 = odeint_sample(
        nsgf,
        x0,
        solver="euler",
        n_steps=n_steps,
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


# ---------------------------------------------------------------------------------------------- objective
def _check_phase2(phase2: object, name: str = "phase2") -> str:
    if phase2 not in PHASE2_VARIANTS:
        raise ValueError(f"{name} must be one of {list(PHASE2_VARIANTS)}, got {phase2!r}")
    return phase2


def _mse(pred: object, target: Tensor, name: str) -> Tensor:
    if not isinstance(pred, Tensor) or pred.shape != target.shape:
        shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"{name}(t, x) must return x's shape {tuple(target.shape)}, got {shape}")
    return torch.mean((pred - target) ** 2)


class NSGFPlusPlusObjective:
    r"""The NSGF++ training interface: one loss per network, and the matching two-phase sampler.

    A training loop calls :meth:`losses` on a source batch and a data batch and optimises the sum (the losses
    act on disjoint parameters, so one Adam on the sum equals one Adam per network); :meth:`sample` generates.

    Parameters
    ----------
    matcher : SinkhornFlowMatcher
        The NSGF phase: ``flow_steps`` (``T``, at most 5), ``step_size`` (η), Sinkhorn options and pool. Its
        targets train the NSGF field; in the ``"ot"`` variant its :meth:`~SinkhornFlowMatcher.simulate` also
        gives the phase-1 end points.
    phase2 : {"paper", "ot", "ot-source", "ot-predictor"}
        Where the straight flow's training segments start (module docstring): noise, with a time predictor
        (``"paper"``), or the phase-1 end points paired with the data by exact minibatch OT (``"ot"``: end
        points from the buffer, OT between them and the data; ``"ot-source"``: the end points of the call's
        own sources, OT between the sources and the data; ``"ot-predictor"``: the ``"ot"`` segments with a
        time predictor).
    generator : torch.Generator, optional
        CPU generator for the straight-flow times, the end-point draws and the OT pair order; None draws
        from torch's global RNG.
    refresh_every : int, optional
        ``"ot"`` only: a newly simulated flow of the call's ``(x0, x1)`` is added to the end-point buffer on
        the first call and every ``refresh_every`` calls (and whenever the buffer holds fewer end points
        than the batch). Default: the matcher's ``refresh_every``.
    endpoints : {"simulated", "network"}
        The ``"ot"`` variants' end points: the matcher's simulated flow (no network call), or ``T`` Euler steps
        of ``nets["nsgf"]`` as it trains (:meth:`network_endpoints`; ``T`` forward passes per refresh).
    endpoint_capacity : int, optional
        ``"ot"`` only: the most end points the buffer keeps (FIFO: a new flow's end points replace the
        oldest). Default: 16 batches, fixed at the first call. Must be at least the batch size.
    label_dropout : float
        Classifier-free guidance: in class-conditional training, the probability that the label given to the
        NSGF field and the straight flow is replaced by ``null_label`` (drawn with ``generator``). The labels
        that choose the targets are never dropped, and the predictor always gets the true label.
    null_label : int, optional
        The "no class" label (``K`` for ``K`` classes; the networks then have ``K + 1``); required with
        ``label_dropout > 0`` and for :meth:`sample` with a ``guidance_scale``.
    phase1_batch_fraction : float
        In ``(0, 1]``: the share of each call's NSGF targets the NSGF field's loss uses (the first
        ``max(1, round(fraction * n))`` of the ``n`` drawn, a random subset); the straight flow uses the
        whole batch. Phase 1 asks the field for ``T`` velocities only, and a smaller share leaves more of a
        step's compute to the straight flow (1.0: the whole batch).

    Attributes
    ----------
    net_names : tuple of str
        The networks :meth:`losses` and :meth:`sample` expect in ``nets``: ``("nsgf", "predictor",
        "straight")`` or ``("nsgf", "straight")``.
    n_calls : int
        :meth:`phase1_endpoints` calls so far (decides the next refresh).
    n_flows : int
        Phase-1 flows simulated into the end-point buffer so far.

    Notes
    -----
    The ``"ot"`` variant amortises phase 1 like the matcher's pool: simulating :math:`X_T` costs ``T``
    Sinkhorn solves of the batch, so each call draws its end points uniformly without replacement from a
    bounded buffer of simulated end points, which a new flow refreshes every ``refresh_every`` calls.
    The buffer, its counters and the generator state are part of :meth:`state_dict`.
    """

    def __init__(
        self,
        matcher: SinkhornFlowMatcher,
        *,
        phase2: Phase2 = DEFAULT_PHASE2,
        generator: torch.Generator | None = None,
        refresh_every: int | None = None,
        endpoint_capacity: int | None = None,
        label_dropout: float = 0.0,
        null_label: int | None = None,
        endpoints: str = DEFAULT_ENDPOINTS,
        phase1_batch_fraction: float = 1.0,
    ) -> None:
        if not isinstance(matcher, SinkhornFlowMatcher):
            raise TypeError(f"matcher must be a SinkhornFlowMatcher, got {type(matcher).__name__}")
        _check_phase1_steps(matcher.flow_steps, "matcher.flow_steps")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if refresh_every is not None:
            check_positive(refresh_every, "refresh_every", integer=True)
        if endpoint_capacity is not None:
            check_positive(endpoint_capacity, "endpoint_capacity", integer=True)
        label_dropout = check_non_negative(label_dropout, "label_dropout")
        if label_dropout > 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        if label_dropout > 0 and null_label is None:
            raise ValueError("null_label is required with label_dropout > 0 (the extra 'no class' label)")
        if endpoints not in ENDPOINT_SOURCES:
            raise ValueError(f"endpoints must be one of {list(ENDPOINT_SOURCES)}, got {endpoints!r}")
        check_positive(phase1_batch_fraction, "phase1_batch_fraction")
        if phase1_batch_fraction > 1:
            raise ValueError(f"phase1_batch_fraction must lie in (0, 1], got {phase1_batch_fraction}")
        self.phase1_batch_fraction = float(phase1_batch_fraction)
        self.endpoints = endpoints
        self.label_dropout = label_dropout
        self.null_label = null_label
        self.matcher = matcher
        self.phase2 = _check_phase2(phase2)
        self.generator = generator
        self.refresh_every: int = matcher.refresh_every if refresh_every is None else refresh_every
        self.endpoint_capacity: int | None = endpoint_capacity
        self.n_calls = 0
        self.n_flows = 0
        self._endpoints: Tensor | None = None
        self._endpoint_labels: Tensor | None = None
        self.cfm = ConditionalFlowMatcher(sigma=0.0)
        self.ot_sampler = OTPlanSampler(method="exact") if self.phase2 != "paper" else None
        self.net_names: tuple[str, ...] = (
            ("nsgf", "predictor", "straight") if self.uses_predictor else ("nsgf", "straight")
        )

    @property
    def n_steps(self) -> int:
        """``T``, the NSGF steps of phase 1."""
        return self.matcher.flow_steps

    @property
    def uses_predictor(self) -> bool:
        """Whether phase 2 starts at a predicted time (variants ``"paper"`` and ``"ot-predictor"``)."""
        return self.phase2 in PREDICTOR_VARIANTS

    def _check_nets(self, nets: Mapping[str, Any]) -> None:
        missing = [k for k in self.net_names if k not in nets]
        if missing:
            raise ValueError(
                f"nets misses {missing} for the {self.phase2!r} variant (needs {list(self.net_names)})"
            )

    def _uniform(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self.generator).to(device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ phase-2 training data
    @property
    def n_endpoints(self) -> int:
        """End points held in the ``"ot"`` variant's buffer."""
        return 0 if self._endpoints is None else self._endpoints.shape[0]

    def simulate_endpoints(self, x0: Tensor, x1: Tensor) -> Tensor:
        r""":math:`X_T` of the matcher's simulated Sinkhorn flow of ``x0`` (n, *dim) towards ``x1`` (m, *dim).

        Returns shape ``(n, *dim)``, detached. ``T`` Sinkhorn solves; no network is called; the buffer is
        not touched.
        """
        return self.matcher.simulate(x0, x1).xs[-1].detach()

    @torch.no_grad()
    def network_endpoints(self, nsgf: Any, x0: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\hat X_T` of the NSGF network ``nsgf(t, x)``: ``T`` Euler steps from ``x0`` on the matcher's
        normalised clock, exactly phase 1 of :meth:`sample` (labels ``y`` passed as ``y=``). Detached; the
        network's train/eval mode is kept."""
        extra = None if y is None else {"y": y}
        return odeint_sample(nsgf, x0, solver="euler", n_steps=self.n_steps, extra_args=extra).samples

    def _add_endpoints(self, xT: Tensor, labels: Tensor | None = None) -> None:
        if self.endpoint_capacity is None:
            self.endpoint_capacity = 16 * xT.shape[0]
        if self._endpoints is not None:
            if self._endpoints.shape[1:] != xT.shape[1:]:
                raise ValueError(
                    f"x0 has feature shape {tuple(xT.shape[1:])}, but the end-point buffer holds "
                    f"{tuple(self._endpoints.shape[1:])}"
                )
            xT = torch.cat([self._endpoints.to(device=xT.device, dtype=xT.dtype), xT])
            if labels is not None:
                labels = torch.cat([self._endpoint_labels.to(labels.device), labels])
        self._endpoints = xT[-self.endpoint_capacity :]
        self._endpoint_labels = None if labels is None else labels[-self.endpoint_capacity :]
        self.n_flows += 1

    def _check_buffer_labels(self, guided: bool) -> None:
        if self._endpoints is not None and (self._endpoint_labels is not None) != guided:
            raise ValueError(
                "y1 must be given: the end-point buffer holds class-labelled end points"
                if self._endpoint_labels is not None
                else "y1 must be None: the end-point buffer holds end points without class labels"
            )

    def _short_classes(self, y1: Tensor) -> bool:
        """Whether the buffer holds fewer end points of some class than ``y1`` asks for."""
        if self._endpoint_labels is None:
            return True
        classes, counts = torch.unique(y1, return_counts=True)
        held = self._endpoint_labels.to(y1.device)
        return any(int((held == c).sum()) < k for c, k in zip(classes, counts.tolist(), strict=True))

    def guided_phase1_endpoints(
        self, x0: Tensor, x1: Tensor, y1: Tensor, nets: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Class-conditional :meth:`phase1_endpoints`: for data labels ``y1`` (m,), ``m`` end points with exactly
        the class counts of ``y1``, drawn without replacement within each class from the labelled buffer.

        The buffer is refreshed with a guided flow of ``(x0, x1, y1)``
        (:meth:`SinkhornFlowMatcher.simulate_guided`) on the first call, every ``refresh_every`` calls, and
        whenever it holds too few end points of a class of ``y1``.

        Returns
        -------
        xT : Tensor, shape (m, *dim)
            End points grouped by class (in increasing class order), detached, on ``x0``'s device.
        labels : Tensor, shape (m,)
            Their classes (``y1``'s dtype).
        """
        y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        m = x1.shape[0]
        if self.endpoint_capacity is not None and self.endpoint_capacity < max(m, x0.shape[0]):
            raise ValueError(
                f"endpoint_capacity ({self.endpoint_capacity}) must be at least the batch size "
                f"({max(m, x0.shape[0])})"
            )
        self._check_buffer_labels(True)
        if self.n_calls % self.refresh_every == 0 or self._short_classes(y1):
            if self.endpoints == "network":
                if nets is None:
                    raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
                if x0.shape[0] != m:
                    raise ValueError("x0 and x1 must have the same batch size with endpoints='network'")
                labels = y1.to(x0.device)  # source row i takes class y1[i], as in the guided flow
                self._add_endpoints(self.network_endpoints(nets["nsgf"], x0, labels), labels)
            else:
                traj, labels = self.matcher.simulate_guided(x0, x1, y1)
                self._add_endpoints(traj.xs[-1].detach(), labels)
        if self._short_classes(y1):
            raise ValueError(
                "y1 asks for more end points of a class than the buffer holds after a new flow: give x0 and x1 "
                "the same batch size (the guided flow then has exactly the class counts of y1)"
            )
        self.n_calls += 1
        held = self._endpoint_labels.to(y1.device)
        classes, counts = torch.unique(y1, return_counts=True)
        parts = []
        for c, k in zip(classes, counts.tolist(), strict=True):
            members = torch.nonzero(held == c).flatten()
            parts.append(
                members[torch.randperm(len(members), generator=self.generator)[:k].to(members.device)]
            )
        pick = torch.cat(parts)
        xT = self._endpoints[pick.to(self._endpoints.device)].to(device=x0.device)
        return xT, held[pick].to(dtype=y1.dtype)

    def phase1_endpoints(self, x0: Tensor, x1: Tensor, nets: Mapping[str, Any] | None = None) -> Tensor:
        r"""``n`` phase-1 end points :math:`X_T` for a source batch ``x0`` (n, *dim) and data ``x1`` (m, *dim).

        Drawn uniformly without replacement (through ``generator``) from the end-point buffer, after
        adding a newly simulated flow of ``(x0, x1)`` (:meth:`simulate_endpoints`) on the first call, every
        ``refresh_every`` calls, and whenever the buffer holds fewer than ``n`` end points.

        Returns
        -------
        Tensor, shape (n, *dim)
            Detached, on ``x0``'s device and in the dtype of the simulation.

        Raises
        ------
        ValueError
            ``endpoint_capacity`` is smaller than the batch size ``n``, or ``x0`` has another feature
            shape than the buffer.
        """
        n = x0.shape[0]
        if self.endpoint_capacity is not None and self.endpoint_capacity < n:
            raise ValueError(
                f"endpoint_capacity ({self.endpoint_capacity}) must be at least the batch size ({n})"
            )
        self._check_buffer_labels(False)
        if self.n_calls % self.refresh_every == 0 or self.n_endpoints < n:
            if self.endpoints == "network":
                if nets is None:
                    raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
                self._add_endpoints(self.network_endpoints(nets["nsgf"], x0))
            else:
                self._add_endpoints(self.simulate_endpoints(x0, x1))
        self.n_calls += 1
        pick = torch.randperm(self.n_endpoints, generator=self.generator)[:n]
        return self._endpoints[pick.to(self._endpoints.device)].to(device=x0.device)

    def phase2_pairs(
        self, x0: Tensor, x1: Tensor, y1: Tensor | None = None, nets: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Start and end points ``(a, b)``, each ``(n, *dim)``, of the straight flow's training segments, and
        their class labels ``(n,)`` (None without ``y1``).

        ``"paper"``: ``(x0, x1)`` as given (independent noise and data). ``"ot"``: ``n`` phase-1 end points
        :math:`X_T` from the buffer (:meth:`phase1_endpoints`) and the data points ``x1`` paired with them by the
        exact OT plan of the minibatch (torchcfm's ``OTPlanSampler("exact").get_map``, squared Euclidean
        cost). ``"ot-source"``: the end points of this call's ``x0`` (a simulated flow towards ``x1``, or the
        NSGF network in ``nets`` with ``endpoints="network"``), each paired with the data point that the exact
        OT plan between ``x0`` and ``x1`` gives its source. ``n`` pairs are drawn from the plan without
        replacement through ``generator`` (torchcfm's ``sample_plan`` draws with NumPy's global RNG); for
        ``n == m`` the exact plan is a permutation, so every end point is used once.

        With labels ``y1`` of ``x1``: ``"paper"`` labels each segment with its data point's class; the OT
        variants give the end points the class counts of ``y1`` (``"ot"``: drawn from the labelled buffer,
        :meth:`guided_phase1_endpoints`; ``"ot-source"``: source ``i`` takes class ``y1[i]``, as in the guided
        flow, so ``x0`` and ``x1`` must have the same batch size) and solve the exact OT plan within each
        class (a block-diagonal plan), so no segment joins two classes.
        """
        if self.phase2 == "paper":
            return x0, x1, y1
        if self.phase2 == "ot-source":
            labels = self._source_labels(x0, x1, y1)
            xT = self._source_endpoints(x0, x1, labels, nets)
            ends = x1.to(device=xT.device, dtype=xT.dtype)
            i, j = self._ot_pairs(x0.to(device=xT.device, dtype=xT.dtype), ends, labels, y1)
            return xT[i], ends[j], None if labels is None else labels[i]
        if y1 is None:
            xT, labels = self.phase1_endpoints(x0, x1, nets), None
        else:
            xT, labels = self.guided_phase1_endpoints(x0, x1, y1, nets)
        ends = x1.to(device=xT.device, dtype=xT.dtype)
        i, j = self._ot_pairs(xT, ends, labels, y1)
        return xT[i], ends[j], None if labels is None else labels[i]

    def _source_labels(self, x0: Tensor, x1: Tensor, y1: Tensor | None) -> Tensor | None:
        """``"ot-source"``: the class of each source row (``y1`` itself; checked)."""
        if y1 is None:
            return None
        y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"x0 and x1 must have the same batch size for class-conditional phase2='ot-source' (source i "
                f"takes the class y1[i]), got {x0.shape[0]} and {x1.shape[0]}"
            )
        return y1.to(x0.device)

    def _source_endpoints(
        self, x0: Tensor, x1: Tensor, labels: Tensor | None, nets: Mapping[str, Any] | None
    ) -> Tensor:
        """``"ot-source"``: :math:`X_T` of every row of ``x0``, in the rows of ``x0`` (no buffer)."""
        if self.endpoints == "network":
            if nets is None:
                raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
            return self.network_endpoints(nets["nsgf"], x0, labels)
        self.n_flows += 1
        if labels is None:
            return self.simulate_endpoints(x0, x1)
        traj, _ = self.matcher.simulate_guided(x0, x1, labels, y0=labels)
        return traj.xs[-1].detach()

    def _ot_pairs(self, a: Tensor, b: Tensor, la: Tensor | None, lb: Tensor | None) -> tuple[Tensor, Tensor]:
        """Row indices ``(i, j)`` of ``a.shape[0]`` pairs drawn without replacement (through ``generator``) from
        the exact OT plan between ``a`` (n, *dim) and ``b`` (m, *dim); with labels ``la``, ``lb`` the plan is
        solved within each class (block-diagonal)."""
        n, m = a.shape[0], b.shape[0]
        if la is None:
            plan = torch.from_numpy(self.ot_sampler.get_map(a, b)).flatten()
        else:
            lb = lb.to(la.device)
            block = torch.zeros(n, m, dtype=torch.float64)
            for c in la.unique():
                rows = torch.nonzero(la == c).flatten().cpu()
                cols = torch.nonzero(lb == c).flatten().cpu()
                sub = torch.from_numpy(self.ot_sampler.get_map(a[rows], b[cols])).to(torch.float64)
                block[rows[:, None], cols[None, :]] = sub * (len(rows) / n)
            plan = block.flatten()
        pick = torch.multinomial(plan, n, replacement=False, generator=self.generator)
        return (pick // m).to(a.device), (pick % m).to(a.device)

    # ------------------------------------------------------------------ training
    def _net_labels(self, y: Tensor | None) -> Tensor | None:
        """The labels a field is trained on: ``y`` with label dropout (classifier-free guidance)."""
        if y is None or self.label_dropout == 0:
            return y
        return drop_labels(y, self.label_dropout, self.null_label, self.generator)

    @staticmethod
    def _field(net: Any, t: Tensor, x: Tensor, y: Tensor | None) -> Tensor:
        return net(t, x) if y is None else net(t, x, y=y)

    def losses(
        self, nets: Mapping[str, Any], x0: Tensor, x1: Tensor, y1: Tensor | None = None
    ) -> dict[str, Tensor]:
        r"""One scalar loss per network for a source batch ``x0`` (n, *dim) and a data batch ``x1`` (m, *dim).

        * ``"nsgf"``: :math:`\lVert v_\theta(t, x_t) - u_t \rVert^2` on the matcher's targets
          (``sample_location_and_conditional_flow``; Algorithm 1 with the pool);
        * ``"straight"``: :math:`\lVert u_\delta(s, x_s) - (b - a) \rVert^2` with
          :math:`x_s = (1 - s) a + s b`, :math:`s \sim U[0, 1)` and ``(a, b)`` from :meth:`phase2_pairs`
          (torchcfm's ``ConditionalFlowMatcher(sigma=0)``);
        * ``"predictor"`` (:data:`PREDICTOR_VARIANTS` only): :math:`(t_\phi(x_s) - s)^2` on the same
          interpolations.

        Parameters
        ----------
        nets : mapping
            ``nets[name]`` for every name in :attr:`net_names` (a ``ModuleDict``, possibly DDP-wrapped members).
        x0, x1 : Tensor
            Source and data batches.
        y1 : Tensor, shape (m,), optional
            Integer class labels of ``x1``: class-conditional training. Every network gets the class of its
            training item (``nsgf(t, x, y=...)``, ``predictor(x, y=...)``, ``straight(t, x, y=...)``), the
            two fields through label dropout when ``label_dropout > 0``.

        Returns
        -------
        dict[str, Tensor]
            0-d losses keyed by :attr:`net_names`.
        """
        self._check_nets(nets)
        if y1 is None:
            t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
            y_nsgf = None
        else:
            t, xt, ut, _, y_nsgf = self.matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
        if self.phase1_batch_fraction < 1:
            k = max(1, round(self.phase1_batch_fraction * t.shape[0]))
            t, xt, ut = t[:k], xt[:k], ut[:k]
            y_nsgf = None if y_nsgf is None else y_nsgf[:k]
        out = {"nsgf": _mse(self._field(nets["nsgf"], t, xt, self._net_labels(y_nsgf)), ut, "nsgf")}
        a, b, y = self.phase2_pairs(x0, x1, y1, nets)
        b = b.to(device=a.device, dtype=a.dtype)
        s, xs, us = self.cfm.sample_location_and_conditional_flow(a, b, t=self._uniform(a.shape[0], a))
        if self.uses_predictor:
            tau = nets["predictor"](xs) if y is None else nets["predictor"](xs, y=y)
            n = xs.shape[0]
            if not isinstance(tau, Tensor) or tau.shape not in ((n,), (n, 1)):
                shape = tuple(tau.shape) if isinstance(tau, Tensor) else type(tau).__name__
                raise ValueError(f"predictor(x) must return shape ({n},) or ({n}, 1), got {shape}")
            out["predictor"] = torch.mean((tau.reshape(n) - s) ** 2)
        out["straight"] = _mse(self._field(nets["straight"], s, xs, self._net_labels(y)), us, "straight")
        return out

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        nets: Mapping[str, Any],
        x0: Tensor,
        *,
        solver: str = "euler",
        straight_steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        return_trajectory: bool = False,
        progress: bool = False,
        y: Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SampleResult:
        """:func:`nsgfpp_sample` with ``nets`` and this objective's ``T`` (and the predictor for
        :data:`PREDICTOR_VARIANTS`).

        ``y`` (shape ``(bs,)``): class labels passed to every network. ``guidance_scale`` ``w``: the NSGF field
        and the straight flow are classifier-free guided (:class:`~torchcfm_nsgf.guidance.CFGField` with
        :attr:`null_label`); the predictor gets the labels as they are.

        ``nfe`` is ``{"nsgf": T, "predictor": 1 or 0, "straight": n}``, counted from real network calls (a
        guided evaluation is two).
        """
        self._check_nets(nets)
        nsgf, straight = nets["nsgf"], nets["straight"]
        if y is not None:
            y = check_labels(y, x0.shape[0], "y", "x0")
        if guidance_scale is not None:
            if y is None:
                raise ValueError("guidance_scale needs class labels y")
            if self.null_label is None:
                raise ValueError("guidance_scale needs the objective's null_label (a model trained with it)")
            nsgf = CFGField(nsgf, guidance_scale, self.null_label)
            straight = CFGField(straight, guidance_scale, self.null_label)
        return nsgfpp_sample(
            nsgf,
            nets["predictor"] if self.uses_predictor else None,
            straight,
            x0,
            n_steps=self.n_steps,
            solver=solver,
            straight_steps=straight_steps,
            atol=atol,
            rtol=rtol,
            return_trajectory=return_trajectory,
            progress=progress,
            extra_args=None if y is None else {"y": y},
        )

    def phase1_nfe(self) -> int:
        """Network calls before phase 2: ``T`` NSGF steps, plus one predictor call (:data:`PREDICTOR_VARIANTS`)."""
        return self.n_steps + int(self.uses_predictor)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The matcher's resumable state (pool, counters, generator) and, under ``"endpoints"``, the end-point
        buffer, its counters and capacity, and this objective's generator state."""
        state = self.matcher.state_dict()
        state["endpoints"] = {
            "calls": self.n_calls,
            "flows": self.n_flows,
            "capacity": self.endpoint_capacity,
            "items": None if self._endpoints is None else self._endpoints.detach().cpu(),
            "labels": None if self._endpoint_labels is None else self._endpoint_labels.detach().cpu(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (states written before the end-point buffer restore the matcher only)."""
        self.matcher.load_state_dict(state)
        ep = state.get("endpoints")
        if ep is None:
            return
        self.n_calls = int(ep["calls"])
        self.n_flows = int(ep["flows"])
        self.endpoint_capacity = None if ep["capacity"] is None else int(ep["capacity"])
        self._endpoints = ep["items"]
        self._endpoint_labels = ep.get("labels")
        if ep.get("generator") is not None and self.generator is not None:
            self.generator.set_state(ep["generator"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.matcher!r}, phase2={self.phase2!r})"


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class _Settings:
    n_steps: int
    step_size: float
    sinkhorn: SinkhornOptions | None
    pool_capacity: int
    refresh_every: int
    lr: float
    phase2: str = DEFAULT_PHASE2
    endpoints: str = "simulated"
    feature_shape: tuple[int, ...] | None = None
    iterations: int = 0


class NSGFPlusPlus:
    r"""Train and sample NSGF++ on vectors: the networks of :class:`NSGFPlusPlusObjective`, one loop.

    Parameters
    ----------
    nsgf : nn.Module
        NSGF field ``nsgf(t, x)`` (``t`` of shape ``(bs,)`` in training, 0-d in sampling).
    predictor : nn.Module or None
        Time predictor ``predictor(x) -> (bs,)`` (for example :class:`~torchcfm_nsgf.networks.TimePredictorMLP`)
        for the variants in :data:`PREDICTOR_VARIANTS`; must be None for the others, which have none.
    straight : nn.Module
        Straight flow ``straight(t, x)`` with ``t`` of shape ``(bs,)``.
    phase2 : {"paper", "ot", "ot-source", "ot-predictor"}
        The variant (:class:`NSGFPlusPlusObjective`); default :data:`DEFAULT_PHASE2`.
    n_steps : int
        ``T`` of the NSGF phase, ``1 .. 5`` (``> 5`` raises ``ValueError``). Paper (CIFAR-10): 5.
    step_size : float
        η of the NSGF phase (paper, CIFAR-10: 0.2).
    sinkhorn : SinkhornOptions, optional
        Sinkhorn settings of the NSGF phase. Default: the matcher's (:class:`SinkhornFlowMatcher` with
        ``sinkhorn=None``: blur 0.1 of the target's scale, ``HIGH_DIM_BLUR`` on data with more than
        ``HIGH_DIM_FEATURES`` features per sample); an explicit ``SinkhornOptions`` is used as given.
    pool_capacity : int
        Items of the trajectory pool of the NSGF phase.
    refresh_every : int
        A new flow is simulated into the pool every ``refresh_every`` training steps.
    lr : float
        Adam learning rate of all networks.
    generator : torch.Generator, optional
        CPU generator for all the trainer's randomness (data rows, times, pool draws, OT pair order).
    progress : bool
        tqdm progress bar in :meth:`fit`.
    endpoints : {"simulated", "network"}
        Where the ``"ot"`` variants' segments start (:class:`NSGFPlusPlusObjective`); saved in checkpoints.

    Notes
    -----
    ``source`` and ``target`` of :meth:`fit` are either a tensor ``(N, *dim)`` from which rows are drawn with
    ``generator``, or a function ``n -> Tensor (n, *dim)``. Class-conditional training: ``target_labels``
    ``(N,)`` next to a target tensor, or a target function returning ``(x1, y1)``; the networks must then take
    labels (e.g. :class:`~torchcfm_nsgf.networks.VelocityMLP` with ``num_classes``), and :meth:`sample` takes
    ``y``. Every step draws one batch pair, asks the
    objective for one loss per network and steps one Adam per network (equal to one Adam on the summed
    loss, which is what the image loop does). :meth:`save` writes the networks, the optimisers, the settings,
    the step counter, the generator state and the NSGF phase's matcher (its trajectory pool and call counter,
    which decides the next refresh) in one atomically written file, so that training resumes exactly.
    Checkpoints of the earlier three-loop trainer (format ``nsgfpp/1``) load as variant ``"paper"``, with
    the step counter set to the largest of their three counters.
    """

    def __init__(
        self,
        nsgf: nn.Module,
        predictor: nn.Module | None,
        straight: nn.Module,
        *,
        phase2: Phase2 = DEFAULT_PHASE2,
        n_steps: int = 2,
        step_size: float = 1.0,
        sinkhorn: SinkhornOptions | None = None,
        pool_capacity: int = 100_000,
        refresh_every: int = 5,
        lr: float = 1e-3,
        generator: torch.Generator | None = None,
        progress: bool = False,
        endpoints: str = DEFAULT_ENDPOINTS,
    ) -> None:
        _check_phase2(phase2)
        if endpoints not in ENDPOINT_SOURCES:
            raise ValueError(f"endpoints must be one of {list(ENDPOINT_SOURCES)}, got {endpoints!r}")
        if phase2 in PREDICTOR_VARIANTS and predictor is None:
            raise ValueError(f"predictor is required for phase2={phase2!r} (a time predictor network)")
        if phase2 not in PREDICTOR_VARIANTS and predictor is not None:
            raise ValueError(
                f"predictor must be None for phase2={phase2!r} (phase 2 starts at s = 0, no predictor)"
            )
        named = {"nsgf": nsgf, "predictor": predictor, "straight": straight}
        for name, net in named.items():
            if net is not None and not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(net).__name__}")
        _check_phase1_steps(n_steps)
        check_positive(step_size, "step_size")
        if sinkhorn is not None and not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions or None, got {type(sinkhorn).__name__}")
        check_positive(pool_capacity, "pool_capacity", integer=True)
        check_positive(refresh_every, "refresh_every", integer=True)
        check_positive(lr, "lr")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.nets = nn.ModuleDict({k: net for k, net in named.items() if net is not None})
        self.settings = _Settings(
            n_steps=n_steps,
            step_size=float(step_size),
            sinkhorn=sinkhorn,
            pool_capacity=pool_capacity,
            refresh_every=refresh_every,
            lr=float(lr),
            phase2=phase2,
            endpoints=endpoints,
        )
        self.generator = generator
        self.progress = progress
        self.optimizers = {k: torch.optim.Adam(net.parameters(), lr=lr) for k, net in self.nets.items()}
        self._build_objective()

    def _build_objective(self) -> None:
        s = self.settings
        matcher = SinkhornFlowMatcher(
            flow_steps=s.n_steps,
            step_size=s.step_size,
            path="grid",
            sinkhorn=s.sinkhorn,
            pool=TrajectoryPool(s.pool_capacity, generator=self.generator),
            refresh_every=s.refresh_every,
            generator=self.generator,
        )
        self.objective = NSGFPlusPlusObjective(
            matcher, phase2=s.phase2, generator=self.generator, endpoints=s.endpoints
        )

    @property
    def matcher(self) -> SinkhornFlowMatcher:
        """The NSGF phase's matcher (its pool and counters)."""
        return self.objective.matcher

    @property
    def phase2(self) -> str:
        """The variant (:data:`PHASE2_VARIANTS`)."""
        return self.settings.phase2

    @property
    def n_steps(self) -> int:
        """``T``, the NSGF steps of phase 1."""
        return self.settings.n_steps

    @property
    def iterations(self) -> int:
        """Training steps taken so far (each steps every network once)."""
        return self.settings.iterations

    # ------------------------------------------------------------------ data
    def _draw(
        self, data: Tensor | Sampler, n: int, name: str, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(data, Tensor):
            check_cloud(data, name)
            idx = torch.randint(data.shape[0], (n,), generator=self.generator).to(data.device)
            return data[idx], None if labels is None else labels[idx.to(labels.device)]
        if labels is not None:
            raise ValueError(
                f"{name}_labels goes with a {name} tensor; a {name} function returns (x, y) itself"
            )
        if callable(data):
            batch = data(n)
            y = None
            if isinstance(batch, tuple) and len(batch) == 2:
                batch, y = batch
                y = check_labels(y, n, f"the labels of {name}({n})", f"{name}({n})")
            if not isinstance(batch, Tensor) or batch.dim() < 2 or batch.shape[0] != n:
                shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(f"{name}({n}) must return a tensor of shape ({n}, *dim), got {shape}")
            return check_cloud(batch, f"{name}({n})"), y
        raise TypeError(
            f"{name} must be a tensor (N, *dim) or a function n -> tensor, got {type(data).__name__}"
        )

    def _pair(
        self, source: Tensor | Sampler, target: Tensor | Sampler, n: int, target_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A source and a target batch ``(n, *dim)``, on the source's device and dtype, and the target's labels."""
        x0, _ = self._draw(source, n, "source")
        x1, y1 = self._draw(target, n, "target", target_labels)
        check_same_features(x0, x1, "source", "target")
        shape = tuple(x0.shape[1:])
        if self.settings.feature_shape is None:
            self.settings.feature_shape = shape
        elif shape != self.settings.feature_shape:
            raise ValueError(
                f"source and target have feature shape {shape}, but this model was trained on "
                f"{self.settings.feature_shape}"
            )
        return x0, x1.to(device=x0.device, dtype=x0.dtype), None if y1 is None else y1.to(x0.device)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        source: Tensor | Sampler,
        target: Tensor | Sampler,
        n_iters: int,
        batch_size: int = 256,
        target_labels: Tensor | None = None,
    ) -> dict[str, list[float]]:
        """Train every network for ``n_iters`` steps on :meth:`NSGFPlusPlusObjective.losses`.

        ``target_labels`` ``(N,)``: class labels of a target tensor (class-conditional training); a target
        function may return ``(x1, y1)`` instead. Returns the losses per network, one value per step.
        """
        check_positive(n_iters, "n_iters", integer=True)
        check_positive(batch_size, "batch_size", integer=True)
        if target_labels is not None:
            if not isinstance(target, Tensor):
                raise ValueError("target_labels goes with a target tensor; a target function returns (x, y)")
            target_labels = check_labels(target_labels, target.shape[0], "target_labels", "target")
        self.nets.train()
        history: dict[str, list[float]] = {k: [] for k in self.nets}
        bar = tqdm(range(n_iters), desc=f"NSGF++ ({self.phase2})", disable=not self.progress, leave=False)
        for _ in bar:
            x0, x1, y1 = self._pair(source, target, batch_size, target_labels)
            losses = self.objective.losses(self.nets, x0, x1, y1)
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            for opt in self.optimizers.values():
                opt.step()
            self.settings.iterations += 1
            for k, loss in losses.items():
                value = float(loss.detach())
                history[k].append(value)
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the {k} loss became {value} at step {self.settings.iterations}: lower lr"
                    )
            bar.set_postfix({k: f"{v[-1]:.3g}" for k, v in history.items()}, refresh=False)
        return history

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
        y: Tensor | None = None,
    ) -> SampleResult:
        """:meth:`NSGFPlusPlusObjective.sample` with this model's networks (in eval mode); ``x0`` ``(bs, *dim)``,
        class labels ``y`` ``(bs,)`` for a class-conditional model."""
        x0 = check_cloud(x0, "x0")
        shape = self.settings.feature_shape
        if shape is not None and tuple(x0.shape[1:]) != shape:
            raise ValueError(
                f"x0 has feature shape {tuple(x0.shape[1:])}, but this model was trained on {shape}"
            )
        modes = {k: net.training for k, net in self.nets.items()}
        self.nets.eval()
        try:
            return self.objective.sample(
                self.nets,
                x0,
                solver=solver,
                straight_steps=straight_steps,
                atol=atol,
                rtol=rtol,
                return_trajectory=return_trajectory,
                progress=self.progress,
                y=y,
            )
        finally:
            for k, net in self.nets.items():
                net.train(modes[k])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, settings, step counter, generator state and the NSGF matcher (pool)."""
        s = self.settings
        return {
            "format": _FORMAT,
            "settings": {
                "n_steps": s.n_steps,
                "step_size": s.step_size,
                "sinkhorn": None if s.sinkhorn is None else asdict(s.sinkhorn),
                "pool_capacity": s.pool_capacity,
                "refresh_every": s.refresh_every,
                "lr": s.lr,
                "phase2": s.phase2,
                "endpoints": s.endpoints,
                "feature_shape": None if s.feature_shape is None else list(s.feature_shape),
                "iterations": s.iterations,
            },
            "nets": {k: net.state_dict() for k, net in self.nets.items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "generator_state": None if self.generator is None else self.generator.get_state(),
            "matcher": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into these networks (same architectures); settings come from ``state``."""
        if not isinstance(state, dict) or state.get("format") not in (_FORMAT, _FORMAT_V1):
            raise ValueError(f"state is not an NSGF++ checkpoint (expected format {_FORMAT!r})")
        missing = [k for k in ("settings", "nets", "optimizers") if k not in state]
        if missing:
            raise ValueError(f"state misses the entries {missing}")
        st = dict(state["settings"])
        _check_phase1_steps(st["n_steps"], "settings['n_steps']")
        shape = st.pop("feature_shape")
        if "sinkhorn" in st:  # None: the matcher's default (its state holds the resolved blur)
            st["sinkhorn"] = None if st["sinkhorn"] is None else SinkhornOptions(**st["sinkhorn"])
        else:  # checkpoints written before SinkhornOptions: an absolute blur
            st["sinkhorn"] = SinkhornOptions(
                blur=st.pop("blur"), relative_blur=False, scaling=st.pop("scaling"), max_iter=5000
            )
        iterations = st.pop("iterations")
        if isinstance(iterations, dict):  # format 1: one counter per separately trained network
            iterations = max(iterations.values())
        st.setdefault("phase2", "paper")
        st.setdefault("endpoints", "simulated")
        if st["phase2"] != self.settings.phase2:
            raise ValueError(
                f"the checkpoint is NSGF++ variant {st['phase2']!r}, this model is {self.settings.phase2!r}"
            )
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
            **st, feature_shape=None if shape is None else tuple(shape), iterations=int(iterations)
        )
        self._build_objective()
        if state.get("matcher") is not None:  # absent in checkpoints written before the pool was saved
            self.objective.load_state_dict(state["matcher"])
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
            f"{type(self).__name__}(phase2={s.phase2!r}, n_steps={s.n_steps}, step_size={s.step_size:g}, "
            f"sinkhorn={self.matcher.sinkhorn}, iterations={s.iterations})"
        )
