"""Deprecated module, kept for one release: its names moved.

The 2D task samplers are in :mod:`torchcfm_nsgf.datasets`, ``w2`` in :mod:`torchcfm_nsgf.metrics`, and the
training harness (``train_flow_matching``, ``train_nsgf``, ``train_nsgfpp``, ``TrainedField``, ``Sampler``,
``make_model``, ``make_conditional_model``) in ``benchmarks/toy_harness.py`` of the source tree. Each old name
still resolves here, with a ``DeprecationWarning`` (the harness names only in a source checkout, where
``benchmarks/`` exists).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from ._deprecation import moved

_DATASETS = (
    "CONDITIONAL_TASKS",
    "TASKS",
    "ConditionalTask",
    "Task",
    "get_task",
    "sample_8gaussians_labelled",
    "sample_checkerboard",
    "sample_gaussian",
    "sample_scurve",
)
_HARNESS = (
    "Sampler",
    "TrainedField",
    "make_conditional_model",
    "make_model",
    "train_flow_matching",
    "train_nsgf",
    "train_nsgfpp",
)

__all__ = sorted((*_DATASETS, "w2", *_HARNESS))


def _harness() -> Any:
    if "toy_harness" in sys.modules:
        return sys.modules["toy_harness"]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_harness.py"
    if not path.is_file():
        raise ImportError(
            "the 2D training harness moved to benchmarks/toy_harness.py of the source tree, which this "
            "installation does not have"
        )
    spec = importlib.util.spec_from_file_location("toy_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_harness"] = module
    spec.loader.exec_module(module)
    return module


def _loader(name: str) -> Any:
    if name in _DATASETS:
        return lambda: (
            getattr(importlib.import_module("torchcfm_nsgf.datasets"), name),
            "torchcfm_nsgf.datasets",
        )
    if name == "w2":
        return lambda: (importlib.import_module("torchcfm_nsgf.metrics").w2, "torchcfm_nsgf.metrics")
    return lambda: (getattr(_harness(), name), "benchmarks/toy_harness.py")


__getattr__ = moved(__name__, {name: _loader(name) for name in __all__})
