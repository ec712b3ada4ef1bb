"""NSGF and NSGF++ behind the :class:`~torchcfm_nsgf.images.methods.ImageMethod` interface.

NSGF on images (paper Algorithm 1 and 2): :class:`~torchcfm_nsgf.matcher.SinkhornFlowMatcher` simulates the
Sinkhorn flow of each ``(x0, x1)`` batch into a per-process :class:`~torchcfm_nsgf.pool.TrajectoryPool`
every ``refresh_every`` training batches and serves the regression batches from it; the UNet ``v_θ(t, x)``
regresses them; sampling integrates from 0 to 1 with ``T`` Euler steps by default (the matcher's grid,
exact for the served velocity; any NFE for ``path="straight"`` and ``"polyline"``).

NSGF++ on images (:mod:`torchcfm_nsgf.nsgfpp`): the networks are trained together by the shared loop (one
optimiser; the loss is the sum of :meth:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective.losses`, one loss per
network on disjoint parameters), the same objective that :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlus` trains on
vectors, built from ``settings.nsgfpp`` (:class:`~torchcfm_nsgf.NSGFPlusPlusOptions`): the UNet NSGF field on a
short flow (``flow_steps`` <= 5 of ``step_size``) served by the pool, the UNet straight flow on the segments
of the phase-2 variant, and for the variants with one the CNN time predictor
(:class:`~torchcfm_nsgf.networks.TimePredictorCNN`). With ``nsgfpp.network="shared"`` (the image default) one UNet
``"field"`` is both fields, phase 1 at shifted times, called once per training step
(:mod:`torchcfm_nsgf.nsgfpp.shared`). Times and pair orders come from the global generator
(saved in checkpoints). Sampling: :meth:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective.sample`; a budget ``nfe``
counts all calls, so phase 2 gets ``nfe - T - 1`` (with a predictor) or ``nfe - T`` Euler steps (default
:data:`NSGFPP_STRAIGHT_STEPS`).

Class-conditional (``num_classes``): the UNets take the labels; NSGF's pool stores the label of every item,
filled by guided flows (one Sinkhorn flow per class); NSGF++'s objective passes the labels to all its
networks (the CNN predictor gets an embedding of the data classes, never the null label).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._progress import bar_disable
from ..coupling import SinkhornCouplingMatcher
from ..matcher import SinkhornFlowMatcher
from ..networks import TimePredictorCNN
from ..nsgfpp import NSGFPlusPlusObjective
from ..pool import TrajectoryPool
from ..sampling import SampleResult, default_steps, solver_spec
from .methods import FlowMatchingMethod
from .settings import NSGFSettings
from .unet import build_unet, unet_classes

__all__ = [
    "NSGFPP_STRAIGHT_STEPS",
    "NSGFMethod",
    "NSGFPlusPlusMethod",
    "make_coupling",
    "make_nsgf",
    "make_nsgfpp",
    "make_pool",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: Phase-2 Euler steps of ``nsgf++`` when no budget is given.
NSGFPP_STRAIGHT_STEPS = 50


def make_pool(settings: NSGFSettings, rank: int) -> Any:
    """This process's pool shard (``pool_path/rank{rank}`` for a disk pool)."""
    if settings.pool_dtype not in _DTYPES:
        raise ValueError(f"pool_dtype must be one of {sorted(_DTYPES)}, got {settings.pool_dtype!r}")
    path = None
    if settings.pool_storage == "disk":
        if settings.pool_path is None:
            raise ValueError("pool_path is required with pool_storage='disk' (or give a ckpt_dir)")
        path = os.path.join(settings.pool_path, f"rank{rank}")
    return TrajectoryPool(
        settings.pool_capacity,
        max_bytes=settings.pool_max_bytes,
        dtype=_DTYPES[settings.pool_dtype],
        storage=settings.pool_storage,
        path=path,
    )


class NSGFMethod(FlowMatchingMethod):
    """NSGF: a UNet regressing the pool's Sinkhorn-flow velocities; Euler sampling with ``T`` steps.

    Also the large-coupling method (``name="coupling"``, a :class:`~torchcfm_nsgf.SinkhornCouplingMatcher`,
    whose straight pairs from the entropic plan share NSGF's staging and pool; ``default_steps`` Euler steps).
    The pool draws from the process's global torch generator (saved in checkpoints); the matcher's call
    counter (which decides when the pool is refreshed) is saved with the pool.
    """

    def __init__(
        self,
        matcher: Any,
        net: torch.nn.Module,
        num_classes: int | None = None,
        cfg_dropout: float = 0.0,
        *,
        name: str = "nsgf",
        default_steps: int | None = None,
    ) -> None:
        steps = matcher.flow_steps if default_steps is None else default_steps
        super().__init__(name, matcher, net, steps, num_classes, cfg_dropout)

    def prepare(self, batch_fn: Callable[[], tuple[Tensor, Tensor | None]], progress: bool = False) -> None:
        """Simulate the first flow into the pool before training (a progress bar shows the pool's size); a
        guided flow with the batch's labels for a class-conditional method."""
        pool = self.matcher.pool
        bar = tqdm(total=1, desc="NSGF pool", disable=bar_disable(progress), leave=False)
        x1, y1 = batch_fn()
        self.matcher.fill_pool(torch.randn_like(x1), x1, y1=y1)
        bar.update(1)
        bar.set_postfix(items=len(pool), MB=f"{pool.nbytes / 2**20:.1f}")
        bar.close()

    def state_dict(self) -> dict[str, Any]:
        return self.matcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matcher.load_state_dict(state)


