"""Independent float64 references for the tests (plain Sinkhorn fixed point, no annealing or relaxation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fixed_point_velocity(
    x: Tensor, y: Tensor, blur: float, tol: float = 1e-12, max_iter: int = 200_000
) -> Tensor:
    """v(x_i) = sum_j w_j(x_i) y_j - sum_k w_k(x_i) x_k from plain float64 Sinkhorn iterated to ``tol``.

    Cross problem: alternating updates f = T(g), g = T(f). Symmetric problem: p <- (p + T(p)) / 2.
    Stops when neither potential moves by more than ``tol * eps`` in one sweep.
    """
    xs = x.detach().double().reshape(len(x), -1)
    ys = y.detach().double().reshape(len(y), -1)
    eps = blur**2
    n, m = len(xs), len(ys)
    c_xy = 0.5 * torch.cdist(xs, ys) ** 2
    c_xx = 0.5 * torch.cdist(xs, xs) ** 2
    log_a = torch.full((n,), -math.log(n), dtype=torch.float64)
    log_b = torch.full((m,), -math.log(m), dtype=torch.float64)
    g = torch.zeros(m, dtype=torch.float64)
    p = torch.zeros(n, dtype=torch.float64)
    for _ in range(max_iter):
        f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - c_xy) / eps, dim=1)
        g_new = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - c_xy) / eps, dim=0)
        p_new = 0.5 * (p - eps * torch.logsumexp(log_a[None, :] + (p[None, :] - c_xx) / eps, dim=1))
        moved = max(float((g_new - g).abs().max()), float((p_new - p).abs().max()))
        g, p = g_new, p_new
        if moved < tol * eps:
            break
    else:
        raise RuntimeError("reference Sinkhorn did not converge")
    w_y = torch.softmax(log_b[None, :] + (g[None, :] - c_xy) / eps, dim=1)
    w_x = torch.softmax(log_a[None, :] + (p[None, :] - c_xx) / eps, dim=1)
    return (w_y @ ys - w_x @ xs).reshape(x.shape)


def rel_err(v: Tensor, ref: Tensor) -> float:
    return float((v.double() - ref.double()).norm() / ref.double().norm())
