r"""Flow matching on pairs drawn from a large entropic OT plan: the large-coupling baseline for NSGF.

OT-CFM (torchcfm's ``ExactOptimalTransportConditionalFlowMatcher``) pairs each batch by the exact OT plan of
that batch. Pairing by the entropic plan of a problem much larger than a batch (Zhang, Mousavi-Hosseini,
Klein and Cuturi, "On Fitting Flow Models with Large Sinkhorn Couplings", 2025) gives straighter pairs, the
closer to the population OT map the larger the problem. :class:`SinkhornCouplingMatcher` does this with this
package's engine and with :class:`~torchcfm_nsgf.SinkhornFlowMatcher`'s staging (``flow_size``), pool and
serving, so that it is compared with NSGF at the same number of points per solve.

Given particles :math:`x_i` (weights :math:`a_i = 1/n`) and targets :math:`y_j` (:math:`b_j = 1/m`), the
solved plan :math:`\pi_{ij} = a_i b_j \exp((f_i + g_j - c(x_i, y_j))/\varepsilon)` (GeomLoss's ``p=2``
convention, :math:`c = \tfrac12\|x - y\|^2`, :math:`\varepsilon = \mathrm{blur}^2`) is sampled row by row:
each particle :math:`i` draws its partner :math:`j` from the conditional

.. math::
    \pi(j \mid i) = \operatorname{softmax}_j\big(\log b_j + (g_j - c(x_i, y_j))/\varepsilon\big),

the engine's soft assignment :math:`w_j(x_i)` (the same weights whose mean is the barycentric projection).
The served targets are torchcfm's straight interpolation between the pair, ``xt = (1 - t) x_i + t y_j``,
``ut = y_j - x_i``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .flow import SinkhornFlow
from .matcher import SinkhornFlowMatcher
from .pool import TrajectoryPool
from .sinkhorn import SinkhornOptions

__all__ = ["SinkhornCouplingMatcher", "sample_plan_rows"]

# Rows of the plan handled at once when drawing partners: memory block x m.
_ROW_BLOCK = 1024


def sample_plan_rows(
    x: Tensor, y: Tensor, g: Tensor, eps: float, generator: torch.Generator | None = None
) -> Tensor:
    r"""Draw one column index per row of the entropic plan with target potential ``g``.

    Parameters
    ----------
    x : Tensor, shape (n, *dim)
        Particles (rows of the plan).
    y : Tensor, shape (m, *dim)
        Targets (columns).
    g : Tensor, shape (m,)
        Dual potential at the targets (cost units), e.g. ``SinkhornSolution.g_xy``.
    eps : float
        :math:`\varepsilon = \mathrm{blur}^2`.
    generator : torch.Generator, optional
        Generator of the draws. The noise is drawn on ``x``'s device: with a generator on another device
        (a CPU generator for data on a GPU), a generator on ``x``'s device is seeded from one draw of it, so
        that the same seed gives the same partners on the same device. Default: the global RNG of ``x``'s
        device.

    Returns
    -------
    Tensor, shape (n,), int64 on ``x``'s device
        ``j ~ softmax_j(log(1/m) + (g_j - ½‖x_i − y_j‖²)/ε)`` independently per row, by the Gumbel-max trick
        over blocks of rows (memory ``block × m``, never ``n × m``).
    """
    n, m = x.shape[0], y.shape[0]
    xf, yf = x.reshape(n, -1), y.reshape(m, -1)
    gf = g.to(xf.dtype)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    y_sq = 0.5 * yf.square().sum(1)
    if generator is not None and generator.device != x.device:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        generator = torch.Generator(device=x.device).manual_seed(seed)
    for start in range(0, n, _ROW_BLOCK):
        xb = xf[start : start + _ROW_BLOCK]
        cost = 0.5 * xb.square().sum(1, keepdim=True) + y_sq - xb @ yf.T  # ½‖x − y‖², (block, m)
        logits = (gf - cost) / eps  # log b_j is a constant per row: it drops out of the argmax
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-300)))
        out[start : start + xb.shape[0]] = (logits.double() + gumbel).argmax(1)
    return out


class PlanCoupling(SinkhornFlow):
    """The coupling matcher's flow part: one plan solve and one partner per particle instead of Euler steps."""

    def steps(
        self, x0: Tensor, x1: Tensor, blur: float
    ) -> tuple[Tensor, Tensor, list[float], list[int], int]:
        """One solve of the plan of ``(x0, x1)`` and one partner per particle: positions (2, n, *dim) =
        ``(x0, x1[j])``, velocity (1, n, *dim) = ``x1[j] - x0``."""
        sol = self.sinkhorn.solve(x0, x1, blur=blur)
        partner = sample_plan_rows(x0, x1, sol.g_xy, sol.eps, self.generator)
        end = x1[partner.to(x1.device)]
        xs = torch.stack([x0, end])
        us = (end - x0).unsqueeze(0)
        if not math.isfinite(sol.marginal_error):
            raise FloatingPointError("the plan's Sinkhorn solve returned a non-finite marginal error")
        return xs, us, [sol.marginal_error], [sol.n_iter + sol.n_anneal], int(not sol.converged)


