"""Settings of the image NSGF and NSGF++ methods: one dataclass, with NSGF++'s options as one object."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from .._deprecation import rename_keywords
from ..drift import SELF_TERMS
from ..nsgfpp import NSGFPlusPlusOptions
from ..sinkhorn import HIGH_DIM_BLUR, SinkhornOptions

__all__ = [
    "IMAGE_DRIFT_SELF_TERM",
    "IMAGE_NSGFPP",
    "IMAGE_POOL_CAPACITY",
    "IMAGE_REFRESH_EVERY",
    "NSGFSettings",
]

#: Items of the image trajectory pool per process, and its refresh period in training batches (both methods).
IMAGE_POOL_CAPACITY = 200_000
IMAGE_REFRESH_EVERY = 10

#: NSGF++'s options on images. T = 1, η = 0.5 (a full network step contracts the noise onto a cloud far
#: narrower than the data, which the straight flow cannot spread out again; half a step keeps half of the
#: noise), a quarter of each batch for the NSGF field, end points from the network (what phase 2 meets at
#: sampling), one network for both phases (one network pass per training step), the image pool's refresh and
#: capacity. BENCHMARKS.md §5 and §5a have the measurements behind
#: each choice; the vector defaults are :class:`~torchcfm_nsgf.NSGFPlusPlusOptions`'.
IMAGE_NSGFPP = NSGFPlusPlusOptions(
    flow_steps=1,
    step_size=0.5,
    phase2="ot",
    endpoints="network",
    phase1_batch_fraction=0.25,
    network="shared",
    refresh_every=IMAGE_REFRESH_EVERY,
    pool_capacity=IMAGE_POOL_CAPACITY,
)

#: The self term of ``drift`` on images (``NSGFSettings.drift_self_term``): W-Flow's ablation on ImageNet found
#: the independent batch far better than the same batch (FID 7.08 against 17.57).
IMAGE_DRIFT_SELF_TERM = "independent"

# keywords of NSGFSettings before NSGF++'s options became one object: old name -> NSGFPlusPlusOptions field
_OLD_NSGFPP = {
    "phase1_steps": "flow_steps",
    "phase1_step_size": "step_size",
    "phase2": "phase2",
    "phase1_batch_fraction": "phase1_batch_fraction",
    "endpoints": "endpoints",
}


@dataclass
class NSGFSettings:
    """Settings of the NSGF and NSGF++ methods.

    Attributes
    ----------
    sinkhorn : SinkhornOptions
        Sinkhorn settings of both methods (default: blur ``HIGH_DIM_BLUR`` of the target's scale, what
        ``SinkhornFlowMatcher()`` uses on images; BENCHMARKS.md §5 compares blurs).
    flow_steps, step_size, path : int, float, str
        T, η and served path of the simulated flow for ``nsgf`` (``SinkhornFlowMatcher``'s defaults).
    nsgfpp : NSGFPlusPlusOptions
        NSGF++'s options (default :data:`IMAGE_NSGFPP`). Its ``refresh_every`` and ``pool_capacity`` give way
        to the image pool's, this object's ``refresh_every`` and ``pool_capacity`` (:meth:`nsgfpp_options`).
    pool_capacity : int
        Items of the trajectory pool, per process (each DDP rank holds its own shard).
    pool_max_bytes : int, optional
        Hard bound on the pool's bytes, per process.
    pool_dtype : {"float16", "bfloat16", "float32"}
        Storage dtype of the pool (float16 halves the memory).
    pool_storage : {"memory", "disk"}
        RAM, or memory-mapped files under ``pool_path`` (``rank{r}`` sub-folders).
    pool_path : str, optional
    refresh_every : int
        Simulate a new flow batch into the pool every ``refresh_every`` training batches.
    flow_size : int, optional
        ``nsgf``, ``nsgf++`` (its phase-1 flows) and ``coupling`` (its plans): particles of each simulated
        flow, collected from the latest training batches (``SinkhornFlowMatcher(flow_size=...)``); None:
        flows of one batch.
    drift_self_term : {"independent", "same", "none"}
        ``drift``'s self term (:class:`~torchcfm_nsgf.SinkhornDrift`'s ``self_term``; default
        :data:`IMAGE_DRIFT_SELF_TERM`). ``drift`` also takes ``sinkhorn`` and ``step_size`` from here.

    The keywords ``phase1_steps``, ``phase1_step_size``, ``phase2``, ``phase1_batch_fraction`` and
    ``endpoints`` of earlier releases still work (with a ``DeprecationWarning``) and set the fields of
    ``nsgfpp`` (``flow_steps``, ``step_size``, ...); so do the attributes of those names.
    """

    sinkhorn: SinkhornOptions = field(default_factory=lambda: SinkhornOptions(blur=HIGH_DIM_BLUR))
    flow_steps: int = 2
    step_size: float = 1.0
    path: str = "straight"
    nsgfpp: NSGFPlusPlusOptions = IMAGE_NSGFPP
    pool_capacity: int = IMAGE_POOL_CAPACITY
    pool_max_bytes: int | None = None
    pool_dtype: str = "float16"
    pool_storage: str = "memory"
    pool_path: str | None = None
    refresh_every: int = IMAGE_REFRESH_EVERY
    flow_size: int | None = None
    drift_self_term: str = IMAGE_DRIFT_SELF_TERM

    def __post_init__(self) -> None:
        if self.drift_self_term not in SELF_TERMS:
            raise ValueError(f"drift_self_term must be one of {SELF_TERMS}, got {self.drift_self_term!r}")
        if isinstance(self.nsgfpp, dict):  # from a checkpoint's config
            self.nsgfpp = NSGFPlusPlusOptions(**self.nsgfpp)
        if not isinstance(self.nsgfpp, NSGFPlusPlusOptions):
            raise TypeError(f"nsgfpp must be an NSGFPlusPlusOptions, got {type(self.nsgfpp).__name__}")

    def nsgfpp_options(self) -> NSGFPlusPlusOptions:
        """:attr:`nsgfpp` with the image pool's ``refresh_every`` and ``pool_capacity`` (one pool setting for
        both methods)."""
        return self.nsgfpp.replace(refresh_every=self.refresh_every, pool_capacity=self.pool_capacity)


_dataclass_init = NSGFSettings.__init__


def _init(self: NSGFSettings, *args: Any, **kwargs: Any) -> None:
    old = {k: kwargs.pop(k) for k in list(kwargs) if k in _OLD_NSGFPP}
    if old:
        rename_keywords(dict(old), {k: f"nsgfpp.{v}" for k, v in _OLD_NSGFPP.items()}, "NSGFSettings")
        base = kwargs.get("nsgfpp", IMAGE_NSGFPP)
        if isinstance(base, dict):
            base = NSGFPlusPlusOptions(**base)
        kwargs["nsgfpp"] = base.replace(**{_OLD_NSGFPP[k]: v for k, v in old.items()})
    _dataclass_init(self, *args, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
_init.__signature__ = __import__("inspect").signature(_dataclass_init)
NSGFSettings.__init__ = _init  # type: ignore[method-assign]


def _old_attribute(old: str, new: str) -> property:
    def get(self: NSGFSettings) -> Any:
        warnings.warn(
            f"NSGFSettings.{old} is now NSGFSettings.nsgfpp.{new}; the old name will be removed in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self.nsgfpp, new)

    def set(self: NSGFSettings, value: Any) -> None:
        warnings.warn(
            f"NSGFSettings.{old} is now NSGFSettings.nsgfpp.{new}; the old name will be removed in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        self.nsgfpp = self.nsgfpp.replace(**{new: value})

    return property(get, set)


for _old, _new in _OLD_NSGFPP.items():
    setattr(NSGFSettings, _old, _old_attribute(_old, _new))
