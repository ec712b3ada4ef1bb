r"""NSGF as a torchcfm matcher: targets from the simulated empirical Sinkhorn gradient flow.

:class:`SinkhornFlowMatcher` subclasses torchcfm's ``ConditionalFlowMatcher`` and keeps its template
contract, ``sample_location_and_conditional_flow(x0, x1, t=None, return_noise=False) -> (t, xt, ut[, eps])``,
so a torchcfm training loop runs unchanged with only the matcher swapped. Instead of a straight line between
the caller's ``x0[i]`` and ``x1[i]``, the targets come from NSGF's Algorithm 1: the batch ``x0`` is moved
towards ``x1`` by ``flow_steps`` explicit-Euler steps of the empirical Sinkhorn-flow velocity (paper eq. 13-14)

.. math::
    X_{k+1} = X_k + \eta_k\, \hat v_k(X_k), \qquad k = 0, \dots, T-1.

With :math:`\eta = 1` one step moves each particle by (its entropic projection onto the target) − (its
projection onto the particles): a debiased entropic OT map, so the discrete flow is close to the target after
one to three steps (``../BENCHMARKS.md``), whereas small steps follow the continuous flow, whose speed decays
exponentially near the target.

Clock. Every path is put on torchcfm's normalised clock ``t in [0, 1]``:

* ``path="straight"`` (default): the segment from :math:`X_0` to :math:`X_T`, ``xt = X_0 + t (X_T - X_0)``,
  ``ut = X_T - X_0``. The velocity is constant along each path, so a field trained on it is valid at every
  ``t`` and any NFE; the flow's ``T`` steps only choose the end point.
* ``path="polyline"``: the Euler polyline, step ``k`` on ``[k/T, (k+1)/T]`` with the paper's velocity
  :math:`u_k = T \eta_k \hat v_k(X_k)` (velocity-field matching at every ``t``). The velocity jumps at the
  grid times (a large first step, small later ones), which a network smooth in ``t`` blends.
* ``path="grid"``: the paper's Algorithm 1, the pairs :math:`(k/T, X_k, u_k)` only.

Euler with ``T`` steps of ``dx/dt = ut`` reproduces the simulated :math:`X_T` exactly for every path (and any
number of steps for ``"straight"``), so torchcfm / torchdyn sampling code works unchanged.

Class-conditional (guided) targets: :meth:`SinkhornFlowMatcher.guided_sample_location_and_conditional_flow`
has torchcfm's signature and return convention ``(t, xt, ut, y0, y1[, eps])``. A Sinkhorn flow of a mixed
batch would pull every particle towards all classes; the guided flow runs one Sinkhorn flow per class, each
moving the particles assigned to class ``c`` towards the samples of ``x1`` labelled ``c``
(:meth:`SinkhornFlowMatcher.simulate_guided`), so no target ever pulls a particle towards another class.

This module is longer than the package's others on purpose: it holds one class whose parts (torchcfm's
template, the flow, the paths, the pool's cadence and the state it keeps between calls) are read together.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from tqdm.auto import tqdm

from ._progress import bar_disable
from ._validation import (
    check_cloud,
    check_labels,
    check_non_negative,
    check_positive,
    check_same_device,
    check_same_features,
)
from .pool import TrajectoryPool
from .sampling import SampleResult, default_steps, odeint_sample
from .sinkhorn import HIGH_DIM_BLUR, SinkhornConvergenceWarning, SinkhornOptions, SinkhornSolution

__all__ = ["HIGH_DIM_FEATURES", "PATHS", "SinkhornFlowMatcher", "SinkhornTrajectory"]

#: The targets the matcher can serve (``path=``): ``"straight"``, ``"polyline"`` or ``"grid"``.
PATHS = ("straight", "polyline", "grid")
Path = Literal["straight", "polyline", "grid"]

# The pool built by pool="auto": bounded in items and in bytes (about 24 KiB per CIFAR-10 item).
AUTO_POOL_ITEMS = 1_000_000
AUTO_POOL_BYTES = 2**30
# Projected Sinkhorn seconds per call above which the matcher warns once that it will be slow.
SLOW_CALL_S = 1.0
# SinkhornFlowMatcher() uses HIGH_DIM_BLUR on data with more than this many features per sample.
HIGH_DIM_FEATURES = 16
# A call's targets count as a new distribution when their mean lies more than this many of the pool's
# scales (plus a sampling allowance that shrinks with the batch) from the mean of the pool's latest flow,
# or when their scale differs from that flow's by more than this factor.
DRIFT_SCALES = 2.0
DRIFT_SCALE_RATIO = 3.0


@dataclass
class SinkhornTrajectory:
    r"""A simulated empirical Sinkhorn flow on the normalised clock.

    Attributes
    ----------
    xs : Tensor, shape (T + 1, n, *dim)
        Positions :math:`X_0, \dots, X_T`.
    us : Tensor, shape (T, n, *dim)
        Velocities of the Euler polyline on the normalised clock, :math:`u_k = T \eta_k \hat v_k(X_k)`, so
        that ``xs[k + 1] == xs[k] + us[k] / T``.
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
    def flow_steps(self) -> int:
        return self.us.shape[0]


