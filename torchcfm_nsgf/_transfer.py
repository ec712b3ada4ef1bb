"""Host draws moved to the device without a host synchronisation (private module).

The package draws its random numbers on the CPU from the caller's generator (the same draws on every device).
Copying such a tensor, in pageable host memory, to a CUDA device with ``non_blocking=False`` blocks the host
until the stream has run everything queued before it. A copy from pinned memory with ``non_blocking=True`` is
queued on the current stream instead: the host runs on, and the values arrive before any later work of that
stream reads them (torch's pinned-memory allocator keeps the source alive until the copy has run).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` (cast to ``dtype`` first, when given) on ``device``; from the CPU to CUDA through pinned memory.

    Parameters
    ----------
    t : Tensor, any shape
        A tensor, typically drawn on the CPU.
    device : torch.device or str
        Where the result lives.
    dtype : torch.dtype, optional
        The result's dtype (``t``'s without it).

    Returns
    -------
    Tensor, shape of ``t``
        The same values, on ``device``; a copy to a CUDA device is queued without blocking the host.
    """
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
