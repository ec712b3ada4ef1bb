r"""NSGF as a torchcfm matcher: targets from the simulated empirical Sinkhorn gradient flow.

:class:`SinkhornFlowMatcher` subclasses torchcfm's ``ConditionalFlowMatcher`` and keeps its template
contract, ``sample_location_and_conditional_flow(x0, x1, t=None, return_noise=False) -> (t, xt, ut[, eps])``,
so a torchcfm training loop runs unchanged with only the matcher swapped. Instead of a straight
interpolation, the targets come from NSGF's Algorithm 1: the batch ``x0`` is moved towards ``x1`` by
``n_steps`` explicit-Euler steps of the empirical Sinkhorn-flow velocity (paper eq. 13-14)

.. math::
    X_{k+1} = X_k + \eta\, \hat v_k(X_k), \qquad k = 0, \dots, T-1,

and every particle of every step is a regression pair.

Clock. The flow is put on torchcfm's normalised clock ``t in [0, 1]``: step ``k`` sits at ``t_k = k / T``
and the target velocity is expressed per unit of that clock, ``u_k = T \eta \hat v_k``. Integrating
``dx/dt = u`` from 0 to 1 with ``T`` Euler steps (dt = 1/T) therefore reproduces the simulated flow
exactly, and torchcfm / torchdyn sampling code (which integrates from 0 to 1) works unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from tqdm.auto import tqdm

from ._validation import check_cloud, check_open_unit, check_positive, check_same_device, check_same_features
from .pool import TrajectoryPool
from .sinkhorn import SinkhornConvergenceWarning, SinkhornSolution, sinkhorn_solve

__all__ = ["SinkhornFlowMatcher", "SinkhornTrajectory"]


@dataclass
class SinkhornTrajectory:
    r"""A simulated empirical Sinkhorn flow on the normalised clock.

    Attributes
    ----------
    xs : Tensor, shape (T + 1, n, *dim)
        Positions :math:`X_0, \dots, X_T`.
    us : Tensor, shape (T, n, *dim)
        Velocities on the normalised clock, :math:`u_k = T \eta \hat v_k(X_k)`, so that
        ``xs[k + 1] == xs[k] + us[k] / T``.
    ts : Tensor, shape (T + 1,)
        Times ``k / T``.
    marginal_errors : list of float
        The engine's achieved marginal error at each step.
    n_iters : list of int
        Sinkhorn iterations (annealing levels included) at each step.
    """

    xs: Tensor
    us: Tensor
    ts: Tensor
    marginal_errors: list[float] = field(default_factory=list)
    n_iters: list[int] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return self.us.shape[0]


class SinkhornFlowMatcher(ConditionalFlowMatcher):
    r"""Neural Sinkhorn Gradient Flow (NSGF) targets behind torchcfm's matcher interface.

    Parameters
    ----------
    n_steps : int
        Number of Euler steps ``T`` of the simulated flow (paper: 100 in 2D).
    step_size : float
        Euler step ``eta`` in the flow's own time (paper: 0.02 in 2D).
    blur, scaling : float
        Sinkhorn settings, GeomLoss ``p=2`` convention: cost ½‖x−y‖², ε = blur².
    tol, max_iter, omega : float, int, float
        Passed to :func:`~torchcfm_nsgf.sinkhorn_solve`. The default ``tol=1e-3`` (L1 marginal error)
        is looser than the engine's: the regression targets are minibatch estimates anyway.
    pool : TrajectoryPool, optional
        Experience replay (paper Algorithm 1). When given, each call draws its batch from the pool,
        which is refreshed with one newly simulated flow of the call's ``(x0, x1)`` every
        ``refresh_every`` calls (and whenever it holds fewer items than the batch).
    refresh_every : int
        See ``pool``.
    generator : torch.Generator, optional
        CPU generator for the random step indices (the pool has its own generator).
    progress : bool
        Progress bar over the steps of each simulated flow.

    Notes
    -----
    ``sigma`` of the base class is 0: the NSGF path is deterministic, and the ``eps`` returned with
    ``return_noise=True`` is a zero tensor (``xt = mu_t + 0 * eps``).
    """

    def __init__(
        self,
        n_steps: int = 100,
        step_size: float = 0.02,
        blur: float = 0.05,
        scaling: float = 0.9,
        *,
        tol: float = 1e-3,
        max_iter: int = 5000,
        omega: float = 1.9,
        pool: TrajectoryPool | None = None,
        refresh_every: int = 1,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(sigma=0.0)
        check_positive(n_steps, "n_steps", integer=True)
        check_positive(step_size, "step_size")
        check_positive(blur, "blur")
        check_open_unit(scaling, "scaling")
        check_positive(tol, "tol")
        check_positive(max_iter, "max_iter", integer=True)
        check_positive(refresh_every, "refresh_every", integer=True)
        if pool is not None and not isinstance(pool, TrajectoryPool):
            raise TypeError(f"pool must be a TrajectoryPool or None, got {type(pool).__name__}")
        self.n_steps = n_steps
        self.step_size = float(step_size)
        self.blur = float(blur)
        self.scaling = float(scaling)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.omega = float(omega)
        self.pool = pool
        self.refresh_every = refresh_every
        self.generator = generator
        self.progress = progress
        self._calls = 0

    # ------------------------------------------------------------------ simulation
    def _check_pair(self, x0: Tensor, x1: Tensor) -> None:
        check_same_device(("x0", x0), ("x1", x1))
        check_cloud(x0, "x0")
        check_cloud(x1, "x1")
        check_same_features(x0, x1, "x0", "x1")

    def simulate(self, x0: Tensor, x1: Tensor) -> SinkhornTrajectory:
        r"""Simulate the empirical Sinkhorn flow of the particles ``x0`` towards the samples ``x1``.

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source particles :math:`X_0`.
        x1 : Tensor, shape (m, *dim)
            Target samples (``m`` may differ from ``n``).

        Returns
        -------
        SinkhornTrajectory
            Positions (T+1, n, *dim), normalised-clock velocities (T, n, *dim), times (T+1,), on x0's
            device and dtype. Each step's engine call is warm-started from the previous one.
        """
        self._check_pair(x0, x1)
        T = self.n_steps
        xs = torch.empty((T + 1, *x0.shape), dtype=x0.dtype, device=x0.device)
        us = torch.empty((T, *x0.shape), dtype=x0.dtype, device=x0.device)
        xs[0] = x0.detach()
        sol: SinkhornSolution | None = None
        errors: list[float] = []
        iters: list[int] = []
        capped = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            for k in tqdm(range(T), desc="Sinkhorn flow", disable=not self.progress, leave=False):
                sol = sinkhorn_solve(
                    xs[k],
                    x1.detach(),
                    blur=self.blur,
                    scaling=self.scaling,
                    tol=self.tol,
                    max_iter=self.max_iter,
                    omega=self.omega,
                    warm_start=sol,
                )
                capped += not sol.converged
                errors.append(sol.marginal_error)
                iters.append(sol.n_iter + sol.n_anneal)
                us[k] = (T * self.step_size) * sol.velocity
                xs[k + 1] = xs[k] + self.step_size * sol.velocity
        if capped:
            warnings.warn(
                f"{capped} of {T} flow steps hit max_iter={self.max_iter} before tol={self.tol:g} "
                f"(largest marginal error {max(errors):.3g}); raise max_iter or blur",
                SinkhornConvergenceWarning,
                stacklevel=2,
            )
        ts = torch.arange(T + 1, dtype=x0.dtype, device=x0.device) / T
        return SinkhornTrajectory(xs=xs, us=us, ts=ts, marginal_errors=errors, n_iters=iters)

    def fill_pool(self, x0: Tensor, x1: Tensor) -> SinkhornTrajectory:
        """Simulate one flow of ``(x0, x1)`` and add all its ``T * n`` (t, x, u) items to the pool."""
        if self.pool is None:
            raise ValueError("fill_pool needs a pool: construct the matcher with pool=TrajectoryPool(...)")
        traj = self.simulate(x0, x1)
        T, n = traj.us.shape[:2]
        self.pool.add(
            traj.ts[:-1].repeat_interleave(n),
            traj.xs[:-1].reshape(T * n, *x0.shape[1:]),
            traj.us.reshape(T * n, *x0.shape[1:]),
        )
        return traj

    # ------------------------------------------------------------------ torchcfm interface
    def sample_location_and_conditional_flow(
        self, x0: Tensor, x1: Tensor, t: Tensor | None = None, return_noise: bool = False
    ):
        r"""Regression pairs ``(t, xt, ut)`` from the simulated Sinkhorn flow of ``x0`` towards ``x1``.

        Parameters
        ----------
        x0 : Tensor, shape (bs, *dim)
            Source minibatch.
        x1 : Tensor, shape (m, *dim)
            Target minibatch (``m`` may differ from ``bs``).
        t : Tensor, shape (bs,), optional
            Times in [0, 1]. When ``None``, particle ``i`` gets a uniformly drawn step ``k_i`` and
            ``t_i = k_i / T``. A given ``t`` may lie off the grid: ``xt`` is then the point at ``t`` on
            the Euler polyline, ``X_k + (tT - k) u_k / T`` with ``k = min(floor(tT), T - 1)``, and ``ut``
            the polyline's velocity ``u_k`` there (its right derivative; ``t = 1`` gives ``X_T`` and
            ``u_{T-1}``). Not allowed with a pool.
        return_noise : bool
            Also return ``eps``, a zero tensor (the path is deterministic).

        Returns
        -------
        t : Tensor, shape (bs,)
        xt : Tensor, shape (bs, *dim)
        ut : Tensor, shape (bs, *dim)
            Target velocity on the normalised clock.
        eps : Tensor, shape (bs, *dim), only with ``return_noise``
        """
        self._check_pair(x0, x1)
        bs = x0.shape[0]
        if self.pool is not None:
            if t is not None:
                raise ValueError("t cannot be given when the matcher serves its batches from a pool")
            if self._calls % self.refresh_every == 0 or len(self.pool) < bs:
                self.fill_pool(x0, x1)
            t_out, xt, ut = self.pool.sample(bs, device=x0.device, dtype=x0.dtype)
        else:
            T = self.n_steps
            if t is None:
                k = torch.randint(0, T, (bs,), generator=self.generator).to(x0.device)
                frac = torch.zeros(bs, dtype=x0.dtype, device=x0.device)
                t_out = k.to(x0.dtype) / T
            else:
                if not isinstance(t, Tensor) or t.shape != (bs,):
                    raise ValueError(
                        f"t must be a tensor of shape ({bs},) to match x0, got "
                        f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                    )
                if not bool(((t >= 0) & (t <= 1)).all()):
                    raise ValueError("t must lie in [0, 1] (and not be NaN)")
                t_out = t.to(device=x0.device, dtype=x0.dtype)
                k = (t_out * T).floor().long().clamp_(0, T - 1)
                frac = t_out * T - k.to(x0.dtype)
            traj = self.simulate(x0, x1)
            idx = torch.arange(bs, device=x0.device)
            ut = traj.us[k, idx]
            pad = (-1,) + (1,) * (x0.dim() - 1)
            xt = traj.xs[k, idx] + frac.reshape(pad) * ut / T
        self._calls += 1
        if return_noise:
            return t_out, xt, ut, torch.zeros_like(xt)
        return t_out, xt, ut

    def state_dict(self) -> dict:
        """Resumable state: the call counter (which decides pool refreshes), the generator and the pool."""
        return {
            "calls": self._calls,
            "generator": None if self.generator is None else self.generator.get_state(),
            "pool": None if self.pool is None else self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (the matcher must have been built the same way)."""
        self._calls = int(state["calls"])
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        if state.get("pool") is not None:
            if self.pool is None:
                raise ValueError("state holds a pool but this matcher has none")
            self.pool.load_state_dict(state["pool"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_steps={self.n_steps}, step_size={self.step_size:g}, blur={self.blur:g}, "
            f"scaling={self.scaling:g}, tol={self.tol:g}, pool={'yes' if self.pool is not None else 'no'})"
        )

    @property
    def flow_time(self) -> float:
        """Total time ``T * eta`` of the simulated flow in its own units."""
        return self.n_steps * self.step_size
