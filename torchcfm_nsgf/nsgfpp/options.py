"""The settings of NSGF++ in one frozen object, and the checks and constants they rest on.

:class:`NSGFPlusPlusOptions` is what :class:`~torchcfm_nsgf.NSGFPlusPlus`, the 2D benchmark harness and the
image method (``torchcfm_nsgf.images``) build NSGF++ from; the command lines generate their flags from its
fields (``metadata["help"]``), as they do for :class:`~torchcfm_nsgf.SinkhornOptions`. Its defaults are the
vector (2D) ones; the image settings hold their own instance with the image defaults
(``torchcfm_nsgf.images.settings.IMAGE_NSGFPP``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .._validation import check_positive
from .shared import NETWORKS, check_network
from .variants import PHASE2

__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_PHASE2",
    "ENDPOINT_SOURCES",
    "MAX_PHASE1_STEPS",
    "NSGFPlusPlusOptions",
]

#: Largest number of NSGF steps of phase 1 (paper: ``T <= 5``).
MAX_PHASE1_STEPS = 5
#: Where the ``"ot"`` variants' end points :math:`X_T` come from: the simulated Sinkhorn flow, or the NSGF network.
ENDPOINT_SOURCES = ("simulated", "network")
#: The end-point source used when none is given (BENCHMARKS.md §4 and §5 compare the two).
DEFAULT_ENDPOINTS = "simulated"
#: The variant used when none is given.
DEFAULT_PHASE2 = "ot"


def check_flow_steps(flow_steps: object, name: str = "flow_steps") -> int:
    """``T`` of NSGF++'s phase 1: a positive int, at most :data:`MAX_PHASE1_STEPS`."""
    check_positive(flow_steps, name, integer=True)
    if flow_steps > MAX_PHASE1_STEPS:
        raise ValueError(
            f"{name} must be at most {MAX_PHASE1_STEPS} for NSGF++ (a few large Sinkhorn-flow steps), got "
            f"{flow_steps}; use SinkhornFlowMatcher alone for a long flow"
        )
    return flow_steps


def check_phase2(phase2: object, name: str = "phase2") -> str:
    """A registered phase-2 variant name (:data:`~torchcfm_nsgf.nsgfpp.variants.PHASE2`)."""
    if phase2 not in PHASE2:
        raise ValueError(f"{name} must be one of {list(PHASE2)}, got {phase2!r}")
    return phase2


def check_endpoints(endpoints: object, name: str = "endpoints") -> str:
    if endpoints not in ENDPOINT_SOURCES:
        raise ValueError(f"{name} must be one of {list(ENDPOINT_SOURCES)}, got {endpoints!r}")
    return endpoints


def check_batch_fraction(value: object, name: str = "phase1_batch_fraction") -> float:
    check_positive(value, name)
    if value > 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return float(value)


def _phase2_help() -> str:
    listed = "; ".join(f"{name}: {cls.help}" for name, cls in PHASE2.items())
    return f"where the straight flow is trained from ({listed})"


@dataclass(frozen=True)
class NSGFPlusPlusOptions:
    """NSGF++'s settings (the paper's T and η, the phase-2 variant, its end points, the batch share of the
    NSGF field, the pool's refresh and capacity).

    Attributes
    ----------
    flow_steps : int
        ``T``, the NSGF (Sinkhorn-flow) steps of phase 1, ``1 .. 5`` (:data:`MAX_PHASE1_STEPS`).
    step_size : float
        η of phase 1.
    phase2 : str
        The phase-2 variant, a key of :data:`~torchcfm_nsgf.nsgfpp.variants.PHASE2`.
    endpoints : {"simulated", "network"}
        Where the OT variants' end points :math:`X_T` come from.
    phase1_batch_fraction : float
        In ``(0, 1]``: the share of each call's targets the NSGF field's loss uses.
    network : {"separate", "shared"}
        A network per phase (the NSGF field and the straight flow), or one network for both phases
        (:mod:`~torchcfm_nsgf.nsgfpp.shared`: phase 1 at shifted times, both trained in one pass per step).
    refresh_every : int
        A new flow into the NSGF pool (and the end-point buffer) every this many training steps.
    pool_capacity : int
        Items of the NSGF phase's trajectory pool.
    """

    flow_steps: int = field(default=2, metadata={"help": "T, the NSGF steps of phase 1 (at most 5)"})
    step_size: float = field(default=1.0, metadata={"help": "eta, the step of phase 1"})
    phase2: str = field(
        default=DEFAULT_PHASE2, metadata={"help": _phase2_help, "choices": lambda: tuple(PHASE2)}
    )
    endpoints: str = field(
        default=DEFAULT_ENDPOINTS,
        metadata={
            "help": "OT variants: the end points X_T the straight flow starts from, from the simulated "
            "Sinkhorn flow or from the NSGF network being trained",
            "choices": lambda: ENDPOINT_SOURCES,
        },
    )
    phase1_batch_fraction: float = field(
        default=1.0,
        metadata={
            "help": "share of each batch the NSGF network is trained on, in (0, 1] (the straight flow takes it all)"
        },
    )
    network: str = field(
        default="separate",
        metadata={
            "help": "a network per phase, or one network for both (phase 1 at shifted times; one network pass "
            "per training step)",
            "choices": lambda: NETWORKS,
        },
    )
    refresh_every: int = field(
        default=5, metadata={"help": "simulate a new flow into the pool every N training steps"}
    )
    pool_capacity: int = field(
        default=100_000, metadata={"help": "items of the NSGF phase's trajectory pool"}
    )

    def __post_init__(self) -> None:
        check_flow_steps(self.flow_steps)
        check_positive(self.step_size, "step_size")
        check_phase2(self.phase2)
        check_endpoints(self.endpoints)
        check_batch_fraction(self.phase1_batch_fraction)
        check_network(self.network)
        check_positive(self.refresh_every, "refresh_every", integer=True)
        check_positive(self.pool_capacity, "pool_capacity", integer=True)
        object.__setattr__(self, "step_size", float(self.step_size))
        object.__setattr__(self, "phase1_batch_fraction", float(self.phase1_batch_fraction))

    @property
    def uses_predictor(self) -> bool:
        """Whether the variant adds a time predictor."""
        return PHASE2[self.phase2].uses_predictor

    def replace(self, **changes: Any) -> NSGFPlusPlusOptions:
        """A copy with ``changes`` (field names; ``n_steps`` is the old name of ``flow_steps``)."""
        from .._deprecation import rename_keywords

        changes = rename_keywords(dict(changes), {"n_steps": "flow_steps"}, "NSGFPlusPlusOptions")
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(
                f"unknown NSGF++ options {unknown}; the options are {[f.name for f in fields(self)]}"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return NSGFPlusPlusOptions(**{**values, **changes})


def option_default(name: str) -> Any:
    """The default of the :class:`NSGFPlusPlusOptions` field ``name``: the one home of NSGF++'s defaults, read
    by every function that takes the same setting (:func:`~torchcfm_nsgf.nsgfpp.nsgfpp_sample`'s
    ``flow_steps``, :class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`'s ``phase1_batch_fraction``)."""
    return NSGFPlusPlusOptions.__dataclass_fields__[name].default