class SinkhornCouplingMatcher(SinkhornFlowMatcher):
    r"""Straight flow matching on pairs drawn from the entropic OT plan of a large Sinkhorn problem.

    A torchcfm matcher: ``sample_location_and_conditional_flow(x0, x1) -> (t, xt, ut)``, served exactly as
    :class:`SinkhornFlowMatcher` serves its straight path, with the same pool, refresh cadence, staging
    (``flow_size``), guided calls (one plan per class), checkpoints and :meth:`reset`. Where NSGF moves
    each particle along its simulated Sinkhorn flow, this matcher pairs particle :math:`x_i` with one target
    :math:`y_j` drawn from the plan's row :math:`\pi(\cdot \mid i)` (module docstring) and serves the
    segment :math:`x_i \to y_j`.

    Parameters
    ----------
    sigma : float
        Gaussian noise width around the segments, as in torchcfm.
    sinkhorn : SinkhornOptions, optional
        Engine settings of the plan (default as :class:`SinkhornFlowMatcher`'s: blur 0.1 of the targets'
        scale, ``HIGH_DIM_BLUR`` on images).
    pool, refresh_every, flow_size, balanced, generator, progress
        As in :class:`SinkhornFlowMatcher`; the generator also draws the partners.

    Notes
    -----
    A plan solve here runs the engine's full solve, which also solves the particles' symmetric problem
    (needed for NSGF's velocity, not for the plan): about twice the iterations the plan alone needs.
    """

    def __init__(
        self,
        sigma: float = 0.0,
        *,
        sinkhorn: SinkhornOptions | None = None,
        pool: TrajectoryPool | Literal["auto"] | None = "auto",
        refresh_every: int = 50,
        flow_size: int | None = None,
        balanced: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(
            sigma,
            flow_steps=1,
            step_size=1.0,
            path="straight",
            sinkhorn=sinkhorn,
            pool=pool,
            refresh_every=refresh_every,
            flow_size=flow_size,
            balanced=balanced,
            generator=generator,
            progress=progress,
        )

    def _make_flow(self, flow_steps, step_size, sinkhorn, generator, progress) -> SinkhornFlow:
        return PlanCoupling(flow_steps, step_size, sinkhorn, generator=generator, progress=progress)

    def __repr__(self) -> str:
        pool = "auto" if self._auto_pool else ("yes" if self.pool is not None else "no")
        return (
            f"{type(self).__name__}(sigma={self.sigma:g}, sinkhorn={self.sinkhorn}, pool={pool}, "
            f"refresh_every={self.refresh_every}"
            + ("" if self.flow_size is None else f", flow_size={self.flow_size}")
            + ")"
        )
