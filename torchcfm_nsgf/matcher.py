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

Clock. Every path is put on torchcfm's normalised clock ``t in [0, 1]`` (:mod:`torchcfm_nsgf.paths`):
``path="straight"`` (default) serves the segment :math:`X_0 \to X_T` (constant velocity, valid at every
``t`` and any NFE), ``"polyline"`` the Euler polyline (step ``k`` on ``[k/T, (k+1)/T]``, velocity
:math:`u_k = T \eta_k \hat v_k(X_k)`), ``"grid"`` the paper's pairs :math:`(k/T, X_k, u_k)`. Euler with ``T``
steps of ``dx/dt = ut`` reproduces the simulated :math:`X_T` exactly for every path, so torchcfm / torchdyn
sampling code works unchanged.

Class-conditional (guided) targets: :meth:`SinkhornFlowMatcher.guided_sample_location_and_conditional_flow`
has torchcfm's signature and return convention ``(t, xt, ut, y0, y1[, eps])``. A Sinkhorn flow of a mixed
batch would pull every particle towards all classes; the guided flow runs one Sinkhorn flow per class, each
moving the particles assigned to class ``c`` towards the samples of ``x1`` labelled ``c``
(:meth:`SinkhornFlowMatcher.simulate_guided`), so no target ever pulls a particle towards another class.

The matcher is a composition: :class:`~torchcfm_nsgf.flow.SinkhornFlow` (the flow, the one part that calls
the engine), :class:`~torchcfm_nsgf.paths.FlowPath` (the path geometry) and
:class:`~torchcfm_nsgf.replay.Replay` (the pool, its cadence, the staging of large flows, the drift monitor);
this module serves them behind torchcfm's interface (the rules in :mod:`torchcfm_nsgf.serving`),
:mod:`torchcfm_nsgf.matcher_parts` gives their attributes the matcher's names and
:mod:`torchcfm_nsgf.matcher_state` keeps their state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

from . import serving
from ._transfer import to_device
from ._validation import check_labels, check_non_negative, check_positive
from .flow import HIGH_DIM_FEATURES, SinkhornFlow, SinkhornTrajectory, check_pair
from .matcher_parts import MatcherParts
from .matcher_state import MatcherState
from .paths import PATHS, FlowPath, Path, make_path
from .pool import TrajectoryPool
from .replay import (
    AUTO_POOL_BYTES,
    AUTO_POOL_ITEMS,
    DRIFT_SCALE_RATIO,
    DRIFT_SCALES,
    Replay,
    reads_late,
)
from .sampling import SampleResult, default_steps, odeint_sample
from .sinkhorn import HIGH_DIM_BLUR, SinkhornOptions

__all__ = ["HIGH_DIM_FEATURES", "PATHS", "SinkhornFlowMatcher", "SinkhornTrajectory"]
# the names this module held before the matcher was split into its parts
_MOVED = (AUTO_POOL_BYTES, AUTO_POOL_ITEMS, DRIFT_SCALES, DRIFT_SCALE_RATIO, HIGH_DIM_BLUR)


