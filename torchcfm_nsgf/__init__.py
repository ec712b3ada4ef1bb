"""torchcfm_nsgf: Neural Sinkhorn Gradient Flow (NSGF) and NSGF++ for the torchcfm ecosystem.

Layout (engine -> matcher -> pool -> samplers -> examples):

* :mod:`torchcfm_nsgf.sinkhorn`: the Sinkhorn velocity engine (:func:`sinkhorn_velocity`);
* :mod:`torchcfm_nsgf.matcher`: :class:`SinkhornFlowMatcher`, NSGF behind torchcfm's matcher interface, composed of
  the flow (:mod:`~torchcfm_nsgf.flow`, the one part that calls the engine), the path geometry
  (:mod:`~torchcfm_nsgf.paths`), the replay (:mod:`~torchcfm_nsgf.replay`, :mod:`~torchcfm_nsgf.serving`) and
  the state (:mod:`~torchcfm_nsgf.matcher_state`);
* :mod:`torchcfm_nsgf.coupling`: :class:`SinkhornCouplingMatcher`, flow matching on pairs of a large
  entropic OT plan (the large-coupling baseline);
* :mod:`torchcfm_nsgf.drift`: :class:`SinkhornDrift`, regression targets that train a one-step generator by the
  Sinkhorn gradient flow of its own samples; :mod:`torchcfm_nsgf.meanflow`: :class:`MeanFlow`, the one-step
  baseline (average-velocity regression);
* :mod:`torchcfm_nsgf.nsgfpp`: NSGF++ (one options object, phase-2 variants in a registry, one training
  objective, the two-phase sampler, the vector trainer);
* :mod:`torchcfm_nsgf.pool`: the trajectory pool (experience replay; its storage and draws in
  :mod:`~torchcfm_nsgf.pool_storage` and :mod:`~torchcfm_nsgf.pool_draws`);
* :mod:`torchcfm_nsgf.sampling`: one sampler over a solver registry, with exact NFE accounting;
* :mod:`torchcfm_nsgf.guidance`: classifier-free guidance for class-conditional fields.
"""

from importlib import metadata as _metadata

from . import nsgfpp
from .coupling import SinkhornCouplingMatcher
from .drift import SinkhornDrift
from .guidance import CFGField, drop_labels
from .matcher import PATHS, SinkhornFlowMatcher, SinkhornTrajectory
from .meanflow import AverageVelocityMLP, MeanFlow, meanflow_sample
from .networks import TimePredictorCNN, TimePredictorMLP, VelocityMLP
from .nsgfpp import (
    DEFAULT_PHASE2,
    MAX_PHASE1_STEPS,
    NSGFPlusPlus,
    NSGFPlusPlusObjective,
    NSGFPlusPlusOptions,
    nsgfpp_sample,
    predict_time,
    straight_flow_from,
)
from .pool import TrajectoryPool
from .sampling import SOLVERS, NFECounter, SampleResult, SolverSpec, euler_sample, odeint_sample
from .sinkhorn import (
    SinkhornConvergenceWarning,
    SinkhornOptions,
    SinkhornSolution,
    sinkhorn_solve,
    sinkhorn_velocity,
)

#: Names of NSGF++'s phase-2 variants (``phase2=``), as registered in :mod:`torchcfm_nsgf.nsgfpp.variants`
#: when the package was imported; ``torchcfm_nsgf.nsgfpp.PHASE2_VARIANTS`` reads the registry afresh.
PHASE2_VARIANTS: tuple[str, ...] = nsgfpp.PHASE2_VARIANTS

try:
    __version__ = _metadata.version("torchcfm-nsgf")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AverageVelocityMLP",
    "MeanFlow",
    "meanflow_sample",
    "CFGField",
    "drop_labels",
    "DEFAULT_PHASE2",
    "MAX_PHASE1_STEPS",
    "PHASE2_VARIANTS",
    "NSGFPlusPlus",
    "NSGFPlusPlusObjective",
    "NSGFPlusPlusOptions",
    "TimePredictorCNN",
    "TimePredictorMLP",
    "VelocityMLP",
    "nsgfpp_sample",
    "predict_time",
    "straight_flow_from",
    "NFECounter",
    "SOLVERS",
    "SampleResult",
    "SinkhornConvergenceWarning",
    "SinkhornCouplingMatcher",
    "SinkhornDrift",
    "PATHS",
    "SinkhornFlowMatcher",
    "SinkhornOptions",
    "SinkhornTrajectory",
    "SinkhornSolution",
    "SolverSpec",
    "TrajectoryPool",
    "euler_sample",
    "odeint_sample",
    "sinkhorn_solve",
    "sinkhorn_velocity",
]
