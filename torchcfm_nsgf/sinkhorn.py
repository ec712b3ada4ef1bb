r"""The Sinkhorn velocity engine: the empirical velocity of the Sinkhorn Wasserstein gradient flow.

Conventions (GeomLoss's ``p=2``, so that hyper-parameters quoted as ``blur``/``scaling`` transfer):

* cost :math:`c(x, y) = \tfrac12 \|x - y\|^2`, entropic regularisation :math:`\varepsilon = \mathrm{blur}^2`;
* :math:`W_\varepsilon(\mu, \nu) = \min_\pi \int c\,d\pi + \varepsilon\,\mathrm{KL}(\pi \,\|\, \mu\otimes\nu)`
  with dual potentials :math:`(f_{\mu\nu}, g_{\mu\nu})`;
* Sinkhorn divergence :math:`S_\varepsilon(\mu,\nu) = W_\varepsilon(\mu,\nu) - \tfrac12 W_\varepsilon(\mu,\mu)
  - \tfrac12 W_\varepsilon(\nu,\nu)`.

The velocity of the Wasserstein gradient flow of :math:`\mu \mapsto S_\varepsilon(\mu, \nu)` (NSGF paper,
Theorem 1; Feydy et al. 2019, eq. 26) is

.. math::
    v(x) = \nabla f_{\mu\mu}(x) - \nabla f_{\mu\nu}(x)
         = \sum_j w^{\nu}_j(x)\, y_j - \sum_k w^{\mu}_k(x)\, x_k,

with the soft assignments :math:`w^{\nu}_j(x) = \mathrm{softmax}_j(\log b_j + (g_{\mu\nu,j} - c(x, y_j))/\varepsilon)`
and :math:`w^{\mu}_k(x) = \mathrm{softmax}_k(\log a_k + (f_{\mu\mu,k} - c(x, x_k))/\varepsilon)`: the entropic
barycentric projection onto the target minus the projection onto the particles themselves. For uniform
weights this equals :math:`-n \nabla_{x_i} S_\varepsilon(\mu_n, \nu)`.

Only the two potentials that the velocity needs are solved for (the cross problem and the symmetric
problem on the particles); the target's own symmetric problem, which GeomLoss solves for the loss value,
does not enter the velocity.

Solver. Log-domain Sinkhorn, stable for any data scale:

1. ε-scaling: ε runs geometrically from the largest cost in the problem down to ``blur**2`` with ratio
   ``scaling**2`` (GeomLoss's schedule), one Sinkhorn update per level;
2. at ``ε = blur**2`` the updates continue until the marginal error (below) is at most ``tol`` or
   ``max_iter`` iterations have run; the cap raises a :class:`SinkhornConvergenceWarning`.

The cross problem uses alternating (Gauss-Seidel) updates, the symmetric problem the averaged update
:math:`f \leftarrow \tfrac12 (f + T(f))`. The marginal error is the L1 distance between the plan's
marginal and its prescribed weights (a total mass, in [0, 2]), the larger of the two problems'.

With ``warm_start`` (the solution of the previous, nearby flow step) the annealing is skipped and the
iteration starts from the previous potentials: consecutive flow steps barely move the particles.

Why not POT: ``ot.sinkhorn(method="sinkhorn_log")`` has no ε-scaling and solves one problem per call;
at d=2, blur 0.3 it needed 1061 + 231 iterations (4.4 s) where this engine needed 33 + 60 (0.24 s) at
n=256, and did not converge within 60 s at n=1024 (``benchmarks/sinkhorn_engine.py``, BENCHMARKS.md). At
large ε (image data, blur 2) it takes 0.9x-2.2x this engine's time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from ._validation import (
    check_cloud,
    check_open_unit,
    check_positive,
    check_same_device,
    check_same_features,
    check_weights,
)

__all__ = [
    "HIGH_DIM_BLUR",
    "SinkhornConvergenceWarning",
    "SinkhornOptions",
    "SinkhornSolution",
    "sinkhorn_solve",
    "sinkhorn_velocity",
]

# Below this many features the cost is formed coordinate by coordinate (exact for nearby points);
# above it through one matrix product, after centring the clouds to limit cancellation.
_DIRECT_COST_MAX_DIM = 8


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
        ε-scaling levels run before (0 with a warm start).
    marginal_error : float
        L1 marginal violation at the last check, the larger of the two problems'.
    converged : bool
        ``marginal_error <= tol``.
    omega : float
        Over-relaxation factor in use at the end (differs from the argument only with ``adapt_omega``).
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
        L1 marginal error at which the engine stops. Looser than :func:`sinkhorn_solve`'s 1e-4: NSGF's
        targets are minibatch estimates anyway, and on the 2D tasks 1e-2 trains fields as good as 1e-3 at a
        fraction of the Sinkhorn time (BENCHMARKS.md, regime study).
    max_iter : int
        Iteration cap at the final ε.
    omega : float in [1, 2)
        Over-relaxation of the cross problem's updates.
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

    @staticmethod
    def scale_of(y: Tensor) -> float:
        r"""Root-mean-square distance of the samples ``y`` (m, *dim) to their mean, :math:`\sqrt{\operatorname{tr}\,\mathrm{Cov}}`."""
        yf = y.detach().reshape(y.shape[0], -1).double()
        return float((yf - yf.mean(0)).square().sum(1).mean().sqrt())

    def absolute_blur(self, y: Tensor) -> float:
        """The blur in the data's unit: ``blur * scale_of(y)`` when ``relative_blur``, else ``blur``."""
        if not self.relative_blur:
            return float(self.blur)
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
        )

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field name: help text}``, for generated command-line flags."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _half_sq_dist(x: Tensor, y: Tensor, same: bool = False) -> Tensor:
    """:math:`C_{ij} = \\tfrac12\\|x_i - y_j\\|^2` for flattened clouds x (n, d), y (m, d)."""
    d = x.shape[1]
    if d <= _DIRECT_COST_MAX_DIM:
        C = torch.zeros(x.shape[0], y.shape[0], dtype=x.dtype, device=x.device)
        for k in range(d):
            C.add_((x[:, k, None] - y[None, :, k]).square_())
        return C.mul_(0.5)
    C = torch.addmm(
        0.5 * (x * x).sum(1, keepdim=True) + 0.5 * (y * y).sum(1)[None, :], x, y.T, alpha=-1.0
    ).clamp_min_(0.0)
    if same:
        C.fill_diagonal_(0.0)
    return C


