"""Fréchet distances between image sets: Inception FID / IS (torchmetrics) and a feature-space variant.

* :func:`inception_metrics` — the standard FID (and Inception Score) through torchmetrics'
  ``FrechetInceptionDistance`` / ``InceptionScore``, which run torch-fidelity's Inception-v3 port. It needs
  the ``torch-fidelity`` package and the Inception weights (``pt_inception-2015-12-05-6726825d.pth``);
  when either is unavailable it raises :class:`InceptionUnavailableError` saying how to provide them. It
  never returns a number computed with other weights.
* :func:`feature_frechet_distance` — the same Fréchet distance, ``‖μ_r − μ_g‖² + tr(Σ_r + Σ_g −
  2 (Σ_r Σ_g)^{1/2})``, in the feature space of any network (for example the penultimate layer of an MNIST
  classifier, reported as "classifier FID", which is not comparable with FID).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "InceptionUnavailableError",
    "check_inception_available",
    "feature_frechet_distance",
    "inception_metrics",
]

INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

_HOW_TO = (
    "To compute FID/IS: `pip install torch-fidelity`, download the Inception-v3 FID weights from "
    f"{INCEPTION_WEIGHTS_URL} and pass their local path with --inception-weights PATH "
    "(inception_metrics(weights_path=PATH))."
)


class InceptionUnavailableError(RuntimeError):
    """The Inception network for FID/IS cannot be loaded (package or weights missing)."""


class _Features(nn.Module):
    """Adapter for torchmetrics' custom-feature FID: ``images -> (B, num_features)`` float features."""

    def __init__(self, fn: Callable[[Tensor], Tensor], num_features: int) -> None:
        super().__init__()
        self.fn = fn
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x).flatten(1)


def feature_frechet_distance(
    features: Callable[[Tensor], Tensor],
    real: Iterable[Tensor],
    fake: Iterable[Tensor],
    *,
    num_features: int,
    device: torch.device | str = "cpu",
) -> float:
    """Fréchet distance between Gaussians fitted to ``features`` of two image sets (torchmetrics' FID code).

    Parameters
    ----------
    features : callable
        ``(B, C, H, W) -> (B, num_features)``, called under ``torch.no_grad()``.
    real, fake : iterable of Tensor
        Batches ``(B, C, H, W)`` in whatever range ``features`` expects; at least 2 images each.
    num_features : int
    device : torch.device or str
        Where batches are moved before ``features``.

    Returns
    -------
    float
        ``‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})`` (unbiased covariances, float64 statistics).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(features, num_features), normalize=True)
    metric = metric.to(device)
    with torch.no_grad():
        for batch in real:
            metric.update(batch.to(device), real=True)
        for batch in fake:
            metric.update(batch.to(device), real=False)
    return float(metric.compute())


def check_inception_available(weights_path: str | None = None) -> None:
    """Raise :class:`InceptionUnavailableError` (or ``FileNotFoundError``) unless FID/IS can be attempted."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise InceptionUnavailableError(f"torch-fidelity is not installed. {_HOW_TO}") from err
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"inception weights {weights_path!r} do not exist. {_HOW_TO}")


def inception_metrics(
    real: Iterable[Tensor],
    fake: Iterable[Tensor],
    *,
    weights_path: str | None = None,
    inception_score: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """FID (and optionally IS) of ``fake`` against ``real`` with torchmetrics' Inception-v3.

    Parameters
    ----------
    real, fake : iterable of Tensor
        ``uint8`` batches ``(B, C, H, W)``; grayscale (C = 1) is repeated to 3 channels.
    weights_path : str, optional
        Local Inception FID weights (``pt_inception-2015-12-05-6726825d.pth``). Without it torch-fidelity
        looks in its cache and tries to download them.
    inception_score : bool
        Also compute the Inception Score of ``fake`` (10 splits).
    device : torch.device or str

    Returns
    -------
    dict
        ``{"fid": float}`` and ``"is_mean"``, ``"is_std"`` when asked.

    Raises
    ------
    InceptionUnavailableError
        torch-fidelity missing, or the weights cannot be loaded (no network, no local file).
    """
    check_inception_available(weights_path)
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path).to(device)
        is_metric = None
        if inception_score:
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["logits_unbiased"],
                feature_extractor_weights_path=weights_path,
            )
            is_metric = InceptionScore(feature=net).to(device)
    except (OSError, RuntimeError, ValueError) as err:  # download failure, unreadable weights
        raise InceptionUnavailableError(f"could not load the Inception weights ({err}). {_HOW_TO}") from err

    def rgb(x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 batches, got {x.dtype}")
        return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).to(device)

    with torch.no_grad():
        for batch in real:
            fid.update(rgb(batch), real=True)
        for batch in fake:
            batch = rgb(batch)
            fid.update(batch, real=False)
            if is_metric is not None:
                is_metric.update(batch)
    out = {"fid": float(fid.compute())}
    if is_metric is not None:
        mean, std = is_metric.compute()
        out.update(is_mean=float(mean), is_std=float(std))
    return out
