r"""MeanFlow (Geng, Deng, Bai, Kolter and He, "Mean Flows for One-step Generative Modeling", 2025): a network
of the average velocity over a time interval, sampled in one step.

Clock: torchcfm's, :math:`\tau = 0` noise and :math:`\tau = 1` data, on the straight path
:math:`z_\tau = (1 - \tau)\, x_0 + \tau\, x_1` with instantaneous (conditional) velocity :math:`v = x_1 - x_0`.
The network :math:`u_\theta(z, s, t)` is the average velocity from the time :math:`s` of its input to a later
time :math:`t \ge s`,

.. math::
    u(z_s, s, t) = \frac{1}{t - s} \int_s^t v(z_\tau, \tau)\, d\tau = \frac{z_t - z_s}{t - s},

so that one evaluation jumps from :math:`s` to :math:`t`: :math:`z_t = z_s + (t - s)\, u(z_s, s, t)`, and one step
from noise is :math:`x = \varepsilon + u(\varepsilon, 0, 1)`. Differentiating :math:`(t - s)\, u(z_s, s, t)` in
:math:`s` along the path gives the MeanFlow identity and the regression target

.. math::
    u_{\mathrm{tgt}} = \operatorname{sg}\Big[ v + (t - s)\,\big( v \cdot \partial_z u_\theta + \partial_s u_\theta \big) \Big],

whose total derivative is one Jacobian-vector product of :math:`u_\theta` with the tangent :math:`(v, 1, 0)` for
:math:`(z, s, t)` (``torch.func.jvp``; the primal output is :math:`u_\theta` itself, with its graph). The paper
writes the same identity in its own clock (:math:`t = 1` noise): its :math:`(r, t)` are :math:`(1 - t, 1 - s)`
here, its :math:`u` is :math:`-u` here, and its tangent :math:`(v, 0, 1)` becomes :math:`(v, 1, 0)`.

Loss (the paper's adaptive weighting): :math:`\Delta = u_\theta - u_{\mathrm{tgt}}`,
:math:`\mathcal L = \operatorname{mean}_i\, \operatorname{sg}(w_i)\, \|\Delta_i\|^2` with
:math:`w_i = 1 / (\|\Delta_i\|^2 + c)^p`, the squared norm summed over each sample's entries.

Time sampler (the paper's best ImageNet setting in its ablation): two draws from a logit-normal distribution,
the earlier one is :math:`s` and the later one :math:`t`; a share ``1 - unequal_share`` of the pairs then has
:math:`t = s` (plain flow matching at :math:`s`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.models import MLP

from ._transfer import to_device
from ._validation import check_cloud, check_positive, check_same_device, check_same_features
from .sampling import SampleResult

__all__ = ["AverageVelocityMLP", "MeanFlow", "meanflow_sample"]

#: ``u(z, s, t, **kwargs) -> Tensor`` of z's shape: the average velocity from time s to time t.
AverageVelocity = Callable[..., Tensor]


class AverageVelocityMLP(nn.Module):
    r"""torchcfm's ``MLP`` as an average-velocity network :math:`u(z, s, t)`: input ``cat([z, s, t - s])``.

    The paper conditions on the time and the interval length; here the time of the input :math:`s` and
    :math:`t - s`.

    Parameters
    ----------
    dim : int
        Features of ``z``.
    width : int
        Hidden width of torchcfm's MLP (three hidden layers, SELU).
    """

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        check_positive(dim, "dim", integer=True)
        check_positive(width, "width", integer=True)
        self.net = MLP(dim=dim + 1, out_dim=dim, w=width, time_varying=True)

    def forward(self, z: Tensor, s: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """``z`` (n, dim), ``s`` and ``t`` (n,) -> the average velocity (n, dim)."""
        return self.net(torch.cat([z, s[:, None], (t - s)[:, None]], dim=-1))


class MeanFlow:
    r"""The MeanFlow objective: times, the JVP regression target and the adaptively weighted loss.

    Stateless: every call depends on its arguments (and ``generator``) only.

    Parameters
    ----------
    logit_mean, logit_std : float
        The logit-normal time distribution, in this module's clock (:math:`\tau = 1` data): each draw is
        ``sigmoid(N(logit_mean, logit_std**2))``. Default ``(0.4, 1.0)``: the paper's best ImageNet setting
        ``lognorm(-0.4, 1.0)``, written in its clock (:math:`t = 1` noise), is ``logit_mean = +0.4`` here.
    unequal_share : float in [0, 1]
        Share of the pairs with :math:`s \ne t` (the rest are flow-matching pairs, :math:`t = s`). Default
        0.25, the paper's best in its ablation (0 % fails at one step; 50 % and 100 % were worse).
    weight_power, weight_eps : float
        :math:`p` and :math:`c` of the adaptive weight :math:`1 / (\|\Delta\|^2 + c)^p`; ``weight_power=0`` is
        the plain squared error. Default :math:`p = 1`, :math:`c = 10^{-3}` (the paper's best ImageNet setting).
    """

    def __init__(
        self,
        *,
        logit_mean: float = 0.4,
        logit_std: float = 1.0,
        unequal_share: float = 0.25,
        weight_power: float = 1.0,
        weight_eps: float = 1e-3,
    ) -> None:
        _check_finite(logit_mean, "logit_mean")
        check_positive(logit_std, "logit_std")
        _check_finite(unequal_share, "unequal_share")
        if not 0.0 <= unequal_share <= 1.0:
            raise ValueError(f"unequal_share must lie in [0, 1], got {unequal_share}")
        _check_finite(weight_power, "weight_power")
        if weight_power < 0:
            raise ValueError(f"weight_power must be >= 0, got {weight_power}")
        check_positive(weight_eps, "weight_eps")
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.unequal_share = float(unequal_share)
        self.weight_power = float(weight_power)
        self.weight_eps = float(weight_eps)

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Times ``(s, t)``, each of shape (n,), in ``like``'s dtype and on its device, with :math:`s \le t`.

        Two logit-normal draws per pair, sorted; then :math:`t = s` for each pair with probability
        ``1 - unequal_share``. Drawn on the CPU from ``generator`` (torch's global RNG without one).
        """
        check_positive(n, "n", integer=True)
        draws = torch.sigmoid(
            torch.randn(2, n, generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
        )
        s, t = draws.min(0).values, draws.max(0).values
        equal = torch.rand(n, generator=generator, dtype=torch.float64) >= self.unequal_share
        t = torch.where(equal, s, t)
        return to_device(s, like.device, like.dtype), to_device(t, like.device, like.dtype)

    def target(
        self,
        model: AverageVelocity,
        z: Tensor,
        s: Tensor,
        t: Tensor,
        v: Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""The network's output and its stop-gradient MeanFlow target, by one JVP.

        Parameters
        ----------
        model : callable
            ``model(z, s, t, **model_kwargs)`` -> the average velocity, z's shape.
        z : Tensor, shape (n, *dim)
            Points on the path at time ``s``.
        s, t : Tensor, shape (n,)
            Start and end times, :math:`s \le t`.
        v : Tensor, shape (n, *dim)
            Instantaneous velocity at ``(z, s)`` (the conditional :math:`x_1 - x_0`).
        model_kwargs : mapping, optional
            Extra keyword arguments of the model (e.g. class labels ``{"y": y}``).

        Returns
        -------
        u : Tensor, shape (n, *dim)
            :math:`u_\theta(z, s, t)`, with its graph to the parameters.
        target : Tensor, shape (n, *dim)
            :math:`\operatorname{sg}[v + (t - s)(v \cdot \partial_z u_\theta + \partial_s u_\theta)]`.
        """
        kwargs = dict(model_kwargs or {})

        def u_of(z_: Tensor, s_: Tensor, t_: Tensor) -> Tensor:
            return model(z_, s_, t_, **kwargs)

        u, du = torch.func.jvp(u_of, (z, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
        gap = (t - s).reshape(-1, *([1] * (z.dim() - 1)))
        return u, (v + gap * du).detach()

    def loss(
        self,
        model: AverageVelocity,
        x0: Tensor,
        x1: Tensor,
        *,
        s: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> Tensor:
        r"""The adaptively weighted MeanFlow loss on the straight path from noise ``x0`` to data ``x1``.

        Parameters
        ----------
        model : callable
            ``model(z, s, t, **model_kwargs)``, trained through the returned loss.
        x0, x1 : Tensor, shape (n, *dim)
            Noise and data, paired row by row.
        s, t : Tensor, shape (n,), optional
            Times (:math:`0 \le s \le t \le 1`); drawn by :meth:`sample_times` with ``generator`` when omitted
            (give both or neither).
        model_kwargs : mapping, optional
            Extra keyword arguments of the model (e.g. ``{"y": y}``).

        Returns
        -------
        Tensor, shape ()
            :math:`\operatorname{mean}_i \operatorname{sg}(w_i)\|\Delta_i\|^2`.
        """
        check_cloud(x0, "x0")
        check_cloud(x1, "x1")
        check_same_features(x0, x1, "x0", "x1")
        check_same_device(("x0", x0), ("x1", x1), ("s", s), ("t", t))
        n = x0.shape[0]
        if x1.shape[0] != n:
            raise ValueError(
                f"x0 and x1 must hold the same number of rows (pairs), got {n} and {x1.shape[0]}"
            )
        if (s is None) != (t is None):
            raise ValueError("give both s and t, or neither")
        if s is None:
            s, t = self.sample_times(n, x0, generator)
        else:
            s, t = _check_times(s, t, n, x0)
        tau = s.reshape(-1, *([1] * (x0.dim() - 1)))
        z = (1 - tau) * x0 + tau * x1
        u, target = self.target(model, z, s, t, x1 - x0, model_kwargs)
        sq = (u - target).square().reshape(n, -1).sum(1)
        weight = (sq.detach() + self.weight_eps) ** -self.weight_power
        return (weight * sq).mean()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(logit_mean={self.logit_mean:g}, logit_std={self.logit_std:g}, "
            f"unequal_share={self.unequal_share:g}, weight_power={self.weight_power:g}, "
            f"weight_eps={self.weight_eps:g})"
        )


@torch.no_grad()
def meanflow_sample(
    model: AverageVelocity,
    x0: Tensor,
    n_steps: int = 1,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SampleResult:
    r"""Sample by ``n_steps`` jumps of the average velocity over a uniform grid of [0, 1].

    :math:`x_{k+1} = x_k + (\tau_{k+1} - \tau_k)\, u(x_k, \tau_k, \tau_{k+1})`, :math:`\tau_k = k / n`; one step
    is :math:`x = \varepsilon + u(\varepsilon, 0, 1)`.

    Parameters
    ----------
    model : callable
        ``model(z, s, t, **model_kwargs)``.
    x0 : Tensor, shape (n, *dim)
        Noise at :math:`\tau = 0`.
    n_steps : int
        Jumps, each one network evaluation.
    model_kwargs : mapping, optional
        Extra keyword arguments of every call (e.g. labels ``{"y": y}``).

    Returns
    -------
    SampleResult
        ``samples`` (n, *dim) and ``nfe = {"field": n_steps}``, counted from the calls made.
    """
    check_cloud(x0, "x0")
    check_positive(n_steps, "n_steps", integer=True)
    kwargs = dict(model_kwargs or {})
    grid = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64).tolist()
    x, calls = x0, 0
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        s = torch.full((x.shape[0],), a, dtype=x0.dtype, device=x0.device)
        t = torch.full_like(s, b)
        x = x + (b - a) * model(x, s, t, **kwargs)
        calls += 1
    return SampleResult(samples=x, nfe={"field": calls})


def _check_finite(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_times(s: object, t: object, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    for value, name in ((s, "s"), (t, "t")):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor of shape ({n},)")
        if value.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x0, got {tuple(value.shape)}")
    if not bool(((s >= 0) & (s <= t) & (t <= 1)).all()):
        raise ValueError("times must satisfy 0 <= s <= t <= 1")
    return s.to(like.dtype), t.to(like.dtype)
