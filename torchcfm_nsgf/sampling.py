"""One sampler for learned velocity fields ``field(t, x)`` (NSGF inference, Algorithm 2 of Zhu et al., 2024).

:func:`odeint_sample` integrates ``dx/dt = field(t, x)`` from ``x0`` at ``t = 0`` towards the data at
``t = 1`` under ``torch.no_grad()`` with a solver chosen by name from :data:`SOLVERS` (torchdiffeq's
convention), and returns a :class:`SampleResult` whose ``nfe`` is counted from real calls of the field.

Fields follow torchcfm's convention: ``field(t, x, **extra_args) -> dx/dt`` with ``x`` of shape
``(bs, *dim)`` and ``t`` a 0-d tensor of ``x``'s dtype (what ``torchcfm.utils.torch_wrapper`` expects) or,
inside torchdyn's adaptive solvers, a ``(1,)`` tensor. ``extra_args`` are passed on every call (k-diffusion's
convention: class labels ``y=`` for torchcfm's ``UNetModelWrapper``); classifier-free guidance is the field
:class:`~torchcfm_nsgf.guidance.CFGField`, whose two network calls per evaluation are counted.

Solvers: the fixed-step ones (``euler``, ``midpoint``, ``rk4``) run in one loop here, with a per-step
callback and a switchable progress bar; ``euler`` is written by hand, ``midpoint`` and ``rk4`` are
torchdyn's steppers with their constants in ``x0``'s dtype. The adaptive ones (``dopri5``, ``tsit5``) are
torchdyn's ``odeint``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._progress import bar_disable
from ._validation import check_cloud, check_positive

__all__ = [
    "SOLVERS",
    "NFECounter",
    "SampleResult",
    "SolverSpec",
    "check_step_budget",
    "default_steps",
    "euler_sample",
    "odeint_sample",
]

Field = Callable[..., Tensor]
#: ``step(f, x, t, dt) -> x_next``: one step of a fixed-step solver (``t`` and ``dt`` 0-d tensors).
Step = Callable[[Field, Tensor, Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], None]


@dataclass
class SampleResult:
    """Output of every sampler of the package (:func:`odeint_sample`, :func:`~torchcfm_nsgf.nsgfpp_sample`).

    Attributes
    ----------
    samples : Tensor
        Final state ``x(t1)``, shape ``(bs, *dim)``.
    nfe : dict[str, int]
        Network evaluations along the batch's trajectory, counted, per network: ``{"field": n}`` for one
        field, ``{"nsgf": T, "predictor": 1, "straight": n}`` for NSGF++. A batch evaluation counts once.
    trajectory : Tensor or None
        States at ``times``, shape ``(n_times, bs, *dim)``, the initial state included; None unless asked.
    times : Tensor or None
        Times of the trajectory, shape ``(n_times,)``; None unless the trajectory was asked (or when the
        sampler has no single clock; its docstring then says where the times are).
    extras : dict[str, Tensor]
        Per-method outputs, documented by the sampler that fills them (NSGF++: ``"tau"``, shape ``(bs,)``).
    """

    samples: Tensor
    nfe: dict[str, int]
    trajectory: Tensor | None = None
    times: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total_nfe(self) -> int:
        """Sum of the NFE breakdown."""
        return sum(self.nfe.values())


class NFECounter(nn.Module):
    """Wrap a field ``field(t, x)`` and count its evaluations in ``self.nfe``.

    ``forward(t, x, *args, **kwargs)`` calls ``field(t, x, *args, **extra_args)``: the keyword arguments of
    the call are dropped (torchdyn calls its vector field as ``vf(t, x, args=...)``, which plain fields,
    lambdas and ``torch_wrapper``-ed MLPs, do not accept) and the fixed ``extra_args`` are passed instead.
    A bare function therefore becomes a module that torchdyn can call.

    A field that counts its own network calls in an integer attribute ``nfe`` (another
    :class:`NFECounter`, a :class:`~torchcfm_nsgf.guidance.CFGField`, whose guided evaluation is two network
    calls) adds the calls it reports; any other field counts one per call.

    Parameters
    ----------
    field : callable
        ``field(t, x, **extra_args) -> Tensor`` of the shape of ``x``. Kept as ``self.field`` (a submodule
        if it is one).
    extra_args : dict, optional
        Keyword arguments passed to the field on every call (e.g. labels ``{"y": y}``).
    """

    def __init__(self, field: Field, extra_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not callable(field):
            raise TypeError(f"field must be callable as field(t, x), got {type(field).__name__}")
        self.field = field
        self.extra_args = _check_extra_args(extra_args)
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        before = _reported_calls(self.field)
        out = self.field(t, x, *args, **self.extra_args)
        self.nfe += 1 if before is None else _reported_calls(self.field) - before
        return out

    def reset(self) -> None:
        """Set the count back to zero."""
        self.nfe = 0


def _reported_calls(field: object) -> int | None:
    """The network calls a field reports in its integer ``nfe`` attribute, or None when it has none."""
    n = getattr(field, "nfe", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


# ---------------------------------------------------------------------------------------------- solvers
@dataclass(frozen=True)
class SolverSpec:
    """One entry of :data:`SOLVERS`.

    Attributes
    ----------
    stages : int or None
        Field evaluations per step of a fixed-step solver (NFE = ``n_steps * stages``); None for an
        adaptive solver, whose NFE depends on ``atol`` and ``rtol`` (it is counted).
    build : callable
        ``build(x0)``: for a fixed-step solver a :data:`Step` ``step(f, x, t, dt) -> x_next``; for an
        adaptive one a torchdyn solver module. Constants are built in ``x0``'s dtype and device.
    """

    stages: int | None
    build: Callable[[Tensor], Any]

    @property
    def adaptive(self) -> bool:
        """Whether the step size is chosen by an error estimate (``atol``, ``rtol``)."""
        return self.stages is None


def _euler_step(f: Field, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
    # By hand: one call with a 0-d time, nothing else (torchdyn's Euler is the same formula).
    return x + dt * f(t, x)


def _torchdyn_solver(name: str, x0: Tensor) -> nn.Module:
    """A torchdyn solver whose constants are built in ``x0``'s dtype (``str_to_solver`` defaults to float32
    tableaus, which limits float64 runs to float32 accuracy) and device, with torchdyn 1.0.6's RK4 nodes
    repaired."""
    from torchdyn.numerics.solvers.ode import str_to_solver

    solver = str_to_solver(name, x0.dtype)
    if name == "rk4":
        nodes, a, b, err = solver.tableau
        if nodes.tolist() == [0.0, 0.5, 0.5, 1.0]:
            # torchdyn's step reads nodes[0..2] for stages 2-4, i.e. t, t + dt/2, t + dt/2 instead of
            # t + dt/2, t + dt/2, t + dt: wrong for time-dependent fields. Store the nodes it expects.
            solver.tableau = (torch.tensor([0.5, 0.5, 1.0], dtype=x0.dtype), a, b, err)
    solver.sync_device_dtype(x0, torch.zeros(1, device=x0.device))
    return solver


def _torchdyn_step(name: str) -> Callable[[Tensor], Step]:
    def build(x0: Tensor) -> Step:
        solver = _torchdyn_solver(name, x0)
        return lambda f, x, t, dt: solver.step(f, x, t, dt)[1]

    return build


#: The solvers of :func:`odeint_sample`, by name. Adding one is adding an entry.
SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec(stages=1, build=lambda x0: _euler_step),
    "midpoint": SolverSpec(stages=2, build=_torchdyn_step("midpoint")),
    "rk4": SolverSpec(stages=4, build=_torchdyn_step("rk4")),
    "dopri5": SolverSpec(stages=None, build=lambda x0: _torchdyn_solver("dopri5", x0)),
    "tsit5": SolverSpec(stages=None, build=lambda x0: _torchdyn_solver("tsit5", x0)),
}


def solver_spec(solver: object, name: str = "solver") -> SolverSpec:
    """``SOLVERS[solver]``, or a ``ValueError`` naming the argument ``name`` and the known solvers."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        fixed = [k for k, s in SOLVERS.items() if not s.adaptive]
        adaptive = [k for k, s in SOLVERS.items() if s.adaptive]
        raise ValueError(
            f"{name} must be one of {fixed} (fixed-step) or {adaptive} (adaptive), got {solver!r}"
        )
    return SOLVERS[solver]