class NSGFPlusPlusMethod(NSGFMethod):
    """NSGF++ through :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`: NSGF field (UNet, pool), straight
    flow (UNet) and, for ``phase2="paper"``, the time predictor (CNN), trained together.

    ``nets`` holds the objective's ``net_names`` (one UNet ``"field"`` for both phases with
    ``nsgfpp.network="shared"``). The pool and its warm-up are NSGF's (:class:`NSGFMethod`);
    the checkpoint state is the objective's (the pool, and the ``"ot"`` variant's end-point buffer).
    """

    def __init__(
        self,
        objective: Any,
        nets: dict[str, torch.nn.Module],
        num_classes: int | None = None,
        cfg_dropout: float = 0.0,
    ) -> None:
        self.name = "nsgf++"
        self.objective = objective
        self.matcher = objective.matcher
        self.nets = torch.nn.ModuleDict({k: nets[k] for k in objective.net_names})
        self.default_steps = objective.phase1_nfe() + NSGFPP_STRAIGHT_STEPS
        self.num_classes = num_classes
        self.cfg_dropout = cfg_dropout

    def state_dict(self) -> dict[str, Any]:
        """The objective's resumable state: the matcher's pool and counters, and the phase-1 end points."""
        return self.objective.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state)

    def loss(self, nets: torch.nn.ModuleDict, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        """Sum of the objective's per-network losses (disjoint parameters: one optimiser serves all)."""
        if (y1 is None) != (self.num_classes is None):
            raise ValueError(
                f"y1 is required: {self.name} is class-conditional"
                if y1 is None
                else f"y1 must be None: {self.name} was built without num_classes"
            )
        return sum(self.objective.losses(nets, x0, x1, y1).values())

    def sample(
        self,
        nets: torch.nn.ModuleDict,
        x0: Tensor,
        *,
        nfe: int | None = None,
        solver: str = "euler",
        y: Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SampleResult:
        """``nfe`` is the whole budget (T NSGF steps + the predictor call of ``"paper"`` + phase-2 steps;
        ignored by adaptive solvers, whose phase 2 runs to their tolerance). With ``guidance_scale`` the budget
        counts steps: the reported ``nfe`` counts network calls, two per guided step."""
        y = self._check_labels(y, x0, guidance_scale)
        before = self.objective.phase1_nfe()
        adaptive = solver_spec(solver).adaptive
        budget = default_steps(solver, None if adaptive else nfe, self.default_steps)  # None: adaptive
        if budget is not None and budget < before + 1:
            raise ValueError(
                f"nfe must be at least {before + 1} for nsgf++ ({self.objective.phase2!r}: {before} network "
                f"calls before phase 2, then one straight-flow step), got {budget}"
            )
        return self.objective.sample(
            nets,
            x0,
            solver=solver,
            straight_steps=None if budget is None else budget - before,
            y=y,
            guidance_scale=guidance_scale,
        )


def make_nsgf(
    shape: tuple[int, int, int],
    *,
    preset: str,
    settings: NSGFSettings,
    rank: int,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> NSGFMethod:
    """``nsgf`` for images of ``shape`` (class-conditional with ``num_classes``)."""
    s = settings
    matcher = SinkhornFlowMatcher(
        flow_steps=s.flow_steps,
        step_size=s.step_size,
        path=s.path,
        sinkhorn=s.sinkhorn,
        pool=make_pool(s, rank),
        refresh_every=s.refresh_every,
        flow_size=s.flow_size,
    )
    net = build_unet(shape, preset, num_classes=unet_classes(num_classes, cfg_dropout))
    return NSGFMethod(matcher, net, num_classes, cfg_dropout)


def make_coupling(
    shape: tuple[int, int, int],
    *,
    preset: str,
    settings: NSGFSettings,
    rank: int,
    sample_steps: int = 100,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> NSGFMethod:
    """``coupling`` for images of ``shape``: straight pairs drawn from the entropic plan of flows of
    ``settings.flow_size`` images (:class:`~torchcfm_nsgf.SinkhornCouplingMatcher`; its Sinkhorn options,
    pool and cadence are NSGF's), sampled with ``sample_steps`` Euler steps by default."""
    s = settings
    matcher = SinkhornCouplingMatcher(
        sinkhorn=s.sinkhorn, pool=make_pool(s, rank), refresh_every=s.refresh_every, flow_size=s.flow_size
    )
    net = build_unet(shape, preset, num_classes=unet_classes(num_classes, cfg_dropout))
    return NSGFMethod(matcher, net, num_classes, cfg_dropout, name="coupling", default_steps=sample_steps)


def make_nsgfpp(
    shape: tuple[int, int, int],
    *,
    preset: str,
    settings: NSGFSettings,
    rank: int,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> NSGFPlusPlusMethod:
    """``nsgf++`` for images of ``shape`` from ``settings.nsgfpp`` (class-conditional with ``num_classes``)."""
    objective = NSGFPlusPlusObjective.from_options(
        settings.nsgfpp_options(),
        sinkhorn=settings.sinkhorn,
        pool=make_pool(settings, rank),
        flow_size=settings.flow_size,
        label_dropout=cfg_dropout,
        null_label=num_classes if cfg_dropout > 0 else None,
    )
    classes = unet_classes(num_classes, cfg_dropout)
    fields = ("field",) if objective.network == "shared" else ("nsgf", "straight")
    nets = {fields[0]: build_unet(shape, preset, num_classes=classes)}
    if objective.uses_predictor:
        nets["predictor"] = TimePredictorCNN(shape[0], num_classes=num_classes)
    for name in fields[1:]:
        nets[name] = build_unet(shape, preset, num_classes=classes)
    return NSGFPlusPlusMethod(objective, nets, num_classes, cfg_dropout)