def _softmin(C: Tensor, h: Tensor, eps: float, buf: Tensor) -> Tensor:
    r""":math:`-\varepsilon \log \sum_j \exp(h_j - C_{ij}/\varepsilon)` for C (n, m), h (m,) -> (n,).

    ``buf`` is scratch space of at least n*m elements: reusing it avoids allocating (and page-faulting)
    an n x m matrix at every iteration, which costs more than the arithmetic on CPU.
    """
    z = buf[: C.numel()].view_as(C)
    torch.add(h[None, :], C, alpha=-1.0 / eps, out=z)
    zmax = z.amax(dim=1)
    z.sub_(zmax[:, None]).exp_()
    return -eps * (zmax + z.sum(1).log())


def _soft_projection(C: Tensor, h: Tensor, eps: float, pts: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
    r"""Rows :math:`w_{ij} = \mathrm{softmax}_j(h_j - C_{ij}/\varepsilon)` applied to pts (m, d).

    Returns the projection (n, d) and the matching softmin (n,), as :func:`_softmin` would.
    """
    z = buf[: C.numel()].view_as(C)
    torch.add(h[None, :], C, alpha=-1.0 / eps, out=z)
    zmax = z.amax(dim=1)
    z.sub_(zmax[:, None]).exp_()
    s = z.sum(1)
    proj = (z @ pts).div_(s[:, None])
    return proj, -eps * (zmax + s.log())


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


def sinkhorn_solve(
    x: Tensor,
    y: Tensor,
    *,
    blur: float = 0.05,
    scaling: float = 0.9,
    a: Tensor | None = None,
    b: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 5000,
    warm_start: SinkhornSolution | None = None,
    omega: float = 1.9,
    adapt_omega: bool = False,
    check_every: int = 10,
) -> SinkhornSolution:
    r"""Solve the two entropic OT problems behind the Sinkhorn-flow velocity and return the velocity.

    Parameters
    ----------
    x : Tensor, shape (n, *dim)
        Particles (source cloud :math:`\mu = \sum_i a_i \delta_{x_i}`). Images are flattened inside.
    y : Tensor, shape (m, *dim)
        Target samples (:math:`\nu = \sum_j b_j \delta_{y_j}`), same feature shape, device and dtype family.
    blur : float
        :math:`\sqrt{\varepsilon}`, in the data's length unit (GeomLoss convention, ``p=2``).
    scaling : float in (0, 1)
        Ratio between successive blur values of the ε-scaling schedule (ε shrinks by ``scaling**2``).
    a, b : Tensor, shape (n,) and (m,), optional
        Non-negative weights summing to one; uniform by default.
    tol : float
        Stop when the L1 marginal error is at most ``tol``. The default gives a velocity within 1e-3
        relative error of the converged float64 fixed point (``tests/test_sinkhorn.py``).
    max_iter : int
        Iteration cap at the final ε; reaching it first emits :class:`SinkhornConvergenceWarning`.
    warm_start : SinkhornSolution, optional
        A previous solution for the same ``n``, ``m`` and ``blur`` (e.g. the previous flow step):
        annealing is skipped and the iteration starts from its potentials.
    omega : float in [1, 2)
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

    Returns
    -------
    SinkhornSolution
        Velocity and projections with x's shape, dtype and device; potentials; diagnostics.

    Notes
    -----
    No autograd graph is built (the solve runs under ``torch.no_grad``). Half-precision inputs are
    solved in float32 and the results cast back. The small-ε regime (``blur**2`` far below the squared
    data diameter) needs many iterations at the final ε: the default cap allows 5000; read
    ``marginal_error`` / ``converged`` or watch for the warning.
    """
    check_same_device(("x", x), ("y", y), ("a", a), ("b", b))
    check_cloud(x, "x")
    check_cloud(y, "y")
    check_same_features(x, y)
    check_positive(blur, "blur")
    check_open_unit(scaling, "scaling")
    check_positive(tol, "tol")
    check_positive(max_iter, "max_iter", integer=True)
    check_positive(check_every, "check_every", integer=True)
    if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not 1.0 <= omega < 2.0:
        raise ValueError(f"omega must be a number in [1, 2), got {omega!r}")
    if not isinstance(adapt_omega, bool):
        raise TypeError(f"adapt_omega must be a bool, got {type(adapt_omega).__name__}")
    n, m = x.shape[0], y.shape[0]
    if warm_start is not None:
        if not isinstance(warm_start, SinkhornSolution):
            raise TypeError(f"warm_start must be a SinkhornSolution, got {type(warm_start).__name__}")
        if warm_start.f_xy.shape[0] != n or warm_start.g_xy.shape[0] != m:
            raise ValueError(
                f"warm_start was computed for (n, m) = ({warm_start.f_xy.shape[0]}, {warm_start.g_xy.shape[0]}), "
                f"not ({n}, {m})"
            )
        if not math.isclose(warm_start.eps, blur**2, rel_tol=1e-9):
            raise ValueError(f"warm_start was computed at blur {math.sqrt(warm_start.eps):g}, not {blur:g}")

    out_dtype = x.dtype
    work_dtype = torch.promote_types(x.dtype, y.dtype)
    if work_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32
    with torch.no_grad():
        xf = x.reshape(n, -1).to(work_dtype)
        yf = y.reshape(m, -1).to(work_dtype)
        a_ = check_weights(a, n, "a", xf)
        b_ = check_weights(b, m, "b", xf)
        # The velocity and the potentials are translation invariant: centre for float accuracy.
        center = xf.mean(0)
        xf = xf - center
        yf = yf - center
        C_xy = _half_sq_dist(xf, yf)
        C_yx = C_xy.T.contiguous()
        C_xx = _half_sq_dist(xf, xf, same=True)
        log_a, log_b = a_.log(), b_.log()
        eps = float(blur) ** 2
        buf = torch.empty(max(n * m, n * n), dtype=work_dtype, device=xf.device)

        def t_xy(g_: Tensor, e: float) -> Tensor:  # f = T(g): the softmin over the target
            return _softmin(C_xy, log_b + g_ / e, e, buf)

        def t_yx(f_: Tensor, e: float) -> Tensor:  # g = T(f): the softmin over the particles
            return _softmin(C_yx, log_a + f_ / e, e, buf)

        def t_xx(p_: Tensor, e: float) -> Tensor:  # symmetric problem on the particles
            return _softmin(C_xx, log_a + p_ / e, e, buf)

        if warm_start is not None:
            g = warm_start.g_xy.to(work_dtype)
            p = warm_start.f_xx.to(work_dtype)
            n_anneal = 0
        else:
            # ε-scaling from the largest cost in the problem down to blur**2, one update per level.
            eps0 = max(float(torch.maximum(C_xy.max(), C_xx.max())), eps)
            n_levels = int(math.ceil(math.log(eps0 / eps) / (-2.0 * math.log(scaling))))
            g = torch.zeros(m, dtype=work_dtype, device=xf.device)
            p = torch.zeros(n, dtype=work_dtype, device=xf.device)
            for k in range(n_levels):
                e = eps0 * scaling ** (2 * k)
                g = t_yx(t_xy(g, e), e)
                p = 0.5 * (p + t_xx(p, e))
            n_anneal = n_levels

        # Final ε. Plain updates on check iterations (their marginal error is exact for the plan
        # whose rows the velocity uses); over-relaxed updates in between (Thibault et al. 2017).
        # The symmetric problem usually converges long before the cross one: while its error at the
        # last check is within tol its updates pause (a third of the work), and each check re-tests it.
        f = t_xy(g, eps)
        err = float("inf")
        sym_active = True
        w = float(omega)
        if adapt_omega and warm_start is not None:
            w = max(w, min(warm_start.omega, _OmegaTuner.OMEGA_MAX))
        tuner = _OmegaTuner(w, check_every) if adapt_omega else None
        it = 0
        while it < max_iter:
            it += 1
            if it % check_every == 0 or it == max_iter:
                f = t_xy(g, eps)
                g_new = t_yx(f, eps)
                p_new = t_xx(p, eps)
                err_xy, err_xx = torch.stack(
                    (_marginal_error(b_, g, g_new, eps), _marginal_error(a_, p, p_new, eps))
                ).tolist()
                err = max(err_xy, err_xx)
                sym_active = err_xx > tol
                g = g_new
                p = 0.5 * (p + p_new)
                if err <= tol:
                    break
                if tuner is not None:
                    w = tuner.update(err_xy)
            else:
                f = torch.lerp(f, t_xy(g, eps), w)
                g = torch.lerp(g, t_yx(f, eps), w)
                if sym_active:
                    p = 0.5 * (p + t_xx(p, eps))
        converged = err <= tol
        if not converged:
            warnings.warn(
                f"Sinkhorn stopped at max_iter={max_iter} with marginal error {err:.3g} > tol={tol:g} "
                f"(blur={blur:g}); raise max_iter or blur, or loosen tol",
                SinkhornConvergenceWarning,
                stacklevel=2,
            )

        proj_y, f_xy = _soft_projection(C_xy, log_b + g / eps, eps, yf, buf)
        proj_x, _ = _soft_projection(C_xx, log_a + p / eps, eps, xf, buf)
        velocity = proj_y - proj_x

    shape = x.shape
    return SinkhornSolution(
        velocity=velocity.reshape(shape).to(out_dtype),
        proj_y=(proj_y + center).reshape(shape).to(out_dtype),
        proj_x=(proj_x + center).reshape(shape).to(out_dtype),
        f_xy=f_xy,
        g_xy=g,
        f_xx=p,
        eps=eps,
        n_iter=it,
        n_anneal=n_anneal,
        marginal_error=err,
        converged=converged,
        omega=w,
    )


def sinkhorn_velocity(
    x: Tensor,
    y: Tensor,
    *,
    blur: float = 0.05,
    scaling: float = 0.9,
    a: Tensor | None = None,
    b: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 5000,
    warm_start: SinkhornSolution | None = None,
) -> Tensor:
    r"""Velocity of the Sinkhorn gradient flow at every particle: :math:`v(x_i) = \nabla f_{\mu\mu}(x_i) - \nabla f_{\mu\nu}(x_i)`.

    Shorthand for ``sinkhorn_solve(...).velocity``; see :func:`sinkhorn_solve` for the arguments,
    the conventions (cost ½‖x−y‖², ε = blur²) and the solver. Returns a tensor with x's shape, dtype
    and device. For a flow, call :func:`sinkhorn_solve` and pass the solution as ``warm_start`` to
    the next step.
    """
    return sinkhorn_solve(
        x, y, blur=blur, scaling=scaling, a=a, b=b, tol=tol, max_iter=max_iter, warm_start=warm_start
    ).velocity
