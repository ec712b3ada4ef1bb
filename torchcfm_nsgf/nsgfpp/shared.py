r"""NSGF++ with one network for both phases: the NSGF field and the straight flow as two time ranges of one
field, trained in one network pass per step.

With ``network="shared"`` (:class:`~torchcfm_nsgf.NSGFPlusPlusOptions`) the objective expects one network
``nets["field"]`` instead of ``nets["nsgf"]`` and ``nets["straight"]``. Phase 1 reads it at the shifted times
:math:`t - s_1` with :math:`s_1 =` :data:`PHASE1_TIME_SHIFT` (the NSGF clock :math:`t \in [0, 1)` lands on
:math:`[-2, -1)`), phase 2 at its own times :math:`s \in [0, 1]`: the two ranges are disjoint, so one network
holds two fields without a phase input, and any ``net(t, x)`` that accepts real-valued times (torchcfm's UNet
and MLPs, whose sinusoidal or linear time inputs take any real ``t``) serves. A training step evaluates the
NSGF items and the straight-flow items in one call on their concatenation (:func:`fused_field_losses`): one
forward and one backward pass of one network, where two networks need two of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NETWORKS",
    "PHASE1_TIME_SHIFT",
    "PhaseOneView",
    "check_network",
    "fused_field_losses",
    "phase_views",
    "require_separate",
]

#: The ``network`` choices: a network per phase, or one network for both.
NETWORKS = ("separate", "shared")

#: Phase 1's time shift in a shared network: NSGF time ``t`` is read as ``t - PHASE1_TIME_SHIFT``.
PHASE1_TIME_SHIFT = 2.0


class PhaseOneView(nn.Module):
    """The NSGF field of a shared network: ``view(t, x, **kw) == net(t - PHASE1_TIME_SHIFT, x, **kw)``.

    Holds ``net`` as its only submodule (no parameters of its own), so that a view built for a call
    integrates, trains and switches train/eval mode with the network itself.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: Tensor | float, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        return self.net(t.to(x.dtype) - PHASE1_TIME_SHIFT, x, *args, **kwargs)


def check_network(network: object, name: str = "network") -> str:
    """One of :data:`NETWORKS`."""
    if network not in NETWORKS:
        raise ValueError(f"{name} must be one of {list(NETWORKS)}, got {network!r}")
    return network


def require_separate(network: str, owner: str) -> None:
    """Refuse ``network="shared"`` where each phase has its own optimiser (``owner`` names the class)."""
    if network != "separate":
        raise ValueError(
            f"network={network!r} is not available in {owner}, which trains a network per phase with its own "
            "optimiser; use NSGFPlusPlusObjective (as the image loop does) for a shared network"
        )


def phase_views(nets: Mapping[str, Any], predictor: bool) -> dict[str, Any]:
    """``{"nsgf", "straight"[, "predictor"]}`` of a shared ``nets["field"]``: the phase-1 view and the network."""
    views: dict[str, Any] = {"nsgf": PhaseOneView(nets["field"]), "straight": nets["field"]}
    if predictor:
        views["predictor"] = nets["predictor"]
    return views


def _call(net: Any, t: Tensor, x: Tensor, y: Tensor | None) -> Tensor:
    return net(t, x) if y is None else net(t, x, y=y)


def fused_field_losses(
    net: Any,
    phase1: tuple[Tensor, Tensor, Tensor, Tensor | None],
    phase2: tuple[Tensor, Tensor, Tensor, Tensor | None],
) -> tuple[Tensor, Tensor]:
    r"""The NSGF field's and the straight flow's mean squared errors from one call of the shared ``net``.

    Parameters
    ----------
    net : callable
        ``net(t, x[, y=labels])`` with per-sample times ``t`` of shape ``(k + n,)``.
    phase1 : tuple
        ``(t, x_t, u_t, labels)``: ``k`` NSGF items on the NSGF clock (``t`` shape ``(k,)``, ``x_t`` and the
        target ``u_t`` shape ``(k, *dim)``, labels ``(k,)`` or None).
    phase2 : tuple
        ``(s, x_s, u_s, labels)``: ``n`` straight-flow items on the phase-2 clock.

    Returns
    -------
    tuple of Tensor
        0-d losses: :math:`\operatorname{mean}\lVert v(t - s_1, x_t) - u_t\rVert^2` and
        :math:`\operatorname{mean}\lVert v(s, x_s) - u_s\rVert^2`, the same values as two separate calls.
    """
    (t, xt, ut, yt), (s, xs, us, ys) = phase1, phase2
    if (yt is None) != (ys is None):
        raise ValueError("both phases need labels, or neither")
    k = xt.shape[0]
    times = torch.cat([t.reshape(k).to(xs.dtype) - PHASE1_TIME_SHIFT, s.reshape(xs.shape[0]).to(xs.dtype)])
    labels = None if yt is None else torch.cat([yt.reshape(k), ys.reshape(xs.shape[0])])
    out = _call(net, times, torch.cat([xt.to(xs.dtype), xs]), labels)
    target = torch.cat([ut.to(us.dtype), us])
    if not isinstance(out, Tensor) or out.shape != target.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"field(t, x) must return x's shape {tuple(target.shape)}, got {shape}")
    err = (out - target) ** 2
    return err[:k].mean(), err[k:].mean()
