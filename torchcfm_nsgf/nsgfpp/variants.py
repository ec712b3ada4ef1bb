r"""The phase-2 variants of NSGF++: where the straight flow's training segments start and end.

Each variant is one small class in :data:`PHASE2`, the registry, with its name, its help text (the command
lines list it), whether it adds a time predictor, and :meth:`Phase2Variant.pairs`, which returns the
segments ``(a, b)`` for a call of :meth:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective.losses`. A variant
reads what it needs from the objective it is given (its matcher, its end-point buffer and the options
named in :attr:`Phase2Variant.settings`), so adding one is a subclass decorated with
:func:`register_phase2` here and a test.

* ``"paper"`` (Algorithm 3): noise-to-data interpolations, target :math:`X_1 - X_0`, and a time predictor
  :math:`t_\phi(x) \approx t`.
* ``"ot"`` (the first author's precursor of NSGF++, ``NSGF.md`` §3): phase-1 end points :math:`X_T` from a
  bounded buffer, paired with the data batch by exact minibatch OT; no predictor.
* ``"ot-source"``: the end points of the call's own sources, each paired with the data point that the exact
  OT plan between the sources and the data gives its source (OT-CFM's coupling); no buffer, no predictor.
* ``"ot-predictor"``: the ``"ot"`` segments plus a time predictor trained on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torchcfm.optimal_transport import OTPlanSampler

from .._validation import check_labels


class ObjectiveView(Protocol):
    """What a variant reads from :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective` (the registry sits below
    the objective it serves and takes it by reference: this module imports nothing of it)."""

    matcher: Any
    buffer: Any
    generator: torch.Generator | None
    endpoints: str

    def phase1_endpoints(self, x0: Tensor, x1: Tensor, nets: Any) -> Tensor: ...

    def guided_phase1_endpoints(
        self, x0: Tensor, x1: Tensor, y1: Tensor, nets: Any
    ) -> tuple[Tensor, Tensor]: ...

    def network_endpoints(self, net: Any, x0: Tensor, labels: Tensor | None) -> Tensor: ...

    def simulate_endpoints(self, x0: Tensor, x1: Tensor) -> Tensor: ...


__all__ = ["PHASE2", "Phase2Variant", "register_phase2"]

Pairs = tuple[Tensor, Tensor, "Tensor | None"]

#: The registry: variant name -> class.
PHASE2: dict[str, type[Phase2Variant]] = {}


def __getattr__(name: str) -> tuple[str, ...]:
    """``PHASE2_VARIANTS`` (the registered names) and ``PREDICTOR_VARIANTS`` (those with a time predictor),
    read from the registry when asked, so that they list every variant of this file wherever it is defined."""
    if name == "PHASE2_VARIANTS":
        return tuple(PHASE2)
    if name == "PREDICTOR_VARIANTS":
        return tuple(key for key, cls in PHASE2.items() if cls.uses_predictor)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_phase2(cls: type[Phase2Variant]) -> type[Phase2Variant]:
    """Class decorator: add a :class:`Phase2Variant` subclass to :data:`PHASE2` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Phase2Variant)):
        raise TypeError(f"only Phase2Variant subclasses can be registered, got {cls!r}")
    if cls.name in PHASE2:
        raise ValueError(f"a phase-2 variant named {cls.name!r} is registered already")
    PHASE2[cls.name] = cls
    return cls


class Phase2Variant:
    """One phase-2 variant: the straight flow's training segments, and whether a time predictor goes with them.

    Subclasses set :attr:`name` and :attr:`help` and implement :meth:`pairs`.
    """

    #: The variant's name (the ``phase2`` option's value).
    name: ClassVar[str]
    #: One line for ``--help``.
    help: ClassVar[str]
    #: Whether phase 2 starts at a predicted time :math:`\tau = t_\phi(X_T)` (a third network).
    uses_predictor: ClassVar[bool] = False
    #: The options of :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective` this variant reads.
    settings: ClassVar[tuple[str, ...]] = ()

    def pairs(
        self,
        objective: ObjectiveView,
        x0: Tensor,
        x1: Tensor,
        y1: Tensor | None,
        nets: Mapping[str, Any] | None,
    ) -> Pairs:
        """Start and end points ``(a, b)``, each ``(n, *dim)``, and their labels ``(n,)`` (None without ``y1``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _OTPairing(Phase2Variant):
    """Pairs drawn from an exact minibatch OT plan (torchcfm's ``OTPlanSampler("exact")``)."""

    def __init__(self) -> None:
        self.ot_sampler = OTPlanSampler(method="exact")

    def ot_pairs(
        self, a: Tensor, b: Tensor, la: Tensor | None, lb: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Row indices ``(i, j)`` of ``a.shape[0]`` pairs drawn without replacement (through ``generator``) from
        the exact OT plan between ``a`` (n, *dim) and ``b`` (m, *dim); with labels ``la``, ``lb`` the plan is
        solved within each class (block-diagonal). torchcfm's ``sample_plan`` would draw with NumPy's global
        RNG; for ``n == m`` the exact plan is a permutation, so every row of ``a`` is used once."""
        n, m = a.shape[0], b.shape[0]
        if la is None:
            plan = torch.from_numpy(self.ot_sampler.get_map(a, b)).flatten()
        else:
            lb = lb.to(la.device)
            block = torch.zeros(n, m, dtype=torch.float64)
            for c in la.unique():
                rows = torch.nonzero(la == c).flatten().cpu()
                cols = torch.nonzero(lb == c).flatten().cpu()
                sub = torch.from_numpy(self.ot_sampler.get_map(a[rows], b[cols])).to(torch.float64)
                block[rows[:, None], cols[None, :]] = sub * (len(rows) / n)
            plan = block.flatten()
        pick = torch.multinomial(plan, n, replacement=False, generator=generator)
        return (pick // m).to(a.device), (pick % m).to(a.device)


@register_phase2
class Paper(Phase2Variant):
    """Algorithm 3: the segments are ``(x0, x1)`` as given (independent noise and data), with a predictor."""

    name = "paper"
    help = "from noise to data, with a time predictor (Algorithm 3)"
    uses_predictor = True

    def pairs(self, objective, x0, x1, y1, nets):  # noqa: D102
        return x0, x1, y1


@register_phase2
class OT(_OTPairing):
    """``n`` phase-1 end points from the buffer (:meth:`~NSGFPlusPlusObjective.phase1_endpoints`, or the
    class-stratified draw with labels), paired with the data batch by the exact OT plan between them (within
    each class with labels)."""

    name = "ot"
    help = "from buffered NSGF end points, paired with the data by exact OT"
    settings = ("endpoints", "refresh_every", "endpoint_capacity")

    def pairs(self, objective, x0, x1, y1, nets):  # noqa: D102
        if y1 is None:
            xT, labels = objective.phase1_endpoints(x0, x1, nets), None
        else:
            xT, labels = objective.guided_phase1_endpoints(x0, x1, y1, nets)
        ends = x1.to(device=xT.device, dtype=xT.dtype)
        i, j = self.ot_pairs(xT, ends, labels, y1, objective.generator)
        return xT[i], ends[j], None if labels is None else labels[i]


@register_phase2
class OTSource(_OTPairing):
    """The end points of this call's ``x0`` (a simulated flow towards ``x1``, or the NSGF network with
    ``endpoints="network"``), each paired with the data point that the exact OT plan between ``x0`` and ``x1``
    gives its source. With labels, source ``i`` takes class ``y1[i]`` (as in the guided flow), so ``x0`` and
    ``x1`` must have the same batch size."""

    name = "ot-source"
    help = "from the batch's own NSGF end points, with OT between their noise and the data"
    settings = ("endpoints",)

    def pairs(self, objective, x0, x1, y1, nets):  # noqa: D102
        labels = self._source_labels(x0, x1, y1)
        xT = self._endpoints(objective, x0, x1, labels, nets)
        ends = x1.to(device=xT.device, dtype=xT.dtype)
        i, j = self.ot_pairs(x0.to(device=xT.device, dtype=xT.dtype), ends, labels, y1, objective.generator)
        return xT[i], ends[j], None if labels is None else labels[i]

    @staticmethod
    def _source_labels(x0: Tensor, x1: Tensor, y1: Tensor | None) -> Tensor | None:
        if y1 is None:
            return None
        y1 = check_labels(y1, x1.shape[0], "y1", "x1")
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"x0 and x1 must have the same batch size for class-conditional phase2='ot-source' (source i "
                f"takes the class y1[i]), got {x0.shape[0]} and {x1.shape[0]}"
            )
        return y1.to(x0.device)

    @staticmethod
    def _endpoints(
        objective: ObjectiveView,
        x0: Tensor,
        x1: Tensor,
        labels: Tensor | None,
        nets: Mapping[str, Any] | None,
    ) -> Tensor:
        """:math:`X_T` of every row of ``x0``, in the rows of ``x0`` (no buffer)."""
        if objective.endpoints == "network":
            if nets is None:
                raise ValueError("nets is required with endpoints='network' (the NSGF network makes X_T)")
            return objective.network_endpoints(nets["nsgf"], x0, labels)
        objective.buffer.n_flows += 1
        if labels is None:
            return objective.simulate_endpoints(x0, x1)
        traj, _ = objective.matcher.simulate_guided(x0, x1, labels, y0=labels)
        return traj.xs[-1].detach()


@register_phase2
class OTPredictor(OT):
    """The ``"ot"`` segments, plus a time predictor trained on them; sampling starts phase 2 at
    :math:`\\tau = t_\\phi(\\hat X_T)` of the network's end point."""

    name = "ot-predictor"
    help = "ot, with a time predictor"
    uses_predictor = True
