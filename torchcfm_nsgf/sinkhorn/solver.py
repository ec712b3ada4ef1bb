"""The Sinkhorn loop, written once over the backend interface, and the public solve functions.

See the package docstring (:mod:`torchcfm_nsgf.sinkhorn`) for the conventions and the solver.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .._validation import (
    check_cloud,
    check_open_unit,
    check_positive,
    check_same_device,
    check_same_features,
    check_weights,
)
from .backends import SinkhornBackend, check_backend
from .factory import make_backend

__all__ = [
    "HIGH_DIM_BLUR",
    "SinkhornConvergenceWarning",
    "SinkhornOptions",
    "SinkhornSolution",
    "sinkhorn_solve",
    "sinkhorn_velocity",
]


class SinkhornConvergenceWarning(RuntimeWarning):
    """The iteration cap stopped the Sinkhorn solver before it reached the requested tolerance."""


@dataclass
class SinkhornSolution:
    r"""Result of :func:`sinkhorn_solve`.

    Attributes
    ----------
    velocity : Tensor, shape (n, *dim)
        :math:`v(x_i) = \nabla f_{\mu\mu}(x_i) - \nabla f_{\mu\nu}(x_i)` = ``proj_y - proj_x``.
    proj_y : Tensor, shape (n, *dim)
        Entropic barycentric projection onto the target, :math:`\sum_j w^\nu_j(x_i) y_j = x_i - \nabla f_{\mu\nu}(x_i)`.
    proj_x : Tensor, shape (n, *dim)
        Projection onto the particles, :math:`\sum_k w^\mu_k(x_i) x_k = x_i - \nabla f_{\mu\mu}(x_i)`.
    f_xy : Tensor, shape (n,)
        :math:`f_{\mu\nu}` at the particles (cost units).
    g_xy : Tensor, shape (m,)
        :math:`g_{\mu\nu}` at the target samples.
    f_xx : Tensor, shape (n,)
        Symmetric potential :math:`f_{\mu\mu}` at the particles.
    eps : float
        :math:`\varepsilon = \mathrm{blur}^2`.
    n_iter : int
        Iterations at the final ε (after annealing).
    n_anneal : int
        ε-scaling levels run before (0 with a warm start, except on the multiscale backend, which
        anneals its coarse problem anyway).
    marginal_error : float
        L1 marginal violation at the last check, the larger of the two problems'.
    converged : bool
        ``marginal_error <= tol``.
    omega : float
        Over-relaxation factor in use at the end (differs from the argument only with ``adapt_omega``).
    backend : str
        The backend that ran the reductions (``"dense"``, ``"streaming"``, ``"multiscale"``, ``"keops"``;
        prefixed ``"sharded-"`` when the particles were split over processes), after ``"auto"``'s choice.
    """

    velocity: Tensor
    proj_y: Tensor
    proj_x: Tensor
    f_xy: Tensor
    g_xy: Tensor
    f_xx: Tensor
    eps: float
    n_iter: int
    n_anneal: int
    marginal_error: float
    converged: bool
    omega: float = 1.0
    backend: str = "dense"


#: The relative blur of NSGF flows on images (``SinkhornFlowMatcher()`` and the image methods): at the
#: 2D default 0.1, a quarter of the end points of MNIST flows are blends of digits (BENCHMARKS.md §5).
HIGH_DIM_BLUR = 0.05


@dataclass(frozen=True)
class SinkhornOptions:
    r"""The Sinkhorn settings of an NSGF flow, as one frozen object.

    The matcher, NSGF++, the 2D driver and the image CLI take this object instead of re-listing its
    fields; the command-line flags are generated from the fields (their ``metadata["help"]``).

    Attributes
    ----------
    blur : float
        :math:`\sqrt{\varepsilon}`. With ``relative_blur`` (default) a fraction of the target's scale,
        the root-mean-square distance of the target samples to their mean, :meth:`scale_of`, so that one
        value serves 2D toys and images alike; otherwise in the data's length unit (GeomLoss ``p=2``).
    relative_blur : bool
        Read ``blur`` relative to the target's scale (see :meth:`absolute_blur`).
    scaling : float in (0, 1)
        Ratio between successive blur values of the ε-scaling schedule.
    tol : float
        L1 marginal error at which the engine stops. NSGF's targets are minibatch estimates anyway, and on the
        2D tasks 1e-2 trains fields as good as 1e-3 at a fraction of the Sinkhorn time (BENCHMARKS.md §2,
        regime study); pass 1e-4 for a velocity within about 1e-3 of the converged fixed point.
    max_iter : int
        Iteration cap at the final ε.
    omega : float in [1, 2)
        Over-relaxation of the cross problem's updates.
    backend : str
        Which reductions run the loop: ``"auto"`` (by size, dimension, device and free memory, see
        :func:`~torchcfm_nsgf.sinkhorn.backends.choose_backend`), ``"dense"``, ``"streaming"``,
        ``"multiscale"`` (d <= 3) or ``"keops"`` (needs pykeops).
    distributed : bool
        Solve one problem whose particles are split over the processes of ``torch.distributed``'s
        default group (each process passes its own particles and targets; the targets are gathered).
    """

    blur: float = field(
        default=0.1,
        metadata={"help": "sqrt(eps); a fraction of the target's scale unless --no-relative-blur"},
    )
    relative_blur: bool = field(default=True, metadata={"help": "blur relative to the target's RMS radius"})
    scaling: float = field(default=0.9, metadata={"help": "eps-scaling ratio between successive blur values"})
    tol: float = field(default=1e-2, metadata={"help": "L1 marginal error at which Sinkhorn stops"})
    max_iter: int = field(default=1000, metadata={"help": "Sinkhorn iteration cap at the final eps"})
    omega: float = field(default=1.9, metadata={"help": "over-relaxation factor in [1, 2)"})
    backend: str = field(
        default="auto",
        metadata={"help": "auto, dense, streaming, multiscale (d <= 3) or keops (needs pykeops)"},
    )
    distributed: bool = field(
        default=False, metadata={"help": "split each flow's particles over the torch.distributed processes"}
    )

    def __post_init__(self) -> None:
        check_positive(self.blur, "blur")
        if not isinstance(self.relative_blur, bool):
            raise TypeError(f"relative_blur must be a bool, got {type(self.relative_blur).__name__}")
        check_open_unit(self.scaling, "scaling")
        check_positive(self.tol, "tol")
        check_positive(self.max_iter, "max_iter", integer=True)
        if (
            isinstance(self.omega, bool)
            or not isinstance(self.omega, (int, float))
            or not 1.0 <= self.omega < 2.0
        ):
            raise ValueError(f"omega must be a number in [1, 2), got {self.omega!r}")
        check_backend(self.backend)
        if not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be a bool, got {type(self.distributed).__name__}")

    @staticmethod
    def scale_of(y: Tensor) -> float:
        r"""Root-mean-square distance of the samples ``y`` (m, *dim) to their mean, :math:`\sqrt{\operatorname{tr}\,\mathrm{Cov}}`."""
        yf = y.detach().reshape(y.shape[0], -1).double()
        return float((yf - yf.mean(0)).square().sum(1).mean().sqrt())

    def absolute_blur(self, y: Tensor, *, scale: float | None = None) -> float:
        """The blur in the data's unit: ``blur * scale_of(y)`` when ``relative_blur``, else ``blur``.

        ``scale``: the targets' scale when the caller has it (e.g. over all processes' targets), instead of
        ``scale_of(y)``.
        """
        if not self.relative_blur:
            return float(self.blur)
        if scale is None:
            scale = self.scale_of(y)
        if not scale > 0:
            raise ValueError(
                "x1 has zero spread: a relative blur needs target samples that are not all equal"
            )
        return float(self.blur) * scale

    def solve(
        self, x: Tensor, y: Tensor, *, blur: float, warm_start: SinkhornSolution | None = None
    ) -> SinkhornSolution:
        """:func:`sinkhorn_solve` with these settings at the absolute ``blur``."""
        return sinkhorn_solve(
            x,
            y,
            blur=blur,
            scaling=self.scaling,
            tol=self.tol,
            max_iter=self.max_iter,
            omega=self.omega,
            warm_start=warm_start,
            backend=self.backend,
            distributed=self.distributed,
        )

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}``, for generated command-line flags."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _marginal_error(w: Tensor, old: Tensor, new: Tensor, eps: float) -> Tensor:
    """L1 distance between a marginal ``w * exp((old - new)/eps)`` and ``w``, as a 0-d tensor."""
    return (w * torch.expm1((old - new) / eps).abs()).sum()


class _OmegaTuner:
    r"""Raises the over-relaxation factor from the observed convergence rate (cross problem).

    For the two-block (Gauss-Seidel) Sinkhorn iteration linearised at its fixed point, over-relaxation
    by :math:`\omega` turns an eigenvalue :math:`\lambda` of the plain iteration into the largest root
    :math:`\rho` of :math:`(\rho + \omega - 1)^2 = \omega^2 \lambda \rho` (Young's SOR theory), and
    :math:`\omega^\star = 2 / (1 + \sqrt{1 - \lambda})` minimises it (Thibault et al. 2017; Lehmann
    et al. 2021). ``update`` reads the per-iteration decay :math:`\rho` of the marginal error between
    checks; once two consecutive windows agree, it solves the relation for :math:`\lambda` and moves
    :math:`\omega` up to :math:`\omega^\star` (never down: above :math:`\omega^\star` the decay no
    longer reveals :math:`\lambda`). If the error then grows, the last value that worked is restored
    and tuning stops.
    """

    OMEGA_MAX = 1.99

    def __init__(self, omega: float, check_every: int) -> None:
        self.omega = float(omega)
        self.safe = float(omega)
        self.every = check_every
        self.errs: list[float] = []
        self.active = True

    def update(self, err: float) -> float:
        if not self.active or not math.isfinite(err):
            return self.omega
        if self.errs and err > self.errs[-1]:
            if self.omega > self.safe:  # the last raise made things worse: back off and stop tuning
                self.omega = self.safe
                self.active = False
            self.errs = []
            return self.omega
        self.errs.append(err)
        if len(self.errs) < 3:
            return self.omega
        e0, e1, e2 = self.errs[-3:]
        if e0 <= 0.0 or e1 <= 0.0 or e2 <= 0.0:
            return self.omega
        r1 = (e1 / e0) ** (1.0 / self.every)
        r2 = (e2 / e1) ** (1.0 / self.every)
        if not (0.0 < r2 < 1.0) or abs(r2 - r1) > 0.25 * (1.0 - r2):  # not yet a steady geometric decay
            return self.omega
        w = self.omega
        lam = min((r2 + w - 1.0) ** 2 / (w * w * r2), 1.0)
        target = min(2.0 / (1.0 + math.sqrt(1.0 - lam)), self.OMEGA_MAX)
        if target > w + 1e-3:
            self.safe = w
            self.omega = target
            self.errs = []  # measure the new rate before the next change
        return self.omega


def _schedule(max_cost: float, eps: float, scaling: float) -> list[float]:
    """ε-scaling levels: geometric from the largest cost down to (not including) ``eps``, ratio ``scaling**2``."""
    eps0 = max(max_cost, eps)
    n_levels = int(math.ceil(math.log(eps0 / eps) / (-2.0 * math.log(scaling))))
    return [eps0 * scaling ** (2 * k) for k in range(n_levels)]


def _t_xy(be: SinkhornBackend, g: Tensor, e: float) -> Tensor:
    """f = T(g): the softmin over the targets."""
    return be.softmin("xy", be.log_b + g / e, e)


def _t_yx(be: SinkhornBackend, f: Tensor, e: float) -> Tensor:
    """g = T(f): the softmin over the particles."""
    return be.softmin("yx", be.log_a + f / e, e)


def _t_xx(be: SinkhornBackend, p: Tensor, e: float) -> Tensor:
    """The symmetric problem's update on the particles."""
    return be.softmin("xx", be.log_a + p / e, e)


def anneal(be: SinkhornBackend, g: Tensor, p: Tensor, levels: list[float]) -> tuple[Tensor, Tensor]:
    """One Sinkhorn update per ε-scaling level: alternating on the cross problem, averaged on the symmetric."""
    for e in levels:
        g = _t_yx(be, _t_xy(be, g, e), e)
        p = 0.5 * (p + _t_xx(be, p, e))
        be.level_done(g, p, e)
    return g, p


@dataclass
class _LoopState:
    g: Tensor
    p: Tensor
    n_iter: int
    err: float
    omega: float


def _iterate(
    be: SinkhornBackend,
    g: Tensor,
    p: Tensor,
    eps: float,
    *,
    tol: float,
    max_iter: int,
    omega: float,
    tuner: _OmegaTuner | None,
    check_every: int,
) -> _LoopState:
    """Sinkhorn at the final ε until the marginal error is at most ``tol`` or ``max_iter`` iterations ran.

    Plain updates on check iterations (their marginal error is exact for the plan whose rows the velocity
    uses); over-relaxed updates in between (Thibault et al. 2017). The symmetric problem usually converges
    long before the cross one, and it does not depend on the cross potentials: once its error at a check is
    within tol it is neither updated nor re-tested (a third of the work). The particles' share of the errors is summed over processes
    (:meth:`SinkhornBackend.total`), so that every process takes the same decisions.
    """
    # The over-relaxed updates need the current f; a first iteration that is a check computes it anyway.
    first_is_check = check_every == 1 or max_iter == 1 or 1 in be.early_checks
    f = None if first_is_check else _t_xy(be, g, eps)
    err = err_xx = float("inf")
    sym_active = True
    w = float(omega)
    it = 0
    while it < max_iter:
        it += 1
        if it % check_every == 0 or it == max_iter or it in be.early_checks:
            f = _t_xy(be, g, eps)
            g_new = _t_yx(be, f, eps)
            err_xy_t = _marginal_error(be.b, g, g_new, eps)
            if sym_active:
                p_new = _t_xx(be, p, eps)
                err_xx_t = be.total(_marginal_error(be.a, p, p_new, eps))
                err_xy, err_xx = torch.stack((err_xy_t, err_xx_t)).tolist()
                sym_active = err_xx > tol
                p = 0.5 * (p + p_new)
            else:
                # The symmetric problem does not depend on g: once within tol, p stays as it was.
                err_xy = float(err_xy_t)
            err = max(err_xy, err_xx)
            g = g_new
            if err <= tol:
                break
            if tuner is not None:
                w = tuner.update(err_xy)
        else:
            f = torch.lerp(f, _t_xy(be, g, eps), w)
            g = torch.lerp(g, _t_yx(be, f, eps), w)
            if sym_active:
                p = 0.5 * (p + _t_xx(be, p, eps))
    return _LoopState(g=g, p=p, n_iter=it, err=err, omega=w)


def _defaults() -> SinkhornOptions:
    return SinkhornOptions()


def sinkhorn_solve(
    x: Tensor,
    y: Tensor,
    *,
    blur: float | None = None,
    scaling: float | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    warm_start: SinkhornSolution | None = None,
    omega: float | None = None,
    adapt_omega: bool = False,
    check_every: int = 10,
    backend: str | None = None,
    distributed: bool | None = None,
) -> SinkhornSolution:
    r"""Solve the two entropic OT problems behind the Sinkhorn-flow velocity and return the velocity.

    Every setting left at ``None`` takes its value from :class:`SinkhornOptions` (one home for the
    defaults): blur 0.1 of the target's scale, scaling 0.9, tol 1e-2, max_iter 1000, omega 1.9,
    backend ``"auto"``.

    Parameters
    ----------
    x : Tensor, shape (n, *dim)
        Particles (source cloud :math:`\mu = \sum_i a_i \delta_{x_i}`). Images are flattened inside. With
        ``distributed``, this process's share of the particles.
    y : Tensor, shape (m, *dim)
        Target samples (:math:`\nu = \sum_j b_j \delta_{y_j}`), same feature shape, device and dtype family.
        With ``distributed``, this process's share; the problem's target is all processes' samples.
    blur : float, optional
        :math:`\sqrt{\varepsilon}`, in the data's length unit (GeomLoss convention, ``p=2``). Default:
        ``SinkhornOptions().absolute_blur(y)``, i.e. 0.1 times the target's root-mean-square radius.
    scaling : float in (0, 1), optional
        Ratio between successive blur values of the ε-scaling schedule (ε shrinks by ``scaling**2``).
    a, b : Tensor, shape (n,) and (m,), optional
        Non-negative weights summing to one; uniform by default (required uniform with ``distributed``).
    tol : float, optional
        Stop when the L1 marginal error is at most ``tol``. 1e-4 gives a velocity within 1e-3 relative
        error of the converged float64 fixed point (``tests/test_sinkhorn.py``); the default 1e-2 is
        NSGF's working tolerance.
    max_iter : int, optional
        Iteration cap at the final ε; reaching it first emits :class:`SinkhornConvergenceWarning`.
    warm_start : SinkhornSolution, optional
        A previous solution for the same ``n``, ``m`` and ``blur`` (e.g. the previous flow step):
        annealing is skipped and the iteration starts from its potentials (the multiscale backend
        starts from its coarse annealing instead, see :mod:`torchcfm_nsgf.sinkhorn.multiscale`).
    omega : float in [1, 2), optional
        Over-relaxation of the cross problem's updates at the final ε (1 = plain Sinkhorn). Values
        near 2 cut the iteration count several-fold in the small-ε regime; every ``check_every``-th
        update is a plain one, on which convergence is measured.
    adapt_omega : bool
        Raise ``omega`` towards the optimum predicted from the observed convergence rate (see
        ``_OmegaTuner``); a warm start then begins at the previous solution's ``omega``. In float64 this
        cuts the iterations of the small-ε regime 1.6x (d=2, n=256, blur 0.05: 2640 -> 1650). In float32 it
        does not help there: rounding noise in the softmin (relative ``C/ε`` times machine epsilon) is
        amplified about ``1/(2 - omega)``, and the marginal error stalls near 1e-4 instead of falling, so
        it is off by default.
    check_every : int
        Marginal error is evaluated (one scalar device-to-host copy) every ``check_every`` iterations.
    backend : str, optional
        ``"auto"`` (default), ``"dense"``, ``"streaming"``, ``"multiscale"`` (d <= 3) or ``"keops"``
        (needs pykeops); see :mod:`torchcfm_nsgf.sinkhorn.backends`. The solution records the one used.
    distributed : bool, optional
        Split the problem's particles over the processes of ``torch.distributed``'s default group (all
        processes call with their own ``x`` and ``y`` and the same settings); each gets its particles'
        velocity. Default False.

    Returns
    -------
    SinkhornSolution
        Velocity and projections with x's shape, dtype and device; potentials; diagnostics.

    Notes
    -----
    No autograd graph is built (the solve runs under ``torch.no_grad``). Half-precision inputs are
    solved in float32 and the results cast back. The small-ε regime (``blur**2`` far below the squared
    data diameter) needs many iterations at the final ε: read ``marginal_error`` / ``converged`` or watch
    for the warning.
    """
    opts = _defaults()
    scaling = opts.scaling if scaling is None else scaling
    tol = opts.tol if tol is None else tol
    max_iter = opts.max_iter if max_iter is None else max_iter
    omega = opts.omega if omega is None else omega
    backend = opts.backend if backend is None else backend
    distributed = opts.distributed if distributed is None else distributed
    check_same_device(("x", x), ("y", y), ("a", a), ("b", b))
    check_cloud(x, "x")
    check_cloud(y, "y")
    check_same_features(x, y)
    if blur is not None:
        check_positive(blur, "blur")
    check_open_unit(scaling, "scaling")
    check_positive(tol, "tol")
    check_positive(max_iter, "max_iter", integer=True)
    check_positive(check_every, "check_every", integer=True)
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 1.0 <= omega < 2.0:
        raise ValueError(f"omega must be a number in [1, 2), got {omega!r}")
    if not isinstance(adapt_omega, bool):
        raise TypeError(f"adapt_omega must be a bool, got {type(adapt_omega).__name__}")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    check_backend(backend)
    n = x.shape[0]

    out_dtype = x.dtype
    work_dtype = torch.promote_types(x.dtype, y.dtype)
    if work_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32
    with torch.no_grad():
        xf = x.reshape(n, -1).to(work_dtype)
        yf = y.reshape(y.shape[0], -1).to(work_dtype)
        if distributed:
            from .sharded import gather_targets

            if a is not None or b is not None:
                raise ValueError(
                    "a and b must be None with distributed=True (uniform weights over all processes)"
                )
            yf = gather_targets(yf)
        m = yf.shape[0]
        if blur is None:
            blur = opts.absolute_blur(yf)
        _check_warm_start(warm_start, n, m, blur)
        if distributed:
            from .sharded import global_mean, sharded_log_weights

            log_a, log_b = sharded_log_weights(n, m, xf)
            center = global_mean(xf)
        else:
            log_a = check_weights(a, n, "a", xf).log()
            log_b = check_weights(b, m, "b", xf).log()
            center = xf.mean(0)
        # The velocity and the potentials are translation invariant: centre for float accuracy.
        xf = xf - center
        yf = yf - center
        eps = float(blur) ** 2
        be = make_backend(backend, xf, yf, log_a, log_b, distributed=distributed, eps=eps)

        warm = None
        if warm_start is not None:
            warm = (warm_start.g_xy.to(work_dtype), warm_start.f_xx.to(work_dtype))
        g, p, n_anneal = be.start(lambda: _schedule(be.max_cost(), eps, scaling), anneal, warm)

        w = float(omega)
        if adapt_omega and warm_start is not None:
            w = max(w, min(warm_start.omega, _OmegaTuner.OMEGA_MAX))
        tuner = _OmegaTuner(w, check_every) if adapt_omega else None
        state = _iterate(
            be, g, p, eps, tol=tol, max_iter=max_iter, omega=w, tuner=tuner, check_every=check_every
        )
        converged = state.err <= tol
        if not converged:
            warnings.warn(
                f"Sinkhorn stopped at max_iter={max_iter} with marginal error {state.err:.3g} > tol={tol:g} "
                f"(blur={blur:g}); raise max_iter or blur, or loosen tol",
                SinkhornConvergenceWarning,
                stacklevel=2,
            )

        proj_y, f_xy = be.project("xy", be.log_b + state.g / eps, eps)
        proj_x, _ = be.project("xx", be.log_a + state.p / eps, eps)
        velocity = proj_y - proj_x

    shape = x.shape
    return SinkhornSolution(
        velocity=velocity.reshape(shape).to(out_dtype),
        proj_y=(proj_y + center).reshape(shape).to(out_dtype),
        proj_x=(proj_x + center).reshape(shape).to(out_dtype),
        f_xy=f_xy,
        g_xy=state.g,
        f_xx=state.p,
        eps=eps,
        n_iter=state.n_iter,
        n_anneal=n_anneal,
        marginal_error=state.err,
        converged=converged,
        omega=state.omega,
        backend=be.name,
    )


def _check_warm_start(warm_start: SinkhornSolution | None, n: int, m: int, blur: float) -> None:
    if warm_start is None:
        return
    if not isinstance(warm_start, SinkhornSolution):
        raise TypeError(f"warm_start must be a SinkhornSolution, got {type(warm_start).__name__}")
    if warm_start.f_xy.shape[0] != n or warm_start.g_xy.shape[0] != m:
        raise ValueError(
            f"warm_start was computed for (n, m) = ({warm_start.f_xy.shape[0]}, {warm_start.g_xy.shape[0]}), "
            f"not ({n}, {m})"
        )
    if not math.isclose(warm_start.eps, blur**2, rel_tol=1e-9):
        raise ValueError(f"warm_start was computed at blur {math.sqrt(warm_start.eps):g}, not {blur:g}")


def sinkhorn_velocity(
    x: Tensor,
    y: Tensor,
    *,
    blur: float | None = None,
    scaling: float | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    warm_start: SinkhornSolution | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""Velocity of the Sinkhorn gradient flow at every particle: :math:`v(x_i) = \nabla f_{\mu\mu}(x_i) - \nabla f_{\mu\nu}(x_i)`.

    Shorthand for ``sinkhorn_solve(...).velocity``; see :func:`sinkhorn_solve` for the arguments, their
    defaults (from :class:`SinkhornOptions`), the conventions (cost ½‖x−y‖², ε = blur²) and the solver.
    Returns a tensor with x's shape, dtype and device. For a flow, call :func:`sinkhorn_solve` and pass the
    solution as ``warm_start`` to the next step.
    """
    return sinkhorn_solve(
        x,
        y,
        blur=blur,
        scaling=scaling,
        a=a,
        b=b,
        tol=tol,
        max_iter=max_iter,
        warm_start=warm_start,
        backend=backend,
    ).velocity
