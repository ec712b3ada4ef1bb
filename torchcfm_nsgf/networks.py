"""Small default networks for NSGF++ on vectors and images.

* :class:`VelocityMLP` — a velocity field ``v(t, x)`` for vectors ``(bs, d)``: torchcfm's ``MLP`` with the
  time appended to the input (``time_varying=True``), behind the ``forward(t, x)`` convention that the
  samplers and torchdyn use. Written as a thin adapter because ``torchcfm.utils.torch_wrapper`` accepts only
  one shared time, while NSGF++'s phase 2 evaluates every sample at its own time.
* :class:`TimePredictorMLP`, :class:`TimePredictorCNN` — the phase-transition time predictor
  ``t_φ : x ↦ τ ∈ [0, 1]`` of NSGF++ (Zhu et al., 2024, Algorithm 3) for vectors and images. Both end in a
  sigmoid, so their output lies in [0, 1] by construction.

For images, torchcfm's ``UNetModelWrapper`` (``forward(t, x, y=None)``) serves as the velocity field.

Class conditioning: with ``num_classes=K`` each network takes integer labels ``y`` of shape ``(bs,)`` in
``[0, K)`` through a learned embedding (``nn.Embedding(K, label_dim)``, concatenated to the MLP input, added to
the CNN's pooled features), like torchcfm's UNet with ``class_cond=True``: ``forward(t, x, y)`` /
``forward(x, y)``. For classifier-free guidance build them with ``K + 1`` classes, the last one the null label
(:mod:`torchcfm_nsgf.guidance`). ``num_classes=None`` (default) builds the unconditional networks, with the
same parameters and checkpoints as before.
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


def _check_classes(num_classes: object, label_dim: object) -> tuple[int | None, int]:
    if num_classes is not None:
        _check_width(num_classes, "num_classes")
    return num_classes, _check_width(label_dim, "label_dim")


def _embed(emb: nn.Embedding | None, num_classes: int | None, y: Tensor | None, x: Tensor) -> Tensor | None:
    """The label embedding ``(bs, label_dim)`` in x's dtype, after checking ``y`` against the network."""
    if emb is None:
        if y is not None:
            raise ValueError("y must be None: this network was built without num_classes (unconditional)")
        return None
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype.is_floating_point:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"y must be integer labels of shape ({x.shape[0]},) for this class-conditional network "
            f"(num_classes={num_classes}), got {shape}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must lie in [0, {num_classes}), got labels in [{int(y.min())}, {int(y.max())}]")
    return emb(y.to(x.device)).to(x.dtype)


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
    num_classes : int, optional
        Class-conditional with this many labels (module docstring).
    label_dim : int
        Size of the label embedding (with ``num_classes``).

    Notes
    -----
    ``forward(t, x, y=None, *args, **kwargs)``: ``x`` of shape ``(bs, d)``; ``t`` a number, a 0-d or ``(1,)``
    tensor (one time for all samples) or a ``(bs,)`` tensor (one time per sample); ``y`` labels ``(bs,)``,
    required with ``num_classes`` and refused without. Extra arguments (torchdyn's ``args=``) are ignored.
    Returns ``(bs, d)``.
    """

    def __init__(
        self, dim: int, width: int = 64, num_classes: int | None = None, label_dim: int = 16
    ) -> None:
        super().__init__()
        self.dim = _check_width(dim, "dim")
        self.width = _check_width(width, "width")
        self.num_classes, self.label_dim = _check_classes(num_classes, label_dim)
        extra = 0 if num_classes is None else label_dim
        self.mlp = MLP(dim + extra, out_dim=dim, w=width, time_varying=True)
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes, label_dim)

    def forward(
        self, t: Tensor | float, x: Tensor, y: Tensor | None = None, *args: Any, **kwargs: Any
    ) -> Tensor:
        emb = _embed(self.label_emb, self.num_classes, y, x)
        parts = [x, _per_sample_time(t, x)] if emb is None else [x, emb, _per_sample_time(t, x)]
        return self.mlp(torch.cat(parts, dim=-1))


class TimePredictorMLP(nn.Module):
    """Phase-transition time predictor for vectors: ``x (bs, d) -> τ (bs,)`` in [0, 1] (sigmoid output).

    Parameters
    ----------
    dim : int
        Feature dimension ``d``.
    width : int
        Hidden width.
    num_classes : int, optional
        Class-conditional with this many labels: ``forward(x, y)``.
    label_dim : int
        Size of the label embedding (with ``num_classes``).
    """

    def __init__(
        self, dim: int, width: int = 64, num_classes: int | None = None, label_dim: int = 16
    ) -> None:
        super().__init__()
        self.dim = _check_width(dim, "dim")
        self.width = _check_width(width, "width")
        self.num_classes, self.label_dim = _check_classes(num_classes, label_dim)
        extra = 0 if num_classes is None else label_dim
        self.mlp = MLP(dim + extra, out_dim=1, w=width)
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes, label_dim)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        emb = _embed(self.label_emb, self.num_classes, y, x)
        h = x if emb is None else torch.cat([x, emb], dim=-1)
        return torch.sigmoid(self.mlp(h)).squeeze(-1)


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
    num_classes : int, optional
        Class-conditional with this many labels: ``forward(x, y)``; the label embedding (of size
        ``2 * width``) is added to the pooled features.
    """

    def __init__(self, channels: int, width: int = 32, num_classes: int | None = None) -> None:
        super().__init__()
        self.channels = _check_width(channels, "channels")
        self.width = _check_width(width, "width")
        self.num_classes, _ = _check_classes(num_classes, 2 * width)
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
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes, 2 * w)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (bs, {self.channels}, H, W), got {tuple(x.shape)}")
        h = self.features(x)
        emb = _embed(self.label_emb, self.num_classes, y, x)
        if emb is not None:
            h = h + emb
        return torch.sigmoid(self.head(h)).squeeze(-1)
