r"""The KeOps backend: the reductions as symbolic (lazy) matrices compiled by pykeops, in linear memory.

Optional: needs ``pykeops`` (``pip install torchcfm-nsgf[keops]``), which compiles each reduction with the
system's C++ compiler (or CUDA) on first use and caches it. Never chosen by ``"auto"``. The cost is
formed as :math:`\tfrac12\sum_k (x_k - y_k)^2` inside the kernel and ε enters as a run-time parameter,
so one compiled kernel serves every ε level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import SinkhornBackend

__all__ = ["KeOpsBackend", "keops_available"]


def keops_available() -> bool:
    """Whether pykeops can be imported."""
    try:
        import pykeops.torch  # noqa: F401
    except ImportError:
        return False
    return True


class KeOpsBackend(SinkhornBackend):
    """Soft-min reductions and projections through ``pykeops.torch.LazyTensor`` (see the module docstring)."""

    name = "keops"

    def __init__(self, x: Tensor, y: Tensor, log_a: Tensor, log_b: Tensor) -> None:
        try:
            from pykeops.torch import LazyTensor
        except ImportError as err:
            raise ImportError(
                "backend='keops' needs pykeops: pip install 'torchcfm-nsgf[keops]' (or pip install pykeops)"
            ) from err
        super().__init__(x, y, log_a, log_b)
        self._lazy = LazyTensor
        self.clouds = {"xy": (x, y), "yx": (y, x), "xx": (x, x)}

    def _exponent(self, pair: str, h: Tensor, eps: float):
        rows, cols = self.clouds[pair]
        lt = self._lazy
        r = lt(rows[:, None, :].contiguous())
        c = lt(cols[None, :, :].contiguous())
        hj = lt(h[None, :, None].contiguous())
        scale = lt(torch.tensor([0.5 / eps], dtype=rows.dtype, device=rows.device))
        return hj - scale * ((r - c) ** 2).sum(-1), cols

    def softmin(self, pair: str, h: Tensor, eps: float) -> Tensor:
        z, _ = self._exponent(pair, h, eps)
        return -eps * z.logsumexp(dim=1).view(-1)

    def project(self, pair: str, h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        z, cols = self._exponent(pair, h, eps)
        proj = z.sumsoftmaxweight(self._lazy(cols[None, :, :].contiguous()), dim=1)
        return proj, -eps * z.logsumexp(dim=1).view(-1)

    def max_cost(self) -> float:
        lt = self._lazy
        top = 0.0
        for rows, cols in (self.clouds["xy"], self.clouds["xx"]):
            c = (lt(rows[:, None, :].contiguous()) - lt(cols[None, :, :].contiguous())) ** 2
            top = max(top, 0.5 * float(c.sum(-1).max(dim=1).max()))
        return top