def default_steps(solver: object, n_steps: int | None, default: int) -> int | None:
    """The step budget a sampler uses: ``n_steps`` if given, else ``default`` for a fixed-step ``solver`` and
    None for an adaptive one (which runs to its tolerance). The one rule of every sampler of the package."""
    if n_steps is None and not solver_spec(solver).adaptive:
        return default
    return n_steps


def check_step_budget(solver: object, n_steps: object, name: str = "n_steps") -> None:
    """``n_steps`` (called ``name`` in messages) fits ``solver``: a positive int for a fixed-step solver,
    None for an adaptive one."""
    if solver_spec(solver).adaptive:
        if n_steps is not None:
            raise ValueError(f"{name} has no meaning for the adaptive solver {solver!r}; leave it None")
    elif n_steps is None:
        raise ValueError(f"{name} is required for the fixed-step solver {solver!r}")
    else:
        check_positive(n_steps, name, integer=True)


# ---------------------------------------------------------------------------------------------- checks
def _check_extra_args(extra_args: object) -> dict[str, Any]:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, Mapping) or not all(isinstance(k, str) for k in extra_args):
        raise TypeError(
            f"extra_args must be a dict of keyword arguments for the field or None, got {extra_args!r}"
        )
    return dict(extra_args)


def _check_output(v: object, x: Tensor) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"field(t, x) must return a tensor of x's shape {tuple(x.shape)}, got {shape}")
    return v


