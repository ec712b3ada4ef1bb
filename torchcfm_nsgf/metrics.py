r"""The exact 2-Wasserstein distance between two point clouds, the metric of the 2D benchmarks.

:math:`W_2(\mu, \nu) = (\min_\pi \sum_{ij} \pi_{ij} \|x_i - y_j\|^2)^{1/2}` with uniform weights, by POT's
network simplex (``ot.emd2``) in float64.
"""

from __future__ import annotations

import math

import ot
import torch
from torch import Tensor

__all__ = ["w2"]


def w2(x: Tensor, y: Tensor) -> float:
    r"""Exact 2-Wasserstein distance between the uniform empirical measures on ``x`` (n, d) and ``y`` (m, d).

    Solved by POT's network simplex (``ot.emd2``) on the squared Euclidean cost in float64; returns
    :math:`W_2` (not its square). Exact, hence :math:`O(n^3)`-ish in time (BENCHMARKS.md has timings).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (n, d) and (m, d) clouds, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x64 = x.detach().cpu().double()
    y64 = y.detach().cpu().double()
    if not bool(torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        return math.inf
    cost = ot.dist(x64, y64).numpy()
    value = ot.emd2(ot.unif(len(x64)), ot.unif(len(y64)), cost, numItermax=10_000_000)
    return math.sqrt(max(float(value), 0.0))
