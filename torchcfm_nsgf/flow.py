r"""The simulated empirical Sinkhorn flow: the one part of the matcher that calls the engine.

:class:`SinkhornFlow` moves particles ``x0`` towards samples ``x1`` by ``flow_steps`` explicit-Euler steps of
the empirical Sinkhorn-flow velocity (paper eq. 13-14),

.. math::
    X_{k+1} = X_k + \eta_k\, \hat v_k(X_k), \qquad k = 0, \dots, T-1,

resolves the blur of each flow from its own targets, runs one flow per class for class-conditional targets,
and counts flows and solves. It keeps no state that changes what a flow returns, except the blur of a run
resumed from a state written before the blur was resolved per flow (:attr:`SinkhornFlow.fixed_blur`).
:class:`~torchcfm_nsgf.SinkhornFlowMatcher` composes it with a path (:mod:`torchcfm_nsgf.paths`) and the
replay (:mod:`torchcfm_nsgf.replay`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._progress import bar_disable
from ._validation import check_cloud, check_labels, check_positive, check_same_device, check_same_features
from .sinkhorn import HIGH_DIM_BLUR, SinkhornConvergenceWarning, SinkhornOptions, SinkhornSolution

__all__ = ["HIGH_DIM_FEATURES", "SinkhornFlow", "SinkhornTrajectory", "target_moments"]

# SinkhornFlowMatcher() uses HIGH_DIM_BLUR on data with more than this many features per sample.
HIGH_DIM_FEATURES = 16


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


def target_moments(x1: Tensor, *, distributed: bool = False) -> tuple[Tensor, Tensor]:
    """Mean (d,) and root-mean-square radius (0-dim) of the targets ``x1`` (m, *dim), float64 on their device.

    Computed on the device without reading anything back, so that a caller can decide on the device. With
    ``distributed``, of all processes' targets (two all-reduces; every process gets the same numbers).
    """
    if distributed:
        from .sinkhorn.sharded import global_moments

        mean, scale = global_moments(x1)
        return mean, torch.tensor(scale, dtype=torch.float64, device=mean.device)
    flat = x1.detach().reshape(x1.shape[0], -1).double()
    mean = flat.mean(0)
    return mean, (flat - mean).square().sum(1).mean().sqrt()


def step_sizes(step_size: float | Sequence[float], flow_steps: int) -> tuple[float, ...]:
    """``step_size`` as one float per flow step (a number repeated, or a checked sequence)."""
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


def check_pair(x0: Tensor, x1: Tensor, *, finite: bool = True) -> None:
    """``x0`` (n, *dim) and ``x1`` (m, *dim): point clouds of one feature shape on one device.

    ``finite=False`` leaves out the finiteness check, the one that reads the data back to the host.
    """
    check_same_device(("x0", x0), ("x1", x1))
    check_cloud(x0, "x0", finite=finite)
    check_cloud(x1, "x1", finite=finite)
    check_same_features(x0, x1, "x0", "x1")


class SinkhornFlow:
    r"""Euler steps of the empirical Sinkhorn flow, one flow or one per class, with their counters.

    Parameters
    ----------
    flow_steps : int
        Number of Euler steps ``T``.
    step_size : float or sequence of float
        Euler step ``eta`` in the flow's own time, or one per step.
    sinkhorn : SinkhornOptions, optional
        Engine settings; ``None``: ``SinkhornOptions()`` with ``HIGH_DIM_BLUR`` on targets of more than
        ``HIGH_DIM_FEATURES`` features (:meth:`flow_blur`).
    generator : torch.Generator, optional
        CPU generator of the draws a flow makes (the class split of :meth:`simulate_guided`).
    progress : bool
        Progress bar over the steps of each flow.

    Attributes
    ----------
    blur : float or None
        The absolute blur of the latest flow (the given blur for an absolute one).
    n_flows, n_solves : int
        Flows simulated and Sinkhorn solves run.
    sim_seconds : float
        Wall-clock seconds spent in flows.
    fixed_blur : float or None
        The blur every flow keeps, for a run resumed from a state written before the blur was resolved per
        flow; None otherwise.
    """

    def __init__(
        self,
        flow_steps: int,
        step_size: float | Sequence[float],
        sinkhorn: SinkhornOptions | None,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        check_positive(flow_steps, "flow_steps", integer=True)
        self.step_sizes = step_sizes(step_size, flow_steps)
        self.default_sinkhorn = sinkhorn is None
        if sinkhorn is None:
            sinkhorn = SinkhornOptions()
        elif not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions or None, got {type(sinkhorn).__name__}")
        self.flow_steps = flow_steps
        self.sinkhorn = sinkhorn
        self.generator = generator
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        """Counters and the latest blur as at construction."""
        self.blur: float | None = None if self.sinkhorn.relative_blur else float(self.sinkhorn.blur)
        self.n_flows = 0
        self.n_solves = 0
        self.sim_seconds = 0.0
        self.fixed_blur: float | None = None
        self.warned_slow = False  # the matcher's one warning that its flows are slow

    @property
    def flow_time(self) -> float:
        """Total time :math:`\\sum_k \\eta_k` of the flow in its own units."""
        return float(sum(self.step_sizes))

    # ------------------------------------------------------------------ blur
    def flow_blur(self, x1: Tensor, *, scale: float | None = None) -> float:
        """The absolute blur of a flow towards the targets ``x1`` (m, *dim); reads no state and sets none.

        ``scale``: the targets' scale (:func:`target_moments`) when the caller has it.
        """
        options = self.sinkhorn
        if self.default_sinkhorn and options.relative_blur and x1[0].numel() > HIGH_DIM_FEATURES:
            options = replace(options, blur=HIGH_DIM_BLUR)
        if options.relative_blur and scale is None and options.distributed:
            # The targets of one sharded flow are all processes' x1: the same scale (and blur) everywhere.
            scale = float(target_moments(x1, distributed=True)[1])
        return options.absolute_blur(x1, scale=scale)

    def resolve_blur(self, x1: Tensor, *, scale: float | None = None) -> float:
        """Set :attr:`blur` to the blur of a flow towards ``x1`` (or the fixed blur) and return it."""
        self.blur = self.flow_blur(x1, scale=scale) if self.fixed_blur is None else self.fixed_blur
        return self.blur

    # ------------------------------------------------------------------ flows
    def simulate(self, x0: Tensor, x1: Tensor, *, scale: float | None = None) -> SinkhornTrajectory:
        """One flow of the particles ``x0`` (n, *dim) towards ``x1`` (m, *dim); see
        :meth:`SinkhornFlowMatcher.simulate <torchcfm_nsgf.SinkhornFlowMatcher.simulate>`."""
        check_pair(x0, x1)
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        x0, x1 = x0.detach().to(dtype), x1.detach().to(dtype)
        blur = self.resolve_blur(x1, scale=scale)
        start = time.perf_counter()
        xs, us, errors, iters, capped = self.steps(x0, x1, blur)
        self._count(start, self.flow_steps, capped, errors)
        return SinkhornTrajectory(
            xs=xs, us=us, ts=self._times(dtype, x0.device), marginal_errors=errors, n_iters=iters
        )

    def simulate_guided(
        self, x0: Tensor, x1: Tensor, y1: Tensor, y0: Tensor | None = None, *, scale: float | None = None
    ) -> tuple[SinkhornTrajectory, Tensor]:
        """One flow per class; see :meth:`SinkhornFlowMatcher.simulate_guided
        <torchcfm_nsgf.SinkhornFlowMatcher.simulate_guided>`. Labels of shape (n,) or (n, 1).

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
        check_pair(x0, x1)
        y1 = check_labels(y1, x1.shape[0], "y1", "x1", column=True)
        if y0 is not None:
            y0 = check_labels(y0, x0.shape[0], "y0", "x0", column=True)
        check_same_device(("x0", x0), ("y0", y0), ("y1", y1))
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        x0, x1 = x0.detach().to(dtype), x1.detach().to(dtype)
        blur = self.resolve_blur(x1, scale=scale)
        labels = self.class_of_particles(x0.shape[0], y0, y1)
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
            xs_c, us_c, err_c, it_c, cap_c = self.steps(x0[rows], x1[cols], blur)
            xs[:, rows], us[:, rows] = xs_c, us_c
            errors = [max(a, b) for a, b in zip(errors, err_c, strict=True)]
            iters = [a + b for a, b in zip(iters, it_c, strict=True)]
            capped += cap_c
        self._count(start, T * len(classes), capped, errors)
        traj = SinkhornTrajectory(
            xs=xs, us=us, ts=self._times(dtype, x0.device), marginal_errors=errors, n_iters=iters
        )
        return traj, labels.to(x0.device)

    def class_of_particles(self, n: int, y0: Tensor | None, y1: Tensor) -> Tensor:
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

    def steps(
        self, x0: Tensor, x1: Tensor, blur: float
    ) -> tuple[Tensor, Tensor, list[float], list[int], int]:
        """The Euler steps of one flow: positions (T+1, n, *dim), velocities (T, n, *dim), the engine's
        marginal error and iterations per step, and how many steps hit ``max_iter``. No counter is touched.

        A step starts from the previous step's potentials when the particles moved by less than one blur
        (root mean square); after a larger step the engine anneals afresh.
        """
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
                if not self._rms(step.reshape(step.shape[0], -1)) < blur:
                    sol = None
        return xs, us, errors, iters, capped

    def _times(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.arange(self.flow_steps + 1, dtype=dtype, device=device) / self.flow_steps

    def _rms(self, flat: Tensor) -> float:
        """Root mean square of the rows; over all processes' rows with ``distributed`` (a sharded flow's
        warm-start decision must be the same everywhere: it changes the collectives that follow)."""
        if self.sinkhorn.distributed:
            from .sinkhorn.sharded import global_rms

            return global_rms(flat)
        return float(flat.square().sum(1).mean().sqrt())

    def _count(self, start: float, solves: int, capped: int, errors: list[float]) -> None:
        self.sim_seconds += time.perf_counter() - start
        self.n_flows += 1
        self.n_solves += solves
        if capped:
            warnings.warn(
                f"{capped} of {solves} Sinkhorn solves hit max_iter={self.sinkhorn.max_iter} before "
                f"tol={self.sinkhorn.tol:g} (largest marginal error {max(errors):.3g}); raise max_iter or blur",
                SinkhornConvergenceWarning,
                stacklevel=4,
            )
