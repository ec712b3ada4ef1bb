"""NSGF and NSGF++ behind the :class:`~torchcfm_nsgf.images.methods.ImageMethod` interface (private).

A method is offered only when the modules it builds on import (``torchcfm_nsgf.matcher`` and
``torchcfm_nsgf.pool`` for ``nsgf``; ``torchcfm_nsgf.nsgfpp`` as well for ``nsgf++``).

NSGF on images (paper Algorithm 1 and 2): :class:`~torchcfm_nsgf.matcher.SinkhornFlowMatcher` simulates the
Sinkhorn flow of each ``(x0, x1)`` batch into a per-process :class:`~torchcfm_nsgf.pool.TrajectoryPool`
every ``refresh_every`` training batches and serves the regression batches from it; the UNet ``v_θ(t, x)``
regresses them; sampling is ``T`` Euler steps on ``[0, 1]`` (NFE = T).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .methods import FlowMatchingMethod, NSGFSettings, build_unet

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

try:
    from ..matcher import SinkhornFlowMatcher
    from ..pool import TrajectoryPool
except ImportError:  # pragma: no cover - only while the NSGF modules are absent
    SinkhornFlowMatcher = None
    TrajectoryPool = None


def available() -> list[str]:
    """NSGF method names whose building blocks import in this installation."""
    return [] if SinkhornFlowMatcher is None else ["nsgf"]


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
        super().__init__("nsgf", matcher, net, default_steps=matcher.n_steps)

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


def make(name: str, shape: tuple[int, int, int], *, preset: str, settings: NSGFSettings, rank: int) -> Any:
    """Build ``nsgf`` (or ``nsgf++``) for images of ``shape``."""
    if name not in available():
        raise ValueError(f"method {name!r} is not available in this installation (available: {available()})")
    s = settings
    matcher = SinkhornFlowMatcher(
        n_steps=s.n_steps if name == "nsgf" else s.phase1_steps,
        step_size=s.step_size if name == "nsgf" else s.phase1_step_size,
        blur=s.blur,
        scaling=s.scaling,
        pool=make_pool(s, rank),
        refresh_every=s.refresh_every,
    )
    return NSGFMethod(matcher, build_unet(shape, preset))
