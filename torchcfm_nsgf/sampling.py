"""Samplers for learned velocity fields ``field(t, x)`` (NSGF inference, Algorithm 2 of Zhu et al., 2024).

Fields follow torchcfm's convention: ``field(t, x) -> dx/dt`` with ``x`` of shape ``(bs, *dim)`` and ``t`` a
0-d tensor (what ``torchcfm.utils.torch_wrapper`` expects) or, inside torchdyn's adaptive solvers, a ``(1,)``
tensor. Both samplers integrate from ``x0`` at ``t = 0`` towards the data at ``t = 1`` under
``torch.no_grad()`` and report the exact number of function evaluations (NFE).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._validation import check_cloud, check_positive

__all__ = ["NFECounter", "SampleResult", "euler_sample", "odeint_sample"]

Field = Callable[..., Tensor]

FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "tsit5")


@dataclass
class SampleResult:
    """Output of a sampler.

    Attributes
    ----------
    samples : Tensor
        Final state ``x(t1)``, shape ``(bs, *dim)``.
    trajectory : Tensor or None
        States at ``times``, shape ``(n_times, bs, *dim)``, the initial state included; None unless asked.
    times : Tensor or None
        Times of the trajectory, shape ``(n_times,)``; None unless the trajectory was asked.
    nfe : int
        Number of evaluations of the field.
    """

    samples: Tensor
    trajectory: Tensor | None
    times: Tensor | None
    nfe: int


class NFECounter(nn.Module):
    """Wrap a field ``field(t, x)`` and count its evaluations in ``self.nfe``.

    ``forward(t, x, *args, **kwargs)`` forwards ``t``, ``x`` and extra positional arguments to the field and
    drops keyword arguments: torchdyn calls its vector field as ``vf(t, x, args=...)``, which plain fields
    (lambdas, ``torch_wrapper``-ed MLPs) do not accept. A bare function therefore becomes a module that
    torchdyn can call.

    Parameters
    ----------
    field : callable
        ``field(t, x) -> Tensor`` of the shape of ``x``. Kept as ``self.field`` (a submodule if it is one).
    """

    def __init__(self, field: Field) -> None:
        super().__init__()
        if not callable(field):
            raise TypeError(f"field must be callable as field(t, x), got {type(field).__name__}")
        self.field = field
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.nfe += 1
        return self.field(t, x, *args)

    def reset(self) -> None:
        """Set the count back to zero."""
        self.nfe = 0


def _check_x0(x0: object) -> Tensor:
    return check_cloud(x0, "x0")


def _check_output(v: object, x: Tensor) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"field(t, x) must return a tensor of x's shape {tuple(x.shape)}, got {shape}")
    return v


def _warn_if_not_finite(samples: Tensor) -> None:
    if not bool(torch.isfinite(samples).all()):
        warnings.warn("the samples contain NaN or Inf: the field or the step size is unstable", stacklevel=3)


def euler_sample(
    field: Field,
    x0: Tensor,
    *,
    n_steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    callback: Callable[[int, float, Tensor], None] | None = None,
    progress: bool = False,
) -> SampleResult:
    r"""Integrate ``dx/dt = field(t, x)`` from ``t0`` to ``t1`` with ``n_steps`` explicit Euler steps.

    This is NSGF's inference (Algorithm 2): ``x_{k+1} = x_k + Δt · field(t_k, x_k)`` with
    ``Δt = (t1 - t0) / n_steps`` and ``t_k = t0 + k Δt``. Written by hand, not with torchdyn, to call the
    field exactly ``n_steps`` times with a 0-d time tensor and to expose a per-step callback.

    Parameters
    ----------
    field : callable
        ``field(t, x)`` with ``t`` a 0-d tensor of ``x0``'s dtype and device, ``x`` of shape ``(bs, *dim)``.
    x0 : Tensor
        Initial state, shape ``(bs, *dim)``, floating and finite.
    n_steps : int
        Number of Euler steps, ``>= 1``; the NFE equals ``n_steps``.
    t0, t1 : float
        Start and end times (``t1 < t0`` integrates backwards).
    return_trajectory : bool
        Also return the ``n_steps + 1`` states and their times.
    callback : callable, optional
        Called after each step as ``callback(k, t_k, x_k)`` with ``k = 1 .. n_steps``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``trajectory`` ``(n_steps + 1, bs, *dim)`` and ``times``
        ``(n_steps + 1,)`` if asked; ``nfe == n_steps``.
    """
    if not callable(field):
        raise TypeError(f"field must be callable as field(t, x), got {type(field).__name__}")
    x = _check_x0(x0)
    check_positive(n_steps, "n_steps", integer=True)
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")

    dt = (t1 - t0) / n_steps
    times = [t0 + k * dt for k in range(n_steps)] + [float(t1)]
    states = [x] if return_trajectory else None
    with torch.no_grad():
        for k in tqdm(range(n_steps), disable=not progress, desc="Euler", leave=False):
            t = torch.tensor(times[k], dtype=x.dtype, device=x.device)
            x = x + dt * _check_output(field(t, x), x)
            if states is not None:
                states.append(x)
            if callback is not None:
                callback(k + 1, times[k + 1], x)
    _warn_if_not_finite(x)
    if states is None:
        return SampleResult(samples=x, trajectory=None, times=None, nfe=n_steps)
    return SampleResult(
        samples=x,
        trajectory=torch.stack(states),
        times=torch.tensor(times, dtype=x.dtype, device=x.device),
        nfe=n_steps,
    )


def _check_t_span(t_span: object, x0: Tensor) -> Tensor:
    if not isinstance(t_span, Tensor):
        raise TypeError(f"t_span must be a torch.Tensor or None, got {type(t_span).__name__}")
    if t_span.dim() != 1 or t_span.numel() < 2:
        raise ValueError(f"t_span must be 1-D with at least 2 times, got shape {tuple(t_span.shape)}")
    t_span = t_span.to(device=x0.device, dtype=x0.dtype)
    if not bool(torch.isfinite(t_span).all()):
        raise ValueError("t_span contains NaN or Inf entries")
    if not bool((t_span[1:] > t_span[:-1]).all()):
        raise ValueError("t_span must be strictly increasing")
    return t_span


def _torchdyn_solver(name: str, dtype: torch.dtype) -> nn.Module:
    """A torchdyn solver whose constants are built in ``dtype`` (``NeuralODE(solver=str)`` builds float32
    tableaus, which limits float64 runs to float32 accuracy), with torchdyn 1.0.6's RK4 nodes repaired."""
    from torchdyn.numerics.solvers.ode import str_to_solver

    solver = str_to_solver(name, dtype)
    if name == "rk4":
        nodes, a, b, err = solver.tableau
        if nodes.tolist() == [0.0, 0.5, 0.5, 1.0]:
            # torchdyn's step reads nodes[0..2] for stages 2-4, i.e. t, t + dt/2, t + dt/2 instead of
            # t + dt/2, t + dt/2, t + dt: wrong for time-dependent fields. Store the nodes it expects.
            solver.tableau = (torch.tensor([0.5, 0.5, 1.0], dtype=dtype), a, b, err)
    return solver


