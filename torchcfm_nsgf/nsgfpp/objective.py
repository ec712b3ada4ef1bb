r"""The NSGF++ training objective: one loss per network, and the matching two-phase sampler.

Networks, trained together on the same source :math:`\mu_0` and target :math:`\mu^*`:

* the **NSGF field** :math:`v_\theta(t, x)`, regressed on a short simulated Sinkhorn flow (``T <= 5`` steps of
  a large step size η) by :class:`~torchcfm_nsgf.SinkhornFlowMatcher` with a trajectory pool;
* the **neural straight flow** :math:`u_\delta(t, x)`, trained by flow matching on straight segments
  (torchcfm's ``ConditionalFlowMatcher(sigma=0)``) whose ends the phase-2 variant chooses
  (:mod:`~torchcfm_nsgf.nsgfpp.variants`);
* for the variants with one, the **phase-transition time predictor** :math:`t_\phi(x) \in [0, 1]`, regressing
  the segment time from the interpolation.

Where the OT variants' end points come from is the option ``endpoints``. ``"simulated"``: from simulating the
matcher's flow (no network call; Euler with ``T`` steps of the served velocity lands on :math:`X_T` exactly,
so all parts train from the first step, in one loop, and no network error enters phase 2's training data);
``"network"``: from ``T`` Euler steps of the NSGF network being trained (:meth:`network_endpoints`), which is
exactly the distribution phase 2 starts from at sampling. BENCHMARKS.md §4 and §5 compare the two.

Conventions
-----------
* Network signatures: ``nsgf(t, x)`` and ``straight(t, x)`` return ``dx/dt`` of ``x``'s shape; ``straight``
  must accept a per-sample time ``t`` of shape ``(bs,)``. ``predictor(x)`` returns ``(bs,)`` or ``(bs, 1)``.
* NFE: ``{"nsgf": T, "predictor": 1 or 0, "straight": n}``, counted from real calls (a classifier-free-guided
  field counts its two network calls per evaluation).
* Class conditioning: ``losses(nets, x0, x1, y1)`` trains every network on the labels of ``x1`` (the NSGF
  field on guided targets; the OT variants pair end points with data of their own class), and
  ``sample(nets, x0, y=labels)`` passes the labels to every network.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

from .._validation import check_labels, check_non_negative, check_positive
from ..guidance import CFGField, drop_labels
from ..matcher import SinkhornFlowMatcher
from ..pool import TrajectoryPool
from ..sampling import SampleResult
from ..sinkhorn import SinkhornOptions
from .endpoints import EndpointBuffer, Phase2Data
from .options import (
    DEFAULT_ENDPOINTS,
    DEFAULT_PHASE2,
    NSGFPlusPlusOptions,
    check_batch_fraction,
    check_endpoints,
    check_flow_steps,
    check_phase2,
    option_default,
)
from .sampler import nsgfpp_sample
from .shared import check_network, fused_field_losses, phase_views
from .variants import PHASE2

__all__ = ["NSGFPlusPlusObjective"]


def _mse(pred: object, target: Tensor, name: str) -> Tensor:
    if not isinstance(pred, Tensor) or pred.shape != target.shape:
        shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"{name}(t, x) must return x's shape {tuple(target.shape)}, got {shape}")
    return torch.mean((pred - target) ** 2)


class NSGFPlusPlusObjective(Phase2Data):
    r"""The NSGF++ training interface: one loss per network, and the matching two-phase sampler.

    A training loop calls :meth:`losses` on a source batch and a data batch and optimises the sum (the losses
    act on disjoint parameters, so one Adam on the sum equals one Adam per network); :meth:`sample` generates.

    Parameters
    ----------
    matcher : SinkhornFlowMatcher
        The NSGF phase: ``flow_steps`` (``T``, at most 5), ``step_size`` (η), Sinkhorn options and pool. Its
        targets train the NSGF field; in the ``"ot"`` variant its :meth:`~SinkhornFlowMatcher.simulate` also
        gives the phase-1 end points.
    phase2 : str
        The phase-2 variant, a key of :data:`~torchcfm_nsgf.nsgfpp.variants.PHASE2` (``"paper"``, ``"ot"``,
        ``"ot-source"``, ``"ot-predictor"``, ...): where the straight flow's training segments start and end,
        and whether a time predictor goes with them (:attr:`variant`).
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
    phase1_batch_fraction : float, optional
        In ``(0, 1]``: the share of each call's NSGF targets the NSGF field's loss uses (the first
        ``max(1, round(fraction * n))`` of the ``n`` drawn, a random subset); the straight flow uses the
        whole batch. Phase 1 asks the field for ``T`` velocities only, and a smaller share leaves more of a
        step's compute to the straight flow. Default: ``NSGFPlusPlusOptions().phase1_batch_fraction`` (1.0,
        the whole batch).
    network : {"separate", "shared"}
        ``nets["nsgf"]`` and ``nets["straight"]``, or one ``nets["field"]`` for both phases, called once per step
        (:mod:`~torchcfm_nsgf.nsgfpp.shared`). Default: ``NSGFPlusPlusOptions().network``.

    Attributes
    ----------
    variant : Phase2Variant
        The phase-2 variant object (:meth:`phase2_pairs` asks it for the segments).
    buffer : EndpointBuffer
        The ``"ot"`` variants' end points (:mod:`~torchcfm_nsgf.nsgfpp.endpoints`).
    net_names : tuple of str
        The networks :meth:`losses` and :meth:`sample` expect in ``nets``: ``("nsgf", "predictor",
        "straight")`` or ``("nsgf", "straight")``; ``"field"`` replaces both with ``network="shared"``.
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
        phase2: str = DEFAULT_PHASE2,
        generator: torch.Generator | None = None,
        refresh_every: int | None = None,
        endpoint_capacity: int | None = None,
        label_dropout: float = 0.0,
        null_label: int | None = None,
        endpoints: str = DEFAULT_ENDPOINTS,
        phase1_batch_fraction: float | None = None,
        network: str | None = None,
    ) -> None:
        if not isinstance(matcher, SinkhornFlowMatcher):
            raise TypeError(f"matcher must be a SinkhornFlowMatcher, got {type(matcher).__name__}")
        check_flow_steps(matcher.flow_steps, "matcher.flow_steps")
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
        if phase1_batch_fraction is None:
            phase1_batch_fraction = option_default("phase1_batch_fraction")
        self.phase1_batch_fraction = check_batch_fraction(phase1_batch_fraction)
        self.network = check_network(option_default("network") if network is None else network)
        self.endpoints = check_endpoints(endpoints)
        self.label_dropout = label_dropout
        self.null_label = null_label
        self.matcher = matcher
        self.phase2 = check_phase2(phase2)
        self.variant = PHASE2[phase2]()
        self.generator = generator
        self.refresh_every: int = matcher.refresh_every if refresh_every is None else refresh_every
        self.buffer = EndpointBuffer(endpoint_capacity)
        self.cfm = ConditionalFlowMatcher(sigma=0.0)
        fields = ("field",) if self.network == "shared" else ("nsgf", "straight")
        self.net_names: tuple[str, ...] = fields[:1] + ("predictor",) * self.uses_predictor + fields[1:]

    @classmethod
    def from_options(
        cls,
        options: NSGFPlusPlusOptions,
        *,
        sinkhorn: SinkhornOptions | None = None,
        pool: TrajectoryPool | None = None,
        generator: torch.Generator | None = None,
        flow_size: int | None = None,
        **kwargs: Any,
    ) -> NSGFPlusPlusObjective:
        """The objective ``options`` describe: a :class:`SinkhornFlowMatcher` on the paper's grid with
        ``options.flow_steps`` steps of ``options.step_size``, ``sinkhorn``, ``pool`` (default: a
        :class:`TrajectoryPool` of ``options.pool_capacity`` items drawing from ``generator``) and
        ``options.refresh_every``, simulating flows of ``flow_size`` particles collected from the calls
        (:class:`SinkhornFlowMatcher`'s ``flow_size``; None: flows of one call's batch); ``kwargs`` go to the
        constructor (``label_dropout``, ``null_label``, ...)."""
        if not isinstance(options, NSGFPlusPlusOptions):
            raise TypeError(f"options must be an NSGFPlusPlusOptions, got {type(options).__name__}")
        matcher = SinkhornFlowMatcher(
            flow_steps=options.flow_steps,
            step_size=options.step_size,
            path="grid",
            sinkhorn=sinkhorn,
            pool=TrajectoryPool(options.pool_capacity, generator=generator) if pool is None else pool,
            refresh_every=options.refresh_every,
            flow_size=flow_size,
            generator=generator,
        )
        return cls(
            matcher,
            phase2=options.phase2,
            generator=generator,
            endpoints=options.endpoints,
            phase1_batch_fraction=options.phase1_batch_fraction,
            network=options.network,
            **kwargs,
        )

    @property
    def flow_steps(self) -> int:
        """``T``, the NSGF steps of phase 1."""
        return self.matcher.flow_steps

    @property
    def n_steps(self) -> int:
        """Deprecated name of :attr:`flow_steps`."""
        warnings.warn(
            "NSGFPlusPlusObjective.n_steps is renamed flow_steps; n_steps will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.flow_steps

    @property
    def uses_predictor(self) -> bool:
        """Whether phase 2 starts at a predicted time (the variant's :attr:`~Phase2Variant.uses_predictor`)."""
        return self.variant.uses_predictor

    @property
    def n_calls(self) -> int:
        """:meth:`phase1_endpoints` calls so far (decides the next refresh)."""
        return self.buffer.n_calls

    @property
    def n_flows(self) -> int:
        """Phase-1 flows made for phase 2 so far."""
        return self.buffer.n_flows

    @property
    def endpoint_capacity(self) -> int | None:
        """The most end points the buffer keeps (None until the first flow fixes the default)."""
        return self.buffer.capacity

    def _check_nets(self, nets: Mapping[str, Any]) -> Mapping[str, Any]:
        """``nets`` checked, as ``{"nsgf", "straight"[, "predictor"]}`` (a shared network's two views)."""
        missing = [k for k in self.net_names if k not in nets]
        if missing:
            raise ValueError(
                f"nets misses {missing} for the {self.phase2!r} variant with network={self.network!r} "
                f"(needs {list(self.net_names)})"
            )
        return phase_views(nets, self.uses_predictor) if self.network == "shared" else nets

    def _uniform(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self.generator).to(device=like.device, dtype=like.dtype)

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
            0-d losses keyed by ``"nsgf"``, ``"predictor"`` (if used) and ``"straight"`` (any ``network``).
        """
        nets = self._check_nets(nets)
        shared = nets["straight"] if self.network == "shared" else None  # the one network (phase 2 unshifted)
        if y1 is None:
            t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
            y_nsgf = None
        else:
            t, xt, ut, _, y_nsgf = self.matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
        if self.phase1_batch_fraction < 1:
            k = max(1, round(self.phase1_batch_fraction * t.shape[0]))
            t, xt, ut = t[:k], xt[:k], ut[:k]
            y_nsgf = None if y_nsgf is None else y_nsgf[:k]
        y_nsgf = self._net_labels(y_nsgf)
        out = (
            {} if shared is not None else {"nsgf": _mse(self._field(nets["nsgf"], t, xt, y_nsgf), ut, "nsgf")}
        )
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
        if shared is None:
            out["straight"] = _mse(self._field(nets["straight"], s, xs, self._net_labels(y)), us, "straight")
        else:  # one call for both phases; the two parts are kept apart for logging
            parts = fused_field_losses(shared, (t, xt, ut, y_nsgf), (s, xs, us, self._net_labels(y)))
            out = {"nsgf": parts[0], **out, "straight": parts[1]}
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
        nets = self._check_nets(nets)
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
            flow_steps=self.flow_steps,
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
        return self.flow_steps + int(self.uses_predictor)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The matcher's resumable state (pool, counters, generator) and, under ``"endpoints"``, the end-point
        buffer, its counters and capacity, and this objective's generator state."""
        state = self.matcher.state_dict()
        state["endpoints"] = {
            **self.buffer.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (states written before the end-point buffer restore the matcher only)."""
        self.matcher.load_state_dict(state)
        ep = state.get("endpoints")
        if ep is None:
            return
        self.buffer.load_state_dict(ep)
        if ep.get("generator") is not None and self.generator is not None:
            self.generator.set_state(ep["generator"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.matcher!r}, phase2={self.phase2!r})"
