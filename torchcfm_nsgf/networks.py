"""Small default networks for NSGF++ on vectors and images.

* :class:`VelocityMLP` — a velocity field ``v(t, x)`` for vectors ``(bs, d)``: torchcfm's ``MLP`` with the
  time appended to the input (``time_varying=True``), behind the ``forward(t, x)`` convention that the
  samplers and torchdyn use. Written as a thin adapter because ``torchcfm.utils.torch_wrapper`` accepts only
  one shared time, while NSGF++'s phase 2 evaluates every sample at its own time.
* :class:`TimePredictorMLP`, :class:`TimePredictorCNN` — the phase-transition time predictor
  ``t_φ : x ↦ τ ∈ [0, 1]`` of NSGF++ (Zhu et al., 2024, Algorithm 3) for vectors and images. Both end in a
  sigmoid, so their output lies in [0, 1] by construction.

For images, torchcfm's ``UNetModelWrapper`` (``forward(t, x, y=None)``) serves as the velocity field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.models import MLP

__all__ = ["TimePredictorCNN", "TimePredictorMLP", "VelocityMLP"]


def _check_width(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _per_sample_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a column ``(bs, 1)`` in x's dtype: accepts a number, a 0-d, ``(1,)`` or ``(bs,)`` tensor."""
    bs = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(bs, 1)
    if t.shape != (bs,):
        raise ValueError(f"t must be a scalar or have shape ({bs},) to match x, got {tuple(t.shape)}")
    return t.reshape(bs, 1)


class VelocityMLP(nn.Module):
    """Velocity field ``v(t, x)`` for vectors: torchcfm's ``MLP(dim, w=width, time_varying=True)``.

    Parameters
    ----------
    dim : int
        Feature dimension ``d``.
    width : int
        Hidden width (torchcfm's ``w``; the paper's 2D setting is 64).

    Notes
    -----
    ``forward(t, x, *args, **kwargs)``: ``x`` of shape ``(bs, d)``; ``t`` a number, a 0-d or ``(1,)`` tensor
    (one time for all samples) or a ``(bs,)`` tensor (one time per sample). Extra arguments (torchdyn's
    ``args=``) are ignored. Returns ``(bs, d)``.
    """

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        self.dim = _check_width(dim, "dim")
        self.width = _check_width(width, "width")
        self.mlp = MLP(dim, w=width, time_varying=True)

    def forward(self, t: Tensor | float, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.mlp(torch.cat([x, _per_sample_time(t, x)], dim=-1))


class TimePredictorMLP(nn.Module):
    """Phase-transition time predictor for vectors: ``x (bs, d) -> τ (bs,)`` in [0, 1] (sigmoid output).

    Parameters
    ----------
    dim : int
        Feature dimension ``d``.
    width : int
        Hidden width.
    """

    def __init__(self, dim: int, width: int = 64) -> None:
        super().__init__()
        self.dim = _check_width(dim, "dim")
        self.width = _check_width(width, "width")
        self.mlp = MLP(dim, out_dim=1, w=width)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(x)).squeeze(-1)


class TimePredictorCNN(nn.Module):
    """Phase-transition time predictor for images: ``x (bs, C, H, W) -> τ (bs,)`` in [0, 1] (sigmoid output).

    Three 3×3 convolutions (the last two with stride 2), SiLU activations, global average pooling and a
    linear head: small enough for MNIST / CIFAR-10 and independent of the image size.

    Parameters
    ----------
    channels : int
        Input channels ``C``.
    width : int
        Channels of the first convolution (the others use ``2 * width``).
    """

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.channels = _check_width(channels, "channels")
        self.width = _check_width(width, "width")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * w, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (bs, {self.channels}, H, W), got {tuple(x.shape)}")
        return torch.sigmoid(self.head(self.features(x))).squeeze(-1)
