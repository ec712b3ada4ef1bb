"""Building the backend a solve runs on, by name (private module).

It sits above every backend module (:mod:`.backends`, :mod:`.multiscale`, :mod:`.keops`, :mod:`.sharded`),
so that none of them imports another through it.
"""

from __future__ import annotations

from torch import Tensor

from .backends import DenseBackend, SinkhornBackend, StreamingBackend, choose_backend
from .keops import KeOpsBackend
from .multiscale import MultiscaleBackend
from .sharded import ShardedBackend

__all__ = ["make_backend"]


def make_backend(
    name: str, x: Tensor, y: Tensor, log_a: Tensor, log_b: Tensor, *, distributed: bool = False, eps: float
) -> SinkhornBackend:
    """The backend ``name`` (or ``"auto"``'s choice) for centred, flattened clouds x (n, d), y (m, d)."""
    if distributed:
        return ShardedBackend.build(name, x, y, log_a, log_b, eps=eps)
    if name == "auto":
        name = choose_backend(x.shape[0], y.shape[0], x.shape[1], x.device, x.dtype)
    if name == "dense":
        return DenseBackend(x, y, log_a, log_b)
    if name == "streaming":
        return StreamingBackend(x, y, log_a, log_b)
    if name == "multiscale":
        return MultiscaleBackend(x, y, log_a, log_b, eps=eps)
    return KeOpsBackend(x, y, log_a, log_b)
