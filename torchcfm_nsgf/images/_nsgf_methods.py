"""NSGF and NSGF++ behind the :class:`~torchcfm_nsgf.images.methods.ImageMethod` interface (private).

A method is offered only when the modules it builds on import (``torchcfm_nsgf.matcher`` and
``torchcfm_nsgf.pool`` for ``nsgf``; ``torchcfm_nsgf.nsgfpp`` as well for ``nsgf++``).

NSGF on images (paper Algorithm 1 and 2): :class:`~torchcfm_nsgf.matcher.SinkhornFlowMatcher` simulates the
Sinkhorn flow of each ``(x0, x1)`` batch into a per-process :class:`~torchcfm_nsgf.pool.TrajectoryPool`
every ``refresh_every`` training batches and serves the regression batches from it; the UNet ``v_θ(t, x)``
regresses them; sampling integrates from 0 to 1 with ``T`` Euler steps by default (the matcher's grid,
exact for the served velocity; any NFE for ``path="straight"`` and ``"polyline"``).

NSGF++ on images (paper Algorithm 3, :mod:`torchcfm_nsgf.nsgfpp`): three networks trained together by the
shared loop (one optimiser; the loss is the sum of three losses on disjoint parameters): the UNet NSGF field
on a short flow (``phase1_steps`` <= 5, ``phase1_step_size``) served by the pool, the CNN time predictor
(:class:`~torchcfm_nsgf.networks.TimePredictorCNN`) and the UNet straight flow on straight interpolations
(torchcfm's ``ConditionalFlowMatcher(sigma=0)``, ``t`` from the global generator, saved in checkpoints).
Sampling: :func:`~torchcfm_nsgf.nsgfpp.nsgfpp_sample`; a budget ``nfe`` counts all calls, so phase 2 gets
``nfe - T - 1`` Euler steps (default 50).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sampling import SampleResult, solver_spec
from .methods import FlowMatchingMethod, NSGFSettings, build_unet

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

try:
    from ..matcher import SinkhornFlowMatcher
    from ..pool import TrajectoryPool
except ImportError:  # pragma: no cover - only while the NSGF modules are absent
    SinkhornFlowMatcher = None
    TrajectoryPool = None

try:
    from ..networks import TimePredictorCNN
    from ..nsgfpp import MAX_PHASE1_STEPS, nsgfpp_sample
except ImportError:  # pragma: no cover - only while the NSGF++ modules are absent
    nsgfpp_sample = None

#: Phase-2 Euler steps of ``nsgf++`` when no budget is given.
NSGFPP_STRAIGHT_STEPS = 50


def available() -> list[str]:
    """NSGF method names whose building blocks import in this installation."""
    if SinkhornFlowMatcher is None:
        return []
    return ["nsgf"] if nsgfpp_sample is None else ["nsgf", "nsgf++"]


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

    The pool draws from the process's global torch generator (saved in checkpoints); the matcher's call
    counter (which decides when the pool is refreshed) is saved with the pool.
    """

    def __init__(self, matcher: Any, net: torch.nn.Module) -> None:
        super().__init__("nsgf", matcher, net, default_steps=matcher.flow_steps)

    def prepare(self, x1_fn: Callable[[], Tensor], progress: bool = False) -> None:
        """Simulate the first flow into the pool before training (a progress bar shows the pool's size)."""
        pool = self.matcher.pool
        bar = tqdm(total=1, desc="NSGF pool", disable=not progress, leave=False)
        x1 = x1_fn()
        self.matcher.fill_pool(torch.randn_like(x1), x1)
        bar.update(1)
        bar.set_postfix(items=len(pool), MB=f"{pool.nbytes / 2**20:.1f}")
        bar.close()

    def state_dict(self) -> dict[str, Any]:
        return self.matcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matcher.load_state_dict(state)


class NSGFPlusPlusMethod(NSGFMethod):
    """NSGF++: NSGF field (UNet, pool), time predictor (CNN) and straight flow (UNet), trained together.

    ``nets`` holds ``nsgf``, ``predictor`` and ``straight``. The pool, its warm-up and its checkpoint state
    are NSGF's (:class:`NSGFMethod`).
    """

    def __init__(
        self, matcher: Any, nsgf: torch.nn.Module, predictor: torch.nn.Module, straight: torch.nn.Module
    ) -> None:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        self.name = "nsgf++"
        self.matcher = matcher
        self.cfm = ConditionalFlowMatcher(sigma=0.0)
        self.nets = torch.nn.ModuleDict({"nsgf": nsgf, "predictor": predictor, "straight": straight})
        self.default_steps = matcher.flow_steps + 1 + NSGFPP_STRAIGHT_STEPS

    def loss(self, nets: torch.nn.ModuleDict, x0: Tensor, x1: Tensor) -> Tensor:
        t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
        loss_nsgf = torch.mean((nets["nsgf"](t, xt) - ut) ** 2)
        s = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        _, xs, us = self.cfm.sample_location_and_conditional_flow(x0, x1, t=s)
        loss_predictor = torch.mean((nets["predictor"](xs) - s) ** 2)
        loss_straight = torch.mean((nets["straight"](s, xs) - us) ** 2)
        return loss_nsgf + loss_predictor + loss_straight

    def sample(
        self, nets: torch.nn.ModuleDict, x0: Tensor, *, nfe: int | None = None, solver: str = "euler"
    ) -> SampleResult:
        """``nfe`` is the whole budget (T NSGF steps + 1 predictor call + phase-2 steps; ignored by adaptive
        solvers, whose phase 2 runs to their tolerance)."""
        T = self.matcher.flow_steps
        budget = self.default_steps if nfe is None else nfe
        adaptive = solver_spec(solver).adaptive
        if not adaptive and budget < T + 2:
            raise ValueError(
                f"nfe must be at least T + 2 = {T + 2} for nsgf++ (T NSGF steps, the predictor, "
                f"one straight-flow step), got {budget}"
            )
        return nsgfpp_sample(
            nets["nsgf"],
            nets["predictor"],
            nets["straight"],
            x0,
            n_steps=T,
            solver=solver,
            straight_steps=None if adaptive else budget - T - 1,
        )


def make(
    name: str,
    shape: tuple[int, int, int],
    *,
    preset: str,
    settings: NSGFSettings,
    rank: int,
) -> Any:
    """Build ``nsgf`` (or ``nsgf++``) for images of ``shape``."""
    if name not in available():
        raise ValueError(f"method {name!r} is not available in this installation (available: {available()})")
    s = settings
    if name == "nsgf++" and s.phase1_steps > MAX_PHASE1_STEPS:
        raise ValueError(f"phase1_steps must be at most {MAX_PHASE1_STEPS} for nsgf++, got {s.phase1_steps}")
    matcher = SinkhornFlowMatcher(
        flow_steps=s.flow_steps if name == "nsgf" else s.phase1_steps,
        step_size=s.step_size if name == "nsgf" else s.phase1_step_size,
        path=s.path if name == "nsgf" else "grid",
        sinkhorn=s.sinkhorn,
        pool=make_pool(s, rank),
        refresh_every=s.refresh_every,
    )
    if name == "nsgf":
        return NSGFMethod(matcher, build_unet(shape, preset))
    return NSGFPlusPlusMethod(
        matcher, build_unet(shape, preset), TimePredictorCNN(shape[0]), build_unet(shape, preset)
    )