class SinkhornFlowMatcher(MatcherParts, MatcherState, ConditionalFlowMatcher):
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
    therefore forgotten at the first training call. On an accelerator, a call served from the pool is
    checked on the device and read at the next call, so that it costs no host synchronisation
    (:mod:`torchcfm_nsgf.replay`). :meth:`reset` returns the matcher to its freshly constructed state;
    :meth:`state_dict` saves all of it for an exact resume.
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
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.flow = self._make_flow(flow_steps, step_size, sinkhorn, generator, progress)
        self.geometry: FlowPath = make_path(path, flow_steps)
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
        self.replay = Replay(pool, refresh_every, flow_size, generator)
        self.balanced = bool(balanced)
        self.n_calls = 0

    def _make_flow(self, flow_steps, step_size, sinkhorn, generator, progress) -> SinkhornFlow:
        """The flow part (a subclass may serve another flow, e.g. pairs of an OT plan)."""
        return SinkhornFlow(flow_steps, step_size, sinkhorn, generator=generator, progress=progress)

    def reset(self) -> None:
        """Forget everything earlier calls left behind, as a freshly constructed matcher with the same arguments.

        Drops the ``"auto"`` pool (a new one is built at the next call; a pool passed by the caller is
        emptied with :meth:`TrajectoryPool.clear`, which keeps its item shape), the latest flow's blur, the
        reference statistics of the distribution-change warning, and the counters :attr:`n_calls`,
        :attr:`n_flows`, :attr:`n_solves`. The ``generator`` is the caller's and is left as it is.
        """
        self.replay.reset()
        self.flow.reset()
        self.n_calls = 0

    # ------------------------------------------------------------------ the pool
    def fill_pool(
        self, x0: Tensor, x1: Tensor, y0: Tensor | None = None, y1: Tensor | None = None
    ) -> SinkhornTrajectory:
        """Simulate one flow of ``(x0, x1)`` and add its served segments (:meth:`segments`) to the pool.

        With ``y1`` the flow is class-conditional (:meth:`simulate_guided`) and the segments are stored with
        their class labels (the pool must then hold labels).
        """
        self.replay.ensure_pool(x0.device)
        if self.pool is None:
            raise ValueError(
                "fill_pool needs a pool: construct the matcher with pool='auto' or a TrajectoryPool"
            )
        return serving.fill(self, x0, x1, y0, y1, None)

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
            Times in [0, 1]. Without a pool, row ``i`` is particle ``x0[i]`` of this call's flow at ``t[i]``
            (:meth:`path_at`). With a pool, row ``i`` is a pooled segment whose time range holds ``t[i]``,
            placed at ``t[i]`` (:mod:`torchcfm_nsgf.paths`: any segment for ``"straight"``; step
            :math:`\min(\lfloor tT \rfloor, T-1)` for ``"polyline"``, and for ``"grid"`` the pair at the grid
            time nearest below ``t``, continued along its Euler step). The returned ``t`` is the given one
            (``x0``'s dtype and device). When ``None``, each served item is a uniform point of a uniformly
            drawn segment (:meth:`segments`): ``t`` covers [0, 1) for ``"straight"`` and ``"polyline"``, the
            grid ``k/T`` for ``"grid"``.
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
        y0 : Tensor, shape (bs,) or (bs, 1), optional
            Integer class of each source row; needs ``y1``, and every class of ``y0`` must occur in ``y1``.
            Default: the particles are split among the classes of ``y1`` in proportion to their counts
            (``bs == m``: row ``i`` takes class ``y1[i]``).
        y1 : Tensor, shape (m,) or (m, 1), optional
            Integer class labels of ``x1``.
        t : Tensor, shape (bs,), optional
            As in :meth:`sample_location_and_conditional_flow`.
        return_noise : bool
            Also return ``eps``.

        Returns
        -------
        t : Tensor, shape (bs,)
        xt, ut : Tensor, shape (bs, *dim)
        y0 : Tensor, shape of the given ``y0`` ((bs,) or (bs, 1)), or None
            The class of each served row when ``y0`` was given (``y0``'s dtype, on ``x0``'s device), else
            None.
        y1 : Tensor, shape of the given ``y1`` ((bs,) or (bs, 1)), or None
            The class of each served row (``y1``'s dtype, on ``x0``'s device); None without ``y1``.
            Without a pool and with ``path="straight"``, ``t=None`` or a given ``t``, row ``i`` is the
            particle ``x0[i]``, so for ``bs == m`` and no ``y0`` the returned ``y1`` equals the given one.
        eps : Tensor, shape (bs, *dim), only with ``return_noise``
        """
        if y1 is None and y0 is not None:
            raise ValueError("y0 needs y1: give the labels of x1 for class-conditional targets")
        t_out, xt, ut, y, eps = self._targets(x0, x1, t, y0, y1, return_noise)
        y1_out = None if y is None else y.reshape((-1, 1) if y1.dim() == 2 else (-1,))
        y0_out = None if y0 is None else y.to(y0.dtype).reshape((-1, 1) if y0.dim() == 2 else (-1,))
        return (t_out, xt, ut, y0_out, y1_out, eps) if return_noise else (t_out, xt, ut, y0_out, y1_out)

    def _targets(
        self, x0, x1, t, y0, y1, return_noise
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(t, xt, ut, y, eps)`` for both interfaces; ``y`` (bs,) is None for an unconditional call."""
        check_pair(x0, x1, finite=False)
        late = (self.pool is not None or self.replay.auto) and reads_late(x0.device)
        late = late and not self.sinkhorn.distributed
        if not late:
            check_pair(x0, x1)
        self.replay.ensure_pool(x0.device)
        guided = y1 is not None
        if guided:
            y1 = check_labels(y1, x1.shape[0], "y1", "x1", column=True, read=not late)
        if y0 is not None:
            y0 = check_labels(y0, x0.shape[0], "y0", "x0", column=True, read=not late)
        bs = x0.shape[0]
        if t is not None:
            t = self._check_t(t, bs, x0)
        dtype = torch.promote_types(x0.dtype, x1.dtype)
        if self.pool is not None:
            t_out, xt, ut, *rest = serving.from_pool(self, x0, x1, t, y0, y1, dtype)
        else:
            t_out, xt, ut, *rest = serving.from_flow(self, x0, x1, t, y0, y1)
        y = rest[0] if guided else None
        self.n_calls += 1
        t_out = t_out.to(x0.dtype)
        eps = None
        if self.sigma > 0 or return_noise:
            # torchcfm draws eps like x0 (its dtype), whatever the dtype of x1
            eps = to_device(torch.randn(xt.shape, generator=self.generator), xt.device, x0.dtype)
            if self.sigma > 0:
                xt = xt + self.sigma * eps
        if y is not None:
            y = y.to(device=x0.device, dtype=y1.dtype)
        return t_out, xt, ut, y, eps

    @staticmethod
    def _check_t(t: object, bs: int, x0: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (bs,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape ({bs},) to match x0, got {shape}")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("t must lie in [0, 1] (and not be NaN)")
        return t.to(device=x0.device, dtype=x0.dtype)

    def compute_sigma_t(self, t: Tensor) -> Tensor:
        """The constant noise width ``sigma`` as a tensor like ``t`` (torchcfm's base returns a float, which
        breaks loops that index ``compute_lambda(t)[:, None]``)."""
        return torch.full_like(t, self.sigma)

    def compute_mu_t(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Mean of the path at ``t``: the point at ``t`` (shape (bs,)) of the NSGF path of ``x0`` towards ``x1``.

        Simulates the flow (one Sinkhorn solve per flow step), then :meth:`path_at`.
        """
        check_pair(x0, x1)
        return self.path_at(self.simulate(x0, x1), self._check_t(t, x0.shape[0], x0))[0]

    def sample_xt(self, x0: Tensor, x1: Tensor, t: Tensor, epsilon: Tensor) -> Tensor:
        """``compute_mu_t(x0, x1, t) + sigma * epsilon`` (torchcfm's contract)."""
        return self.compute_mu_t(x0, x1, t) + self.sigma * epsilon

    def compute_conditional_flow(self, x0: Tensor, x1: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """Velocity of the NSGF path of ``x0`` towards ``x1`` at ``t`` (shape (bs,)); ``xt`` is not used."""
        check_pair(x0, x1)
        return self.path_at(self.simulate(x0, x1), self._check_t(t, x0.shape[0], x0))[1]

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
