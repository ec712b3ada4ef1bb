"""The 2D training harness under its earlier name: the names live in ``benchmarks/harness``.

``train_flow_matching`` (torchcfm's loop for any matcher), ``train_nsgf`` (NSGF through it), ``train_nsgfpp``
(the one 2D NSGF++ setup), ``TrainedField``, ``Sampler``, ``make_model`` and ``make_conditional_model``, for
scripts and tests that import ``toy_harness``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (torchcfm_nsgf.toy's shim)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

Sampler = harness.Sampler
TrainedField = harness.TrainedField
make_conditional_model = harness.make_conditional_model
make_model = harness.make_model
train_flow_matching = harness.train_flow_matching
train_nsgf = harness.train_nsgf
train_nsgfpp = harness.train_nsgfpp
