r"""The end-point buffer of the ``"ot"`` variants: phase-1 end points :math:`X_T` (and their labels) kept
across training calls, first in, first out.

Simulating :math:`X_T` costs ``T`` Sinkhorn solves of the batch, so, like the matcher's trajectory pool,
the buffer amortises it: the objective adds a new flow's end points every ``refresh_every`` calls and each
call draws its end points from what is held. This is not :class:`~torchcfm_nsgf.TrajectoryPool`: the pool
stores ``(t, x_t, u_t)`` triples in ring slots and draws with replacement for large pools, while this buffer
keeps the end points in arrival order and draws without replacement (``randperm``); serving the end points
from the pool would change which ones each step draws, and so the numbers of every run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["EndpointBuffer"]


class EndpointBuffer:
    """At most ``capacity`` end points ``(n, *dim)`` (FIFO), their class labels ``(n,)`` when labelled, and the
    call and flow counters that decide the next refresh.

    ``capacity`` None: 16 batches, fixed by the first :meth:`add`.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.items: Tensor | None = None
        self.labels: Tensor | None = None
        self.n_calls = 0
        self.n_flows = 0

    def __len__(self) -> int:
        return 0 if self.items is None else self.items.shape[0]

    def add(self, xT: Tensor, labels: Tensor | None = None) -> None:
        """Append a flow's end points ``xT`` ``(n, *dim)`` (and labels ``(n,)``), dropping the oldest beyond
        the capacity."""
        if self.capacity is None:
            self.capacity = 16 * xT.shape[0]
        if self.items is not None:
            if self.items.shape[1:] != xT.shape[1:]:
                raise ValueError(
                    f"x0 has feature shape {tuple(xT.shape[1:])}, but the end-point buffer holds "
                    f"{tuple(self.items.shape[1:])}"
                )
            xT = torch.cat([self.items.to(device=xT.device, dtype=xT.dtype), xT])
            if labels is not None:
                labels = torch.cat([self.labels.to(labels.device), labels])
        self.items = xT[-self.capacity :]
        self.labels = None if labels is None else labels[-self.capacity :]
        self.n_flows += 1

    def check_capacity(self, n: int) -> None:
        if self.capacity is not None and self.capacity < n:
            raise ValueError(f"endpoint_capacity ({self.capacity}) must be at least the batch size ({n})")

    def check_labelled(self, guided: bool) -> None:
        """The held end points carry labels exactly when the call is class-conditional."""
        if self.items is not None and (self.labels is not None) != guided:
            raise ValueError(
                "y1 must be given: the end-point buffer holds class-labelled end points"
                if self.labels is not None
                else "y1 must be None: the end-point buffer holds end points without class labels"
            )

    def short_of(self, y1: Tensor) -> bool:
        """Whether the buffer holds fewer end points of some class than ``y1`` asks for."""
        if self.labels is None:
            return True
        classes, counts = torch.unique(y1, return_counts=True)
        held = self.labels.to(y1.device)
        return any(int((held == c).sum()) < k for c, k in zip(classes, counts.tolist(), strict=True))

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """``n`` end points drawn uniformly without replacement, on ``device``."""
        pick = torch.randperm(len(self), generator=generator)[:n]
        return self.items[pick.to(self.items.device)].to(device=device)

    def draw_by_class(
        self, y1: Tensor, generator: torch.Generator | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """End points with exactly the class counts of ``y1``, grouped by class in increasing order, drawn
        without replacement within each class; and their labels (``y1``'s dtype)."""
        held = self.labels.to(y1.device)
        classes, counts = torch.unique(y1, return_counts=True)
        parts = []
        for c, k in zip(classes, counts.tolist(), strict=True):
            members = torch.nonzero(held == c).flatten()
            parts.append(members[torch.randperm(len(members), generator=generator)[:k].to(members.device)])
        pick = torch.cat(parts)
        return self.items[pick.to(self.items.device)].to(device=device), held[pick].to(dtype=y1.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Counters, capacity, end points and labels (on the CPU)."""
        return {
            "calls": self.n_calls,
            "flows": self.n_flows,
            "capacity": self.capacity,
            "items": None if self.items is None else self.items.detach().cpu(),
            "labels": None if self.labels is None else self.labels.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_calls = int(state["calls"])
        self.n_flows = int(state["flows"])
        self.capacity = None if state["capacity"] is None else int(state["capacity"])
        self.items = state["items"]
        self.labels = state.get("labels")