def _check_t_span(t_span: object, x0: Tensor) -> Tensor:
    if not isinstance(t_span, Tensor):
        raise TypeError(f"t_span must be a torch.Tensor or None, got {type(t_span).__name__}")
    if t_span.dim() != 1 or t_span.numel() < 2:
        raise ValueError(f"t_span must be 1-D with at least 2 times, got shape {tuple(t_span.shape)}")
    t_span = t_span.to(device=x0.device, dtype=x0.dtype)
    if not bool(torch.isfinite(t_span).all()):
        raise ValueError("t_span contains NaN or Inf entries")
    steps = t_span[1:] - t_span[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(
            "t_span must be strictly increasing (or strictly decreasing, to integrate backwards)"
        )
    return t_span


def _warn_if_not_finite(samples: Tensor) -> None:
    if not bool(torch.isfinite(samples).all()):
        warnings.warn("the samples contain NaN or Inf: the field or the step size is unstable", stacklevel=3)


# ---------------------------------------------------------------------------------------------- sampler
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
    callback: Callback | None = None,
    progress: bool = False,
    extra_args: Mapping[str, Any] | None = None,
) -> SampleResult:
    """Integrate ``dx/dt = field(t, x, **extra_args)`` with the solver ``SOLVERS[solver]``.

    Fixed-step solvers (``euler``, ``midpoint``, ``rk4``) step on ``t_span = linspace(0, 1, n_steps + 1)``,
    so the NFE is ``n_steps`` times the number of stages (1, 2, 4); ``euler`` is NSGF's inference
    (Algorithm 2), ``x_{k+1} = x_k + Δt · field(t_k, x_k)``. Adaptive solvers (``dopri5``, ``tsit5``,
    torchdyn's ``odeint``) integrate over ``t_span = [0, 1]``: torchdyn forces them to land on every time of
    ``t_span``, so extra times would change the NFE; pass ``t_span`` only to get the trajectory at chosen
    times. The NFE is counted from the field's real calls (:class:`NFECounter`).

    Parameters
    ----------
    field : callable
        ``field(t, x, **extra_args)``; ``t`` is a 0-d tensor for fixed-step solvers and a ``(1,)`` tensor
        for adaptive ones (torchdyn's convention), of ``x0``'s dtype and device; returns ``x``'s shape.
    x0 : Tensor
        Initial state, shape ``(bs, *dim)``, floating and finite.
    solver : str
        A key of :data:`SOLVERS`: ``euler``, ``midpoint``, ``rk4``, ``dopri5``, ``tsit5``.
    n_steps : int, optional
        Number of steps of a fixed-step solver; not accepted by adaptive solvers.
    t_span : Tensor, optional
        Strictly monotone times, shape ``(n_times,)``, instead of ``n_steps`` (fixed-step) or of ``[0, 1]``
        (adaptive); a decreasing one integrates backwards.
    atol, rtol : float
        Tolerances of adaptive solvers (unused by fixed-step ones).
    return_trajectory : bool
        Also return the states at every time of ``t_span``.
    callback : callable, optional
        ``callback(k, t_k, x_k)`` for ``k = 1 .. n_times - 1``: after each step of a fixed-step solver; for
        an adaptive solver at the times of ``t_span``, once the solve is done.
    progress : bool
        tqdm progress bar over the steps of a fixed-step solver (adaptive solvers show none).
    extra_args : dict, optional
        Keyword arguments passed to the field on every call, e.g. ``{"y": labels}``.

    Returns
    -------
    SampleResult
        ``samples`` ``(bs, *dim)``; ``nfe == {"field": calls}``; ``trajectory`` ``(n_times, bs, *dim)`` and
        ``times`` ``(n_times,)`` if asked.
    """
    if not callable(field):
        raise TypeError(f"field must be callable as field(t, x), got {type(field).__name__}")
    x0 = check_cloud(x0, "x0")
    spec = solver_spec(solver)
    if n_steps is not None:
        check_positive(n_steps, "n_steps", integer=True)
        if spec.adaptive:
            raise ValueError(f"n_steps has no meaning for the adaptive solver {solver!r}; leave it None")
        if t_span is not None:
            raise ValueError("give n_steps or t_span, not both")
    if t_span is not None:
        t_span = _check_t_span(t_span, x0)
    elif spec.adaptive:
        t_span = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    elif n_steps is None:
        raise ValueError(f"n_steps is required for the fixed-step solver {solver!r} (or pass t_span)")
    else:
        t_span = torch.linspace(0.0, 1.0, n_steps + 1, dtype=x0.dtype, device=x0.device)
    if spec.adaptive:
        check_positive(atol, "atol")
        check_positive(rtol, "rtol")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    counter = NFECounter(field, extra_args)

    def f(t: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _check_output(counter(t, x), x)

    with torch.no_grad():
        if spec.adaptive:
            from torchdyn.numerics import odeint  # torchdyn's functional API, without pytorch-lightning

            _, trajectory = odeint(f, x0, t_span, spec.build(x0), atol=atol, rtol=rtol)
            if callback is not None:
                for k in range(1, len(t_span)):
                    callback(k, float(t_span[k]), trajectory[k])
            states = list(trajectory) if return_trajectory else None
            x = trajectory[-1]
        else:
            step = spec.build(x0)
            x, states = x0, ([x0] if return_trajectory else None)
            for k in tqdm(range(len(t_span) - 1), disable=bar_disable(progress), desc=solver, leave=False):
                x = step(f, x, t_span[k], t_span[k + 1] - t_span[k])
                if states is not None:
                    states.append(x)
                if callback is not None:
                    callback(k + 1, float(t_span[k + 1]), x)
    _warn_if_not_finite(x)
    if states is None:
        return SampleResult(samples=x, nfe={"field": counter.nfe})
    return SampleResult(samples=x, nfe={"field": counter.nfe}, trajectory=torch.stack(states), times=t_span)


def euler_sample(
    field: Field,
    x0: Tensor,
    *,
    n_steps: int,
    return_trajectory: bool = False,
    callback: Callback | None = None,
    progress: bool = False,
    extra_args: Mapping[str, Any] | None = None,
) -> SampleResult:
    """``odeint_sample(field, x0, solver="euler", n_steps=n_steps, ...)``: NSGF's inference (Algorithm 2).

    ``n_steps`` explicit Euler steps on ``[0, 1]``; ``nfe == {"field": n_steps}``. See :func:`odeint_sample`
    for the arguments and the result.
    """
    return odeint_sample(
        field,
        x0,
        solver="euler",
        n_steps=n_steps,
        return_trajectory=return_trajectory,
        callback=callback,
        progress=progress,
        extra_args=extra_args,
    )
