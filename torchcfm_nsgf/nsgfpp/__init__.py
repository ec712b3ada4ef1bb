r"""NSGF++ (Zhu et al., 2024, Algorithm 3): a short Sinkhorn flow, then a neural straight flow.

Phase 1 follows the NSGF field :math:`v_\theta` for ``T <= 5`` large Euler steps (the matcher's normalised
clock); phase 2 integrates a neural straight flow :math:`u_\delta` from a start time to 1: a predicted
:math:`\tau = t_\phi(X_T)` for the variants with a time predictor, else 0. Where phase 2's training segments
start and end is the *variant*, one small class each in a registry.

Modules, one job each:

* :mod:`.options`: :class:`NSGFPlusPlusOptions`, the one frozen settings object (T, η, variant, end points,
  batch share, refresh, pool), and the constants it is checked against;
* :mod:`.variants`: the phase-2 variants (:data:`PHASE2`, :func:`register_phase2`);
* :mod:`.endpoints`: the end-point buffer of the ``"ot"`` variants;
* :mod:`.sampler`: the two-phase sampler (:func:`nsgfpp_sample`, :func:`straight_flow_from`,
  :func:`predict_time`);
* :mod:`.objective`: :class:`NSGFPlusPlusObjective`, one loss per network and the matching sampler, the one
  training interface of the vector trainer and of the image method;
* :mod:`.trainer`: :class:`NSGFPlusPlus`, networks, one training loop and checkpoints for vectors (2D).

Measured comparisons of the variants and of the end-point sources are in BENCHMARKS.md (§4 in 2D, §5 on MNIST).
"""

from .endpoints import EndpointBuffer
from .objective import NSGFPlusPlusObjective
from .options import (
    DEFAULT_ENDPOINTS,
    DEFAULT_PHASE2,
    ENDPOINT_SOURCES,
    MAX_PHASE1_STEPS,
    NSGFPlusPlusOptions,
)
from .sampler import STRAIGHT_STEPS, nsgfpp_sample, predict_time, straight_flow_from
from .trainer import NSGFPlusPlus
from .variants import PHASE2, Phase2Variant, register_phase2


def __getattr__(name: str) -> tuple[str, ...]:
    """``PHASE2_VARIANTS`` and ``PREDICTOR_VARIANTS``, read from the registry (:mod:`.variants`)."""
    from . import variants

    return variants.__getattr__(name)


__all__ = [
    "DEFAULT_ENDPOINTS",
    "DEFAULT_PHASE2",
    "ENDPOINT_SOURCES",
    "MAX_PHASE1_STEPS",
    "PHASE2",
    "PHASE2_VARIANTS",
    "PREDICTOR_VARIANTS",
    "STRAIGHT_STEPS",
    "EndpointBuffer",
    "NSGFPlusPlus",
    "NSGFPlusPlusObjective",
    "NSGFPlusPlusOptions",
    "Phase2Variant",
    "nsgfpp_sample",
    "predict_time",
    "register_phase2",
    "straight_flow_from",
]