def odeint_sample(
    field: Field,
    x0: Tensor,
    *,
    solver: str = "euler",
    n_steps: int | None = None,
    t_span: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate ``dx/dt = field(t, x)`` with a torchdyn solver (``torchdyn.core.NeuralODE``).

    Fixed-step solvers (``euler``, ``midpoint``, ``rk4``) step on ``t_span = linspace(0, 1, n_steps + 1)``,
    so the NFE is ``n_steps`` times the number of stages (1, 2, 4). Adaptive solvers (``dopri5``,
    ``tsit5``) integrate over ``t_span = [0, 1]``: torchdyn forces them to land on every time of
    ``t_span``, so extra times would change the NFE; pass ``t_span`` only to get the trajectory at chosen
    times. The NFE is counted exactly by wrapping the field in :class:`NFECounter` (torchdyn's own
    ``vf.nfe`` is cumulative).

    Parameters
    ----------
    field : callable
        ``field(t, x)``; ``t`` is a 0-d tensor for fixed-step solvers and a ``(1,)`` tensor for adaptive
        ones (torchdyn's convention), of ``x0``'s dtype and device.
    x0 : Tensor
        Initial state, shape ``(bs, *dim)``, floating and finite.
    solver : str
        One of ``euler``, ``midpoint``, ``rk4``, ``dopri5``, ``tsit5``.
    n_steps : int, optional
        Number of steps of a fixed-step solver; not accepted by adaptive solvers.
    t_span : Tensor, optional
        Increasing times, shape ``(n_times,)``, instead of ``n_steps`` (fixed-step) or of ``[0, 1]``
        (adaptive).
    atol, rtol : float
        Tolerances of adaptive solvers (unused by fixed-step ones).
    return_trajectory : bool
        Also return the states at every time of ``t_span``.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``trajectory`` ``(n_times, bs, *dim)`` and ``times`` ``(n_times,)``
        if asked; ``nfe`` as counted.
    """
    from torchdyn.core import NeuralODE  # imports pytorch-lightning (about 1.5 s): only when needed

    if not callable(field):
        raise TypeError(f"field must be callable as field(t, x), got {type(field).__name__}")
    x0 = _check_x0(x0)
    if not isinstance(solver, str) or solver not in FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS:
        raise ValueError(
            f"solver must be one of {list(FIXED_STEP_SOLVERS)} (fixed-step) or {list(ADAPTIVE_SOLVERS)} "
            f"(adaptive), got {solver!r}"
        )
    adaptive = solver in ADAPTIVE_SOLVERS
    if n_steps is not None:
        check_positive(n_steps, "n_steps", integer=True)
        if adaptive:
            raise ValueError(f"n_steps has no meaning for the adaptive solver {solver!r}; leave it None")
        if t_span is not None:
            raise ValueError("give n_steps or t_span, not both")
    if t_span is not None:
        t_span = _check_t_span(t_span, x0)
    elif adaptive:
        t_span = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    elif n_steps is None:
        raise ValueError(f"n_steps is required for the fixed-step solver {solver!r} (or pass t_span)")
    else:
        t_span = torch.linspace(0.0, 1.0, n_steps + 1, dtype=x0.dtype, device=x0.device)
    if adaptive:
        check_positive(atol, "atol")
        check_positive(rtol, "rtol")

    counter = NFECounter(field)
    # Tolerances only for adaptive solvers: torchdyn warns when fixed-step solvers get non-default ones.
    tolerances = {"atol": atol, "rtol": rtol} if adaptive else {}
    # torchdyn prints a notice for fields without parameters; a placeholder parameter keeps it quiet.
    placeholder = () if any(True for _ in counter.parameters()) else (nn.Parameter(torch.zeros(1)),)
    node = NeuralODE(
        counter,
        solver=_torchdyn_solver(solver, x0.dtype),
        sensitivity="autograd",
        optimizable_params=placeholder,
        **tolerances,
    )
    with torch.no_grad():
        trajectory = node.trajectory(x0, t_span=t_span)
    samples = trajectory[-1]
    _warn_if_not_finite(samples)
    if not return_trajectory:
        return SampleResult(samples=samples, trajectory=None, times=None, nfe=counter.nfe)
    return SampleResult(samples=samples, trajectory=trajectory, times=t_span, nfe=counter.nfe)
