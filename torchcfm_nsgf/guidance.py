r"""Classifier-free guidance (Ho & Salimans, 2022) for class-conditional fields ``model(t, x, y)``.

Training: :func:`drop_labels` replaces each label by a *null label* with probability ``p`` (0.1 is the usual
choice), so that one network learns the conditional field :math:`v_c(t, x) = v(t, x, y)` and the
unconditional one :math:`v_u(t, x) = v(t, x, \varnothing)`. The null label is one more class: a torchcfm
``UNetModelWrapper`` (or :class:`~torchcfm_nsgf.networks.VelocityMLP`) for ``K`` classes is built with
``num_classes = K + 1`` and ``null_label = K``.

Sampling: :class:`CFGField` is the guided field

.. math::
    v_w(t, x, y) = v_u(t, x) + w\,\big(v_c(t, x, y) - v_u(t, x)\big),

``w = 0`` the unconditional field, ``w = 1`` the conditional one, ``w > 1`` sharper classes. It is called like
any field, ``field(t, x, y=labels)``, so ``odeint_sample(CFGField(model, w, K), x0, extra_args={"y": y})``
samples with guidance.

NFE: :class:`CFGField` counts its real network calls in ``nfe``, and :class:`~torchcfm_nsgf.NFECounter` (so
every sampler of the package) counts the calls a field reports: a guided evaluation costs **2** network calls
(conditional and unconditional, two separate batch calls), except at ``w = 1`` and ``w = 0``, where only the
field that the formula keeps is evaluated (1 call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_non_negative

__all__ = ["CFGField", "drop_labels"]


def _check_null_label(null_label: object) -> int:
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ValueError(f"null_label must be a non-negative int (the extra class), got {null_label!r}")
    return null_label


def drop_labels(y: Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label of ``y`` (shape ``(bs,)``) by ``null_label`` with probability ``p`` (label dropout).

    The draws come from ``generator`` (a CPU generator; torch's global one when None). Returns a new tensor of
    ``y``'s shape, dtype and device; ``p = 0`` returns ``y`` itself and draws nothing.
    """
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype.is_floating_point:
        raise ValueError(f"y must be a 1-D tensor of integer labels, got {getattr(y, 'shape', type(y))}")
    p = check_non_negative(p, "p")
    if p > 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    null_label = _check_null_label(null_label)
    if p == 0:
        return y
    drop = (torch.rand(y.shape[0], generator=generator) < p).to(y.device)
    return torch.where(drop, torch.full_like(y, null_label), y)


class CFGField(nn.Module):
    r"""The classifier-free-guided field :math:`v_u + w (v_c - v_u)` of a model trained with label dropout.

    Parameters
    ----------
    model : callable
        ``model(t, x, y=labels)`` returning ``x``'s shape (torchcfm's ``UNetModelWrapper``,
        :class:`~torchcfm_nsgf.networks.VelocityMLP` with ``num_classes``); kept as ``self.model``.
    guidance_scale : float
        ``w >= 0``.
    null_label : int
        The label the model was trained with for "no class" (:func:`drop_labels`).

    Notes
    -----
    ``forward(t, x, y=None, *args, **kwargs)``: ``y`` of shape ``(bs,)`` is required (pass it through the
    samplers' ``extra_args={"y": y}``); torchdyn's ``args=`` is ignored. ``nfe`` counts real model calls: 2
    per evaluation, 1 at ``w = 0`` or ``w = 1``.
    """

    def __init__(self, model: Any, guidance_scale: float, null_label: int) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(t, x, y=...), got {type(model).__name__}")
        self.model = model
        self.guidance_scale = check_non_negative(guidance_scale, "guidance_scale")
        self.null_label = _check_null_label(null_label)
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor, y: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"y must be a tensor of shape ({x.shape[0]},): the labels to guide towards (pass "
                f"extra_args={{'y': y}} to the sampler), got {shape}"
            )
        w = self.guidance_scale
        if w == 1.0:
            self.nfe += 1
            return self.model(t, x, y=y)
        null = torch.full_like(y, self.null_label)
        if w == 0.0:
            self.nfe += 1
            return self.model(t, x, y=null)
        v_c = self.model(t, x, y=y)
        v_u = self.model(t, x, y=null)
        self.nfe += 2
        return v_u + w * (v_c - v_u)

    def reset(self) -> None:
        """Set the call count back to zero."""
        self.nfe = 0

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale:g}, null_label={self.null_label}"