class SinkhornFlowMatcher(ConditionalFlowMatcher):
    r"""Neural Sinkhorn Gradient Flow (NSGF) targets behind torchcfm's matcher interface.

    ``SinkhornFlowMatcher()`` with no arguments is meant to be good in torchcfm's canonical loop, in 2D
    (batch 256) and on images (batch 128): two Sinkhorn steps of size 1 at a blur of 0.1 times the target's
    scale (0.05 on images, see ``sinkhorn``), straight targets from each particle to its end point, served
    from a pool that a new flow of the call's batch refreshes every ``refresh_every`` calls. BENCHMARKS.md
    has the study behind these defaults.

    Parameters
    ----------
    sigma : float
        Width of Gaussian noise around the path, as in every torchcfm matcher: ``xt = mu_t + sigma * eps``
        with ``eps ~ N(0, I)`` and ``ut`` the path's velocity (torchcfm's constant-σ convention). Default 0.
    flow_steps : int
        Number of Euler steps ``T`` of the simulated flow.
    step_size : float or sequence of float
        Euler step ``eta`` in the flow's own time, or one per step (length ``flow_steps``), e.g. a large
        first step and smaller later ones.
    path : {"straight", "polyline", "grid"}
        Which targets are served (module docstring). ``"straight"`` is the default because its velocity is
        continuous in ``t``, so the learned field is right at every NFE; ``"grid"`` is the paper's.
    sinkhorn : SinkhornOptions, optional
        Engine settings (blur, relative or absolute, scaling, tol, max_iter, omega). A relative blur is
        resolved for every simulated flow from that flow's own targets (:meth:`flow_blur`), so no earlier
        call fixes it; :attr:`blur` is the absolute blur of the latest flow. An absolute blur
        (``relative_blur=False``) is used as given. Default: ``SinkhornOptions()``, whose relative blur 0.1
        is replaced by ``HIGH_DIM_BLUR`` (0.05) for targets with more than ``HIGH_DIM_FEATURES`` (16)
        features per sample: at 0.1 many end points of image flows are blends of two or more images rather
        than images (BENCHMARKS.md §5), while in 2D a blend of nearby samples is still on the target's
        support.
    pool : TrajectoryPool, "auto" or None
        Experience replay (paper Algorithm 1). ``"auto"`` (default) builds an in-memory pool at the first call
        on ``x0``'s device, bounded by one million items and 1 GiB, which grows with what it holds. With a
        pool, each call draws its batch from it, and a newly simulated flow of the call's ``(x0, x1)`` is
        added on the first call and every ``refresh_every`` calls (and whenever the pool holds fewer items
        than the batch). ``None`` simulates a new flow on every call.
    refresh_every : int
        See ``pool``. With ``flow_size``, the calls between two flows are ``refresh_every`` times the
        particles of the latest flow over the call's batch size, so that every flow serves
        ``refresh_every`` samples per particle whatever its size.
    flow_size : int, optional
        Particles of each simulated flow, decoupled from the batch: the matcher keeps the latest
        ``flow_size`` rows of the calls' ``x0`` and ``x1`` (and of ``y1`` for guided calls) and, when a
        flow is due and that many are kept, simulates one flow of them (NSGF's mean-field limit: a flow
        of ``n`` particles carries the bias of ``n`` samples). Until then, flows are of the call's batch.
        ``None`` (default): every flow is of one call's batch.
    balanced : bool
        Guided calls only (:meth:`guided_sample_location_and_conditional_flow`): serve class-balanced batches
        from the pool (equal numbers per class it holds) instead of uniform ones, which follow the classes'
        frequencies in the data.
    generator : torch.Generator, optional
        CPU generator for the matcher's draws (times, steps, noise, and the seed of an ``"auto"`` pool).
    progress : bool
        Progress bar over the steps of each simulated flow.

    Notes
    -----
    The served rows are **not aligned with the caller's** ``x1``: row ``i`` of ``xt`` comes from a particle of
    some simulated flow, not from the pair ``(x0[i], x1[i])`` (with a pool, not even from this call's batch).
    Labels passed next to ``x1`` therefore do not describe the served rows: use
    :meth:`guided_sample_location_and_conditional_flow`, which returns the label of every served row.

    Dtypes follow torchcfm: ``t`` has ``x0``'s dtype, ``xt`` and ``ut`` the promoted dtype of ``x0`` and
    ``x1``, all on ``x0``'s device, whatever the pool stores. Counters: :attr:`n_calls` (calls of
    :meth:`sample_location_and_conditional_flow`), :attr:`n_flows` (simulated flows), :attr:`n_solves`
    (Sinkhorn solves).

    **State.** Unlike torchcfm's matchers this one keeps state between calls: the pool of earlier flows,
    the latest flow's blur, the counters, and the mean and scale of the latest flow's targets. It never
    lets that state change what a call returns in shape or dtype: a call whose samples have another shape
    than the pool's items raises ``ValueError`` (call :meth:`reset`, or use one matcher per dataset). A
    call whose targets lie far from those of the pool's latest flow (their mean moved by more than
    ``DRIFT_SCALES`` of that flow's scales, or their scale changed by more than ``DRIFT_SCALE_RATIO``)
    empties the pool, whose flows went to other data, and refreshes it with a flow of its own batch; the
    first such call warns, naming :meth:`reset`. A sanity call on a dummy batch before training is
    therefore forgotten at the first training call. :meth:`reset` returns the matcher to its freshly
    constructed state; :meth:`state_dict` saves all of it for an exact resume.
    """

    def __init__(
        self,
        sigma: float = 0.0,
        *,
        flow_steps: int = 2,
        step_size: float | Sequence[float] = 1.0,
        path: Path = "straight",
        sinkhorn: SinkhornOptions | None = None,
        pool: TrajectoryPool | Literal["auto"] | None = "auto",
        refresh_every: int = 50,
        flow_size: int | None = None,
        balanced: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(sigma=check_non_negative(sigma, "sigma"))
        check_positive(flow_steps, "flow_steps", integer=True)
        self.step_sizes = _step_sizes(step_size, flow_steps)
        if path not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
        self._default_sinkhorn = sinkhorn is None
        if sinkhorn is None:
            sinkhorn = SinkhornOptions()
        elif not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions or None, got {type(sinkhorn).__name__}")
        if not (pool is None or pool == "auto" or isinstance(pool, TrajectoryPool)):
            raise TypeError(f"pool must be a TrajectoryPool, 'auto' or None, got {pool!r}")
        check_positive(refresh_every, "refresh_every", integer=True)
        if flow_size is not None:
            check_positive(flow_size, "flow_size", integer=True)
            if pool is None:
                raise ValueError(
                    "flow_size needs a pool (pool='auto' or a TrajectoryPool): without one every "
                    "call simulates a flow of its own batch"
                )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.flow_steps = flow_steps
        self.path = path
        self.sinkhorn = sinkhorn
        self.pool: TrajectoryPool | None = None if pool == "auto" else pool
        self._auto_pool = pool == "auto"
        self.refresh_every = refresh_every
        self.flow_size = flow_size
        self.balanced = bool(balanced)
        self.generator = generator
        self.progress = progress
        self._reset_state()

    def reset(self) -> None:
        """Forget everything earlier calls left behind, as a freshly constructed matcher with the same arguments.

        Drops the ``"auto"`` pool (a new one is built at the next call; a pool passed by the caller is
        emptied with :meth:`TrajectoryPool.clear`, which keeps its item shape), the latest flow's blur, the
        reference statistics of the distribution-change warning, and the counters :attr:`n_calls`,
        :attr:`n_flows`, :attr:`n_solves`. The ``generator`` is the caller's and is left as it is.
        """
        if self._auto_pool:
            self.pool = None
        elif self.pool is not None:
            self.pool.clear()
        self._reset_state()

    def _reset_state(self) -> None:
        """Counters, the latest blur and the warnings' memory as at construction (the pool untouched)."""
        self.blur: float | None = None if self.sinkhorn.relative_blur else float(self.sinkhorn.blur)
        self.n_calls = 0
        self.n_flows = 0
        self.n_solves = 0
        self._sim_seconds = 0.0
        self._warned_slow = False
        self._warned_drift = False
        # the blur of a run resumed from a state written before the blur was resolved per flow
        self._fixed_blur: float | None = None
        # mean (flattened, float64, CPU) and scale of the latest pooled flow's targets
        self._ref: tuple[Tensor, float] | None = None
        # flow_size: the latest rows of the calls' x0, x1 (and y1), the calls since the latest pooled
        # flow and that flow's particles
        self._staged: dict[str, Tensor | None] | None = None
        self._since_flow = 0
        self._last_flow_n = 0

    # ------------------------------------------------------------------ simulation
    @property
    def flow_time(self) -> float:
        """Total time :math:`\\sum_k \\eta_k` of the simulated flow in its own units."""
        return float(sum(self.step_sizes))

    def _check_pair(self, x0: Tensor, x1: Tensor) -> None:
        check_same_device(("x0", x0), ("x1", x1))
        check_cloud(x0, "x0")
        check_cloud(x1, "x1")
        check_same_features(x0, x1, "x0", "x1")

    def flow_blur(self, x1: Tensor) -> float:
        """The absolute blur of a flow towards the targets ``x1`` (m, *dim); reads no state and sets none.

        ``sinkhorn.blur`` times the targets' scale (:meth:`SinkhornOptions.scale_of`) for a relative blur,
        where the default options take ``HIGH_DIM_BLUR`` instead of their 0.1 on targets with more than
        ``HIGH_DIM_FEATURES`` features per sample; ``sinkhorn.blur`` itself for an absolute one.
        """
        options = self.sinkhorn
        if self._default_sinkhorn and options.relative_blur and x1[0].numel() > HIGH_DIM_FEATURES:
            options = replace(options, blur=HIGH_DIM_BLUR)
        if options.distributed and options.relative_blur:
            # The targets of one sharded flow are all processes' x1: the same scale (and blur) everywhere.
            return options.absolute_blur(x1, scale=self._target_stats(x1)[1])
        return options.absolute_blur(x1)

    def _resolve_blur(self, x1: Tensor) -> float:
        self.blur = self.flow_blur(x1) if self._fixed_blur is None else self._fixed_blur
        return self.blur

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
            Positions (T+1, n, *dim), normalised-clock velocities (T, n, *dim), times (T+1,), in the promoted
            dtype of ``x0`` and ``x1``, on their device. A step starts from the previous step's potentials
            when the particles moved by less than one blur (root mean square); after a larger step the engine
            anneals afresh, which is cheaper than iterating from potentials of a distant cloud.
        """
        self._check_pair(x0, x1)
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        x0, x1 = x0.detach().to(dtype), x1.detach().to(dtype)
        blur = self._resolve_blur(x1)
        start = time.perf_counter()
        xs, us, errors, iters, capped = self._flow(x0, x1, blur)
        self._count_flow(start, self.flow_steps, capped, errors)
        ts = torch.arange(self.flow_steps + 1, dtype=dtype, device=x0.device) / self.flow_steps
        return SinkhornTrajectory(xs=xs, us=us, ts=ts, marginal_errors=errors, n_iters=iters)

    def _flow(
        self, x0: Tensor, x1: Tensor, blur: float
    ) -> tuple[Tensor, Tensor, list[float], list[int], int]:
        """The Euler steps of one flow: positions (T+1, n, *dim), velocities (T, n, *dim), the engine's
        marginal error and iterations per step, and how many steps hit ``max_iter``. No counter is touched."""
        T = self.flow_steps
        xs = torch.empty((T + 1, *x0.shape), dtype=x0.dtype, device=x0.device)
        us = torch.empty((T, *x0.shape), dtype=x0.dtype, device=x0.device)
        xs[0] = x0
        sol: SinkhornSolution | None = None
        errors: list[float] = []
        iters: list[int] = []
        capped = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            for k in tqdm(range(T), desc="Sinkhorn flow", disable=bar_disable(self.progress), leave=False):
                sol = self.sinkhorn.solve(xs[k], x1, blur=blur, warm_start=sol)
                capped += not sol.converged
                errors.append(sol.marginal_error)
                iters.append(sol.n_iter + sol.n_anneal)
                step = self.step_sizes[k] * sol.velocity
                us[k] = T * step
                xs[k + 1] = xs[k] + step
                moved = self._rms(step.reshape(step.shape[0], -1))
                if not moved < blur:
                    sol = None
        return xs, us, errors, iters, capped

    def _rms(self, flat: Tensor) -> float:
        """Root mean square of the rows; over all processes' rows with ``distributed`` (a sharded flow's
        warm-start decision must be the same everywhere: it changes the collectives that follow)."""
        if self.sinkhorn.distributed:
            from .sinkhorn.sharded import global_rms

            return global_rms(flat)
        return float(flat.square().sum(1).mean().sqrt())

    def _count_flow(self, start: float, solves: int, capped: int, errors: list[float]) -> None:
        self._sim_seconds += time.perf_counter() - start
        self.n_flows += 1
        self.n_solves += solves
        if capped:
            warnings.warn(
                f"{capped} of {solves} Sinkhorn solves hit max_iter={self.sinkhorn.max_iter} before "
                f"tol={self.sinkhorn.tol:g} (largest marginal error {max(errors):.3g}); raise max_iter or blur",
                SinkhornConvergenceWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ class-conditional flows
    def _class_of_particles(self, n: int, y0: Tensor | None, y1: Tensor) -> Tensor:
        """The class each of the ``n`` source particles flows towards (shape (n,), on ``y1``'s device)."""
        if y0 is not None:
            missing = sorted(set(y0.unique().tolist()) - set(y1.unique().tolist()))
            if missing:
                raise ValueError(
                    f"y0 holds the classes {missing}, which y1 does not: every source class needs target "
                    "samples of its own class in x1"
                )
            return y0.to(y1.device)
        m = y1.shape[0]
        if n == m:
            # the source rows are drawn independently of the targets: row i takes class y1[i], which gives
            # every class exactly its count in y1, and the served labels come back in the caller's order
            return y1
        classes, counts = torch.unique(y1, return_counts=True)
        share = counts.double() * n / m  # largest-remainder split of n proportional to the counts of y1
        alloc = share.floor().long()
        rest = n - int(alloc.sum())
        if rest:
            alloc[torch.argsort(share - alloc, descending=True, stable=True)[:rest]] += 1
        labels = classes.repeat_interleave(alloc)
        return labels[torch.randperm(n, generator=self.generator).to(labels.device)]

    def simulate_guided(
        self, x0: Tensor, x1: Tensor, y1: Tensor, y0: Tensor | None = None
    ) -> tuple[SinkhornTrajectory, Tensor]:
        r"""Class-conditional flow: one Sinkhorn flow per class, particles of class ``c`` towards ``x1[y1 == c]``.

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source particles.
        x1 : Tensor, shape (m, *dim)
            Target samples.
        y1 : Tensor, shape (m,)
            Integer class labels of ``x1``.
        y0 : Tensor, shape (n,), optional
            Class of each source particle; every class in ``y0`` must occur in ``y1``. Default: the
            particles are split among the classes of ``y1`` in proportion to their counts (for ``n == m``
            exactly the counts, particle ``i`` taking class ``y1[i]``; otherwise a largest-remainder split
            over a random permutation drawn with ``generator``). With ``distributed`` every process's
            particles must cover the same classes (each class's solve is a collective); a ``ValueError`` on
            every process otherwise.

        Returns
        -------
        trajectory : SinkhornTrajectory
            As :meth:`simulate`, particles in the rows of ``x0``; ``marginal_errors`` holds the largest
            error over the classes at each step and ``n_iters`` the summed iterations.
        labels : Tensor, shape (n,)
            The class of each particle (``y1``'s dtype, on ``x0``'s device).

        Notes
        -----
        The blur is resolved once against the whole ``x1`` (one length scale per matcher, not per class).
        Why one flow per class rather than one solve with a cost that forbids cross-class transport (a
        block cost, ``+L^2`` between classes): the per-class solves are exact with nothing to tune, whereas
        the masked cost is exact only once ``L^2`` exceeds every within-class cost by many ε (a smaller
        ``L`` lets particles cross to a nearer class), and its dense ``n x m`` solve costs more than the
        per-class blocks (``benchmarks/results/conditional_solve.md``: as fast on 128 MNIST images with
        10 classes, several times faster in 2D). Counters: one flow, ``T`` solves per class.
        """
        self._check_pair(x0, x1)
        y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        if y0 is not None:
            y0 = check_labels(y0, x0.shape[0], "y0", "x0")
        check_same_device(("x0", x0), ("y0", y0), ("y1", y1))
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        x0, x1 = x0.detach().to(dtype), x1.detach().to(dtype)
        blur = self._resolve_blur(x1)
        labels = self._class_of_particles(x0.shape[0], y0, y1)
        T = self.flow_steps
        xs = torch.empty((T + 1, *x0.shape), dtype=dtype, device=x0.device)
        us = torch.empty((T, *x0.shape), dtype=dtype, device=x0.device)
        errors, iters, capped = [0.0] * T, [0] * T, 0
        start = time.perf_counter()
        if self.sinkhorn.distributed:
            from .sinkhorn.sharded import shared_classes

            classes = shared_classes(labels)  # each class's solve is a collective of all processes
        else:
            classes = labels.unique()
        for c in classes:
            rows = torch.nonzero(labels == c).flatten()
            cols = torch.nonzero(y1 == c).flatten()
            xs_c, us_c, err_c, it_c, cap_c = self._flow(x0[rows], x1[cols], blur)
            xs[:, rows], us[:, rows] = xs_c, us_c
            errors = [max(a, b) for a, b in zip(errors, err_c, strict=True)]
            iters = [a + b for a, b in zip(iters, it_c, strict=True)]
            capped += cap_c
        self._count_flow(start, T * len(classes), capped, errors)
        ts = torch.arange(T + 1, dtype=dtype, device=x0.device) / T
        traj = SinkhornTrajectory(xs=xs, us=us, ts=ts, marginal_errors=errors, n_iters=iters)
        return traj, labels.to(x0.device)

    # ------------------------------------------------------------------ paths
    @property
    def segment_length(self) -> float:
        """Clock length of one served segment: 1 (straight), 1/T (polyline) or 0 (grid)."""
        return {"straight": 1.0, "polyline": 1.0 / self.flow_steps, "grid": 0.0}[self.path]

    def segments(self, traj: SinkhornTrajectory) -> tuple[Tensor, Tensor, Tensor]:
        """The served segments of a trajectory: start times (N,), start points (N, *dim), velocities (N, *dim).

        A segment starting at ``(t_s, x_s)`` with velocity ``u`` covers ``t_s + s * L`` for ``s in [0, 1)``,
        ``L = segment_length``, at ``x_s + s * L * u``. ``N = n`` for ``"straight"``, ``T * n`` otherwise.
        """
        T, n = traj.us.shape[:2]
        if self.path == "straight":
            t0 = torch.zeros(n, dtype=traj.xs.dtype, device=traj.xs.device)
            return t0, traj.xs[0], traj.xs[T] - traj.xs[0]
        feature = traj.xs.shape[2:]
        return (
            traj.ts[:-1].repeat_interleave(n),
            traj.xs[:-1].reshape(T * n, *feature),
            traj.us.reshape(T * n, *feature),
        )

    def path_at(self, traj: SinkhornTrajectory, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""Position and velocity of each particle's path at its own time ``t`` (n,) in [0, 1].

        ``"straight"``: :math:`X_0 + t (X_T - X_0)` and :math:`X_T - X_0`. ``"polyline"`` and ``"grid"``: the
        Euler polyline, :math:`X_k + (t - k/T) u_k` with :math:`k = \min(\lfloor tT \rfloor, T - 1)`, and
        :math:`u_k` (the right derivative; ``t = 1`` gives :math:`X_T` and :math:`u_{T-1}`).
        """
        T, n = traj.us.shape[:2]
        t = t.to(traj.xs.dtype)
        pad = (-1,) + (1,) * (traj.xs.dim() - 2)
        if self.path == "straight":
            ut = traj.xs[T] - traj.xs[0]
            return traj.xs[0] + t.reshape(pad) * ut, ut
        k = (t * T).floor().long().clamp_(0, T - 1)
        idx = torch.arange(n, device=traj.xs.device)
        ut = traj.us[k, idx]
        return traj.xs[k, idx] + (t - k.to(t.dtype) / T).reshape(pad) * ut, ut

    def _check_t(self, t: object, bs: int, x0: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (bs,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape ({bs},) to match x0, got {shape}")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("t must lie in [0, 1] (and not be NaN)")
        return t.to(device=x0.device, dtype=x0.dtype)

    # ------------------------------------------------------------------ pool
    def _ensure_pool(self, x0: Tensor) -> None:
        """Build the ``"auto"`` pool on ``x0``'s device at the first call (seeded from the matcher's generator)."""
        if self.pool is None and self._auto_pool:
            self.pool = self._new_auto_pool(x0.device)

    def _new_auto_pool(self, device: torch.device | str) -> TrajectoryPool:
        generator = None
        if self.generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            generator = torch.Generator().manual_seed(seed)
        return TrajectoryPool(AUTO_POOL_ITEMS, max_bytes=AUTO_POOL_BYTES, device=device, generator=generator)

    def _check_pool_shape(self, x0: Tensor) -> None:
        """Refuse a call whose samples have another shape than the pool's items (never serve wrong shapes)."""
        held = None if self.pool is None else self.pool.feature_shape
        if held is not None and tuple(x0.shape[1:]) != tuple(held):
            advice = (
                "call reset() to start afresh on the new data, or use one matcher per dataset"
                if self._auto_pool
                else "pass a new TrajectoryPool (reset() empties this one but keeps its item shape), or "
                "use one matcher per dataset"
            )
            raise ValueError(
                f"x0 holds samples of shape {tuple(x0.shape[1:])}, but this matcher's pool holds items of "
                f"shape {tuple(held)} from earlier calls: {advice}"
            )

    def _target_stats(self, x1: Tensor) -> tuple[Tensor, float]:
        """Mean and root-mean-square radius of the targets; of all processes' targets with ``distributed``."""
        if self.sinkhorn.distributed:
            from .sinkhorn.sharded import global_moments

            mean, scale = global_moments(x1)
            return mean.cpu(), scale
        flat = x1.detach().reshape(x1.shape[0], -1).double()
        mean = flat.mean(0)
        return mean.cpu(), float((flat - mean).square().sum(1).mean().sqrt())

    def _drifted(self, x1: Tensor) -> bool:
        """Whether this call's targets lie far from those of the pool's latest flow (no solve); warns once."""
        if self._ref is None:
            return False
        ref_mean, ref_scale = self._ref
        mean, scale = self._target_stats(x1)
        m = x1.shape[0]
        shift = float((mean - ref_mean).norm())
        allowance = (DRIFT_SCALES + 3.0 / m**0.5) * ref_scale
        ratio = max(scale, ref_scale) / max(min(scale, ref_scale), 1e-300)
        drifted = shift > allowance or (m >= 16 and ratio > DRIFT_SCALE_RATIO)
        if drifted and not self._warned_drift:
            self._warned_drift = True
            warnings.warn(
                f"SinkhornFlowMatcher: this call's targets (mean {shift / max(ref_scale, 1e-300):.1f} scales "
                f"away, scale x{scale / max(ref_scale, 1e-300):.2g}) differ from those of the flows in its "
                "pool: the pool's earlier flows were dropped and a flow of this call's batch simulated. "
                "Call reset() when the data changes (or use one matcher per dataset)",
                UserWarning,
                stacklevel=4,
            )
        return drifted

    def _stage(self, x0: Tensor, x1: Tensor, y1: Tensor | None) -> None:
        """Keep the latest ``flow_size`` rows of ``x0``, ``x1`` (and ``y1``) for the next large flow."""
        new = {"x0": x0.detach(), "x1": x1.detach(), "y1": None if y1 is None else y1.detach()}
        if self._staged is not None:
            new = {
                k: None if v is None else torch.cat([self._staged[k].to(v.device), v])[-self.flow_size :]
                for k, v in new.items()
            }
        else:
            new = {k: None if v is None else v[-self.flow_size :] for k, v in new.items()}
        self._staged = new

    def _take_staged(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The staged ``(x0, x1, y1)`` when ``flow_size`` rows of each are kept (and forget them), else None."""
        st = self._staged
        if st is None or min(st["x0"].shape[0], st["x1"].shape[0]) < self.flow_size:
            return None
        self._staged = None
        return st["x0"], st["x1"], st["y1"]

    def _refresh_due(self, bs: int) -> bool:
        if self.flow_size is None:
            return self.n_calls % self.refresh_every == 0
        return self._since_flow >= self._period(bs)

    def _period(self, bs: int) -> int:
        """Calls between two flows with ``flow_size``: ``refresh_every`` samples served per particle."""
        return max(1, round(self.refresh_every * self._last_flow_n / bs))

    def segment_labels(self, labels: Tensor) -> Tensor:
        """The class of each served segment (:meth:`segments`) from the class of each particle ``(n,)``."""
        return labels if self.path == "straight" else labels.repeat(self.flow_steps)

    def fill_pool(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None = None, y1: Tensor | None = None
    ) -> SinkhornTrajectory:
        """Simulate one flow of ``(x0, x1)`` and add its served segments (:meth:`segments`) to the pool.

        With ``y1`` the flow is class-conditional (:meth:`simulate_guided`) and the segments are stored with
        their class labels (the pool must then hold labels).
        """
        self._ensure_pool(x0)
        if self.pool is None:
            raise ValueError(
                "fill_pool needs a pool: construct the matcher with pool='auto' or a TrajectoryPool"
            )
        self._check_pool_shape(x0)
        self._ref = self._target_stats(x1)
        if y1 is None:
            if y0 is not None:
                raise ValueError("y0 needs y1: give the labels of x1 for a class-conditional flow")
            if self.pool.labelled:
                raise ValueError("y1 must be given: this matcher's pool holds class-labelled items")
            traj = self.simulate(x0, x1)
            self.pool.add(*self.segments(traj))
            return traj
        if self.pool.labelled is False:
            raise ValueError("y1 must be None: this matcher's pool holds items without class labels")
        traj, labels = self.simulate_guided(x0, x1, y1, y0)
        self.pool.add(*self.segments(traj), y=self.segment_labels(labels))
        return traj

    def _rand(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self.generator).to(device=like.device, dtype=like.dtype)

    def _serve(self, t0: Tensor, xs: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A uniform point on each segment: ``t = t0 + s L``, ``xt = xs + s L u`` with ``s ~ U[0, 1)``."""
        length = self.segment_length
        s = self._rand(t0.shape[0], u) * length
        pad = (-1,) + (1,) * (u.dim() - 1)
        return t0.to(u.dtype) + s, xs + s.reshape(pad) * u, u

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
            Times in [0, 1] for the particles of this call's flow (:meth:`path_at`); not allowed with a pool.
            When ``None``, each served item is a uniform point of a uniformly drawn segment
            (:meth:`segments`): ``t`` covers [0, 1] for ``"straight"`` and ``"polyline"``, the grid ``k/T``
            for ``"grid"``.
        return_noise : bool
            Also return ``eps``, the standard normal draw behind ``xt = mu_t + sigma * eps``.

        Returns
        -------
        t : Tensor, shape (bs,)
        xt : Tensor, shape (bs, *dim)
        ut : Tensor, shape (bs, *dim)
            Target velocity on the normalised clock.
        eps : Tensor, shape (bs, *dim), only with ``return_noise``
        """
        t_out, xt, ut, _, eps = self._targets(x0, x1, t, None, None, return_noise)
        return (t_out, xt, ut, eps) if return_noise else (t_out, xt, ut)

    def guided_sample_location_and_conditional_flow(
        self,
        x0: Tensor,
        x1: Tensor,
        y0: Tensor | None = None,
        y1: Tensor | None = None,
        t: Tensor | None = None,
        return_noise: bool = False,
    ):
        r"""Class-conditional regression pairs, with torchcfm's signature and return convention.

        With ``y1`` each particle flows towards the samples of its own class only (one Sinkhorn flow per
        class, :meth:`simulate_guided`), and the returned labels give the class of every served row, which is
        what the network must be conditioned on: ``loss = mean((v(t, xt, y1_out) - ut)^2)``. With
        ``y1=None`` (and ``y0=None``) this is :meth:`sample_location_and_conditional_flow`, the same draws
        from the same generator state, with ``y0 = y1 = None``.

        Parameters
        ----------
        x0 : Tensor, shape (bs, *dim)
            Source minibatch.
        x1 : Tensor, shape (m, *dim)
            Target minibatch.
        y0 : Tensor, shape (bs,), optional
            Integer class of each source row; needs ``y1``, and every class of ``y0`` must occur in ``y1``.
            Default: the particles are split among the classes of ``y1`` in proportion to their counts
            (``bs == m``: row ``i`` takes class ``y1[i]``).
        y1 : Tensor, shape (m,), optional
            Integer class labels of ``x1``.
        t : Tensor, shape (bs,), optional
            As in :meth:`sample_location_and_conditional_flow` (not allowed with a pool).
        return_noise : bool
            Also return ``eps``.

        Returns
        -------
        t : Tensor, shape (bs,)
        xt, ut : Tensor, shape (bs, *dim)
        y0 : Tensor, shape (bs,), or None
            The class of each served row when ``y0`` was given, else None.
        y1 : Tensor, shape (bs,), or None
            The class of each served row (``y1``'s dtype, on ``x0``'s device); None without ``y1``.
            Without a pool and with ``path="straight"``, ``t=None`` or a given ``t``, row ``i`` is the
            particle ``x0[i]``, so for ``bs == m`` and no ``y0`` the returned ``y1`` equals the given one.
        eps : Tensor, shape (bs, *dim), only with ``return_noise``
        """
        if y1 is None:
            if y0 is not None:
                raise ValueError("y0 needs y1: give the labels of x1 for class-conditional targets")
        t_out, xt, ut, y, eps = self._targets(x0, x1, t, y0, y1, return_noise)
        y0_out = None if y0 is None else y
        return (t_out, xt, ut, y0_out, y, eps) if return_noise else (t_out, xt, ut, y0_out, y)

    def _targets(
        self,
        x0: Tensor,
        x1: Tensor,
        t: Tensor | None,
        y0: Tensor | None,
        y1: Tensor | None,
        return_noise: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(t, xt, ut, y, eps)`` for both interfaces; ``y`` is None for an unconditional call."""
        self._check_pair(x0, x1)
        guided = y1 is not None
        if guided:
            y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        bs = x0.shape[0]
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        self._ensure_pool(x0)
        y = None
        if self.pool is not None:
            if t is not None:
                raise ValueError(
                    "t cannot be given when the matcher serves its batches from a pool (pool=None)"
                )
            if self.pool.labelled is not None and self.pool.labelled != guided:
                raise ValueError(
                    "y1 must be given: this matcher's pool holds class-labelled items (guided calls); "
                    "call reset() to switch to unconditional calls"
                    if self.pool.labelled
                    else "y1 must be None: this matcher's pool holds unlabelled items (unconditional calls); "
                    "call reset() to switch to guided calls"
                )
            self._check_pool_shape(x0)
            drifted = self._drifted(x1)
            if drifted:  # the pool's flows went to other data: never serve them for this data
                self.pool.clear()
                self._staged = None
            if self.flow_size is not None:
                if self.flow_size < bs:
                    raise ValueError(
                        f"flow_size={self.flow_size} is smaller than this call's batch of {bs}: a flow must "
                        "hold at least one batch (use flow_size >= the batch size, or None for flows of one batch)"
                    )
                if y0 is not None:
                    raise ValueError(
                        "y0 cannot be given with flow_size: a large flow takes its classes from y1"
                    )
                self._stage(x0, x1, y1)
            if drifted or len(self.pool) < bs or self._refresh_due(bs):
                staged = None if self.flow_size is None else self._take_staged()
                if staged is None:
                    self.fill_pool(x0, x1, y0=y0, y1=y1)
                else:
                    self.fill_pool(staged[0], staged[1], y1=staged[2])
                self._since_flow = 0
                self._last_flow_n = x0.shape[0] if staged is None else staged[0].shape[0]
                self._warn_if_slow(self.refresh_every if self.flow_size is None else self._period(bs))
            self._since_flow += 1
            drawn = self.pool.sample(bs, device=x0.device, dtype=dtype, balanced=guided and self.balanced)
            t_out, xt, ut = self._serve(*drawn[:3])
            if guided:
                y = drawn[3]
        else:
            if guided:
                traj, labels = self.simulate_guided(x0, x1, y1, y0)
            else:
                traj = self.simulate(x0, x1)
            self._warn_if_slow(1)
            if t is None:
                segs = self.segments(traj)
                if self.path == "straight":  # every particle is served once, in its own row
                    pick = torch.arange(bs, device=x0.device)
                else:
                    pick = torch.randint(0, segs[0].shape[0], (bs,), generator=self.generator).to(x0.device)
                t_out, xt, ut = self._serve(*(s[pick] for s in segs))
                if guided:
                    y = self.segment_labels(labels)[pick]
            else:
                t_out = self._check_t(t, bs, x0)
                xt, ut = self.path_at(traj, t_out)
                y = labels if guided else None
        self.n_calls += 1
        t_out = t_out.to(x0.dtype)
        eps = None
        if self.sigma > 0 or return_noise:
            # torchcfm draws eps like x0 (its dtype), whatever the dtype of x1
            eps = torch.randn(xt.shape, generator=self.generator).to(device=xt.device, dtype=x0.dtype)
            if self.sigma > 0:
                xt = xt + self.sigma * eps
        if y is not None:
            y = y.to(device=x0.device, dtype=y1.dtype)
        return t_out, xt, ut, y, eps

    def compute_sigma_t(self, t: Tensor) -> Tensor:
        """The constant noise width ``sigma`` as a tensor like ``t`` (torchcfm's base returns a float, which
        breaks loops that index ``compute_lambda(t)[:, None]``)."""
        return torch.full_like(t, self.sigma)

    def compute_mu_t(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Mean of the path at ``t``: the point at ``t`` (shape (bs,)) of the NSGF path of ``x0`` towards ``x1``.

        Simulates the flow (one Sinkhorn solve per flow step), then :meth:`path_at`.
        """
        self._check_pair(x0, x1)
        return self.path_at(self.simulate(x0, x1), self._check_t(t, x0.shape[0], x0))[0]

    def sample_xt(self, x0: Tensor, x1: Tensor, t: Tensor, epsilon: Tensor) -> Tensor:
        """``compute_mu_t(x0, x1, t) + sigma * epsilon`` (torchcfm's contract)."""
        return self.compute_mu_t(x0, x1, t) + self.sigma * epsilon

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """Velocity of the NSGF path of ``x0`` towards ``x1`` at ``t`` (shape (bs,)); ``xt`` is not used."""
        self._check_pair(x0, x1)
        return self.path_at(self.simulate(x0, x1), self._check_t(t, x0.shape[0], x0))[1]

    def _warn_if_slow(self, calls_per_flow: int) -> None:
        if self._warned_slow or self.n_flows == 0:
            return
        per_call = self._sim_seconds / self.n_flows / calls_per_flow
        if per_call > SLOW_CALL_S:
            self._warned_slow = True
            advice = (
                "serve from a pool (pool='auto') or raise refresh_every"
                if self.pool is None
                else f"raise refresh_every (now {self.refresh_every})"
            )
            warnings.warn(
                f"SinkhornFlowMatcher spends about {per_call:.1f} s of Sinkhorn iterations per call "
                f"({self._sim_seconds / self.n_flows:.1f} s per {self.flow_steps}-step flow at blur "
                f"{self.blur:.3g}): {advice}, use fewer flow_steps, or a larger blur",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ sampling
    def sample(
        self, field, x0: Tensor, *, solver: str = "euler", n_steps: int | None = None, **kwargs
    ) -> SampleResult:
        """Integrate a field trained on this matcher's targets from ``t = 0`` to 1 (:func:`odeint_sample`).

        Fixed-step solvers default to ``n_steps = flow_steps``, the matcher's grid (exact for a field equal
        to the served velocity); adaptive solvers (``dopri5``, ``tsit5``) choose their own steps.
        """
        n_steps = default_steps(solver, n_steps, self.flow_steps)
        return odeint_sample(field, x0, solver=solver, n_steps=n_steps, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Resumable state: counters, the latest flow's blur, the statistics of its targets (for the
        distribution-change warning), the generator and the pool."""
        return {
            "calls": self.n_calls,
            "flows": self.n_flows,
            "solves": self.n_solves,
            "blur": self.blur,
            "targets": None if self._ref is None else {"mean": self._ref[0], "scale": self._ref[1]},
            "warned_drift": self._warned_drift,
            "fixed_blur": self._fixed_blur,
            "staged": self._staged,
            "since_flow": self._since_flow,
            "last_flow_n": self._last_flow_n,
            "generator": None if self.generator is None else self.generator.get_state(),
            "pool": None if self.pool is None else self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (the matcher must have been built the same way).

        The state replaces everything the matcher held (as after :meth:`reset`). A state written before the
        blur was resolved per flow (it holds ``"sinkhorn_blur"``) continues as it was run: every later flow
        keeps the blur its first call fixed, until :meth:`reset`.
        """
        self._reset_state()
        if self._auto_pool and state.get("pool") is None:
            self.pool = None
        self.n_calls = int(state["calls"])
        self.n_flows = int(state.get("flows", 0))
        self.n_solves = int(state.get("solves", 0))
        if state.get("blur") is not None:
            self.blur = float(state["blur"])
        if state.get("fixed_blur") is not None:
            self._fixed_blur = float(state["fixed_blur"])
        elif "sinkhorn_blur" in state and state.get("blur") is not None:
            self._fixed_blur = float(state["blur"])
        if state.get("targets") is not None:
            self._ref = (state["targets"]["mean"].double().cpu(), float(state["targets"]["scale"]))
        self._warned_drift = bool(state.get("warned_drift", False))
        self._staged = state.get("staged")
        self._since_flow = int(state.get("since_flow", 0))
        self._last_flow_n = int(state.get("last_flow_n", 0))
        if state.get("pool") is not None:
            if self.pool is None and self._auto_pool:  # its generator state comes with the pool's state
                self.pool = self._new_auto_pool("cpu")
            if self.pool is None:
                raise ValueError("state holds a pool but this matcher has none")
            self.pool.load_state_dict(state["pool"])
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])  # after the auto pool's seed draw

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


def _step_sizes(step_size: float | Sequence[float], flow_steps: int) -> tuple[float, ...]:
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        check_positive(step_size, "step_size")
        return (float(step_size),) * flow_steps
    if not isinstance(step_size, Sequence) or isinstance(step_size, str):
        raise TypeError(
            f"step_size must be a number or a sequence of numbers, got {type(step_size).__name__}"
        )
    if len(step_size) != flow_steps:
        raise ValueError(
            f"step_size must hold one value per flow step ({flow_steps}), got {len(step_size)} values"
        )
    for value in step_size:
        check_positive(value, "step_size")
    return tuple(float(v) for v in step_size)
