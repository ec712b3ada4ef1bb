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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._validation import check_labels
from ..sampling import odeint_sample

__all__ = ["EndpointBuffer", "Phase2Data"]


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


class Phase2Data:
    """The straight flow's training data of :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`: phase-1 end
    points (simulated, or from the NSGF network) kept in its :class:`EndpointBuffer`, and the segments of the
    phase-2 variant (the attributes are the objective's own: ``matcher``, ``buffer``, ``variant``, ...)."""

    @property
    def n_endpoints(self) -> int:
        """End points held in the ``"ot"`` variant's buffer."""
        return len(self.buffer)

    def simulate_endpoints(self, x0: Tensor, x1: Tensor) -> Tensor:
        r""":math:`X_T` of the matcher's simulated Sinkhorn flow of ``x0`` (n, *dim) towards ``x1`` (m, *dim).

        Returns shape ``(n, *dim)``, detached. ``T`` Sinkhorn solves; no network is called; the buffer is
        not touched.
        """
        return self.matcher.simulate(x0, x1).xs[-1].detach()

    @torch.no_grad()
    def network_endpoints(self, nsgf: Any, x0: Tensor, y: Tensor | None = None) -> Tensor:
        r""":math:`\hat X_T` of the NSGF network ``nsgf(t, x)``: ``T`` Euler steps from ``x0`` on the matcher's
        normalised clock, exactly phase 1 of :meth:`sample` (labels ``y`` passed as ``y=``). Detached; the
        network's train/eval mode is kept."""
        extra = None if y is None else {"y": y}
        return odeint_sample(nsgf, x0, solver="euler", n_steps=self.flow_steps, extra_args=extra).samples

    def _add_endpoints(self, xT: Tensor, labels: Tensor | None = None) -> None:
        self.buffer.add(xT, labels)

    def guided_phase1_endpoints(
        self, x0: Tensor, x1: Tensor, y1: Tensor, nets: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Class-conditional :meth:`phase1_endpoints`: for data labels ``y1`` (m,), ``m`` end points with exactly
        the class counts of ``y1``, drawn without replacement within each class from the labelled buffer.

        The buffer is refreshed with a guided flow of ``(x0, x1, y1)``
        (:meth:`SinkhornFlowMatcher.simulate_guided`) on the first call, every ``refresh_every`` calls, and
        whenever it holds too few end points of a class of ``y1``.

        Returns
        -------
        xT : Tensor, shape (m, *dim)
            End points grouped by class (in increasing class order), detached, on ``x0``'s device.
        labels : Tensor, shape (m,)
            Their classes (``y1``'s dtype).
        """
        y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        m = x1.shape[0]
        self.buffer.check_capacity(max(m, x0.shape[0]))
        self.buffer.check_labelled(True)
        if self.n_calls % self.refresh_every == 0 or self.buffer.short_of(y1):
            if self.endpoints == "network":
                if nets is None:
                    raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
                if x0.shape[0] != m:
                    raise ValueError("x0 and x1 must have the same batch size with endpoints='network'")
                labels = y1.to(x0.device)  # source row i takes class y1[i], as in the guided flow
                self._add_endpoints(self.network_endpoints(nets["nsgf"], x0, labels), labels)
            else:
                traj, labels = self.matcher.simulate_guided(x0, x1, y1)
                self._add_endpoints(traj.xs[-1].detach(), labels)
        if self.buffer.short_of(y1):
            raise ValueError(
                "y1 asks for more end points of a class than the buffer holds after a new flow: give x0 and x1 "
                "the same batch size (the guided flow then has exactly the class counts of y1)"
            )
        self.buffer.n_calls += 1
        return self.buffer.draw_by_class(y1, self.generator, x0.device)

    def phase1_endpoints(self, x0: Tensor, x1: Tensor, nets: Mapping[str, Any] | None = None) -> Tensor:
        r"""``n`` phase-1 end points :math:`X_T` for a source batch ``x0`` (n, *dim) and data ``x1`` (m, *dim).

        Drawn uniformly without replacement (through ``generator``) from the end-point buffer, after
        adding a newly simulated flow of ``(x0, x1)`` (:meth:`simulate_endpoints`) on the first call, every
        ``refresh_every`` calls, and whenever the buffer holds fewer than ``n`` end points.

        Returns
        -------
        Tensor, shape (n, *dim)
            Detached, on ``x0``'s device and in the dtype of the simulation.

        Raises
        ------
        ValueError
            ``endpoint_capacity`` is smaller than the batch size ``n``, or ``x0`` has another feature
            shape than the buffer.
        """
        n = x0.shape[0]
        self.buffer.check_capacity(n)
        self.buffer.check_labelled(False)
        if self.n_calls % self.refresh_every == 0 or self.n_endpoints < n:
            if self.endpoints == "network":
                if nets is None:
                    raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
                self._add_endpoints(self.network_endpoints(nets["nsgf"], x0))
            else:
                self._add_endpoints(self.simulate_endpoints(x0, x1))
        self.buffer.n_calls += 1
        return self.buffer.draw(n, self.generator, x0.device)

    def phase2_pairs(
        self, x0: Tensor, x1: Tensor, y1: Tensor | None = None, nets: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Start and end points ``(a, b)``, each ``(n, *dim)``, of the straight flow's training segments, and
        their class labels ``(n,)`` (None without ``y1``).

        ``"paper"``: ``(x0, x1)`` as given (independent noise and data). ``"ot"``: ``n`` phase-1 end points
        :math:`X_T` from the buffer (:meth:`phase1_endpoints`) and the data points ``x1`` paired with them by the
        exact OT plan of the minibatch (torchcfm's ``OTPlanSampler("exact").get_map``, squared Euclidean
        cost). ``"ot-source"``: the end points of this call's ``x0`` (a simulated flow towards ``x1``, or the
        NSGF network in ``nets`` with ``endpoints="network"``), each paired with the data point that the exact
        OT plan between ``x0`` and ``x1`` gives its source. ``n`` pairs are drawn from the plan without
        replacement through ``generator`` (torchcfm's ``sample_plan`` draws with NumPy's global RNG); for
        ``n == m`` the exact plan is a permutation, so every end point is used once.

        With labels ``y1`` of ``x1``: ``"paper"`` labels each segment with its data point's class; the OT
        variants give the end points the class counts of ``y1`` (``"ot"``: drawn from the labelled buffer,
        :meth:`guided_phase1_endpoints`; ``"ot-source"``: source ``i`` takes class ``y1[i]``, as in the guided
        flow, so ``x0`` and ``x1`` must have the same batch size) and solve the exact OT plan within each
        class (a block-diagonal plan), so no segment joins two classes.
        """
        return self.variant.pairs(self, x0, x1, y1, nets)
