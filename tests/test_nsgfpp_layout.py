"""NSGF++'s rooms: the options object, the variant registry, renamed keywords, and checkpoints written by the
code before the split (format ``nsgfpp/2``)."""

from __future__ import annotations

import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

from torchcfm_nsgf import NSGFPlusPlus, NSGFPlusPlusObjective, NSGFPlusPlusOptions, SinkhornFlowMatcher
from torchcfm_nsgf.networks import TimePredictorMLP, VelocityMLP
from torchcfm_nsgf.nsgfpp import PHASE2, PHASE2_VARIANTS, PREDICTOR_VARIANTS, nsgfpp_sample

FIXTURES = Path(__file__).parent / "fixtures"


def _build(phase2: str = "ot", **kw) -> NSGFPlusPlus:
    torch.manual_seed(0)
    predictor = TimePredictorMLP(2, 8) if PHASE2[phase2].uses_predictor else None
    return NSGFPlusPlus(
        VelocityMLP(2, 8),
        predictor,
        VelocityMLP(2, 8),
        phase2=phase2,
        generator=torch.Generator().manual_seed(1),
        **kw,
    )


def test_a_checkpoint_of_format_2_loads_and_continues_as_the_code_that_wrote_it():
    # written by the single-module nsgfpp (format nsgfpp/2): VelocityMLP(2, 8) networks, variant "ot",
    # refresh_every=2, 4 steps on N(0, I) -> N(3, I); the numbers below are what that code printed after
    # loading the file and running the same 3 further steps and sampling. Agreement to 1e-5 relative, not
    # to the last bit: the engine's reductions have changed their rounding since (clamped exp, the dense
    # "yx" soft-min reduced along columns), which moves the later losses by a few 1e-6.
    model = _build(refresh_every=2)
    model.load(FIXTURES / "nsgfpp2_ot.pt")
    assert (model.iterations, model.flow_steps, model.phase2, model.feature_shape) == (4, 2, "ot", (2,))
    assert model.options.phase1_batch_fraction == 1.0 and model.options.refresh_every == 2
    g = torch.Generator().manual_seed(4)
    hist = model.fit(
        lambda n: torch.randn(n, 2, generator=g), lambda n: torch.randn(n, 2, generator=g) + 3, 3, 32
    )
    expected = {
        "nsgf": [21.842605590820312, 19.552644729614258, 24.489667892456055],
        "straight": [0.11948166787624359, 0.3230792284011841, 0.3181231915950775],
    }
    for k, values in expected.items():
        assert hist[k] == pytest.approx(values, rel=1e-5)
    out = model.sample(torch.randn(16, 2, generator=torch.Generator().manual_seed(5)))
    assert float(out.samples.double().sum()) == pytest.approx(6.791822388768196, rel=1e-5)
    assert out.nfe == {"nsgf": 2, "predictor": 0, "straight": 5}


def test_new_checkpoints_round_trip_with_the_options(tmp_path):
    a = _build("paper", flow_steps=1, step_size=0.5, phase1_batch_fraction=0.5, refresh_every=3)
    a.fit(torch.randn(64, 2), torch.randn(64, 2) + 2, 2, 16)
    a.save(tmp_path / "m.pt")
    b = _build("paper")
    b.load(tmp_path / "m.pt")
    assert (
        b.options
        == a.options
        == NSGFPlusPlusOptions(
            flow_steps=1, step_size=0.5, phase2="paper", phase1_batch_fraction=0.5, refresh_every=3
        )
    )
    assert b.objective.phase1_batch_fraction == 0.5 and b.matcher.refresh_every == 3


def test_options_are_frozen_checked_and_drive_the_trainer():
    options = NSGFPlusPlusOptions(flow_steps=3, step_size=0.25, refresh_every=7, pool_capacity=999)
    with pytest.raises(FrozenInstanceError):
        options.flow_steps = 2
    with pytest.raises(ValueError, match="flow_steps must be at most 5"):
        NSGFPlusPlusOptions(flow_steps=6)
    with pytest.raises(ValueError, match="phase1_batch_fraction must lie in"):
        NSGFPlusPlusOptions(phase1_batch_fraction=1.5)
    with pytest.raises(ValueError, match="endpoints must be one of"):
        NSGFPlusPlusOptions(endpoints="data")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['flow_step'\\]"):
        NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), flow_step=2)
    model = NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), options, phase1_batch_fraction=0.5)
    m = model.matcher
    assert (m.flow_steps, m.step_sizes, m.refresh_every, m.pool.capacity) == (3, (0.25,) * 3, 7, 999)
    assert model.objective.phase1_batch_fraction == 0.5 and model.options.flow_steps == 3


def test_old_keyword_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'n_steps' is renamed 'flow_steps'"):
        model = NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), n_steps=3)
    assert model.flow_steps == 3
    with pytest.warns(DeprecationWarning, match="renamed flow_steps"):
        assert model.n_steps == 3
    x0 = torch.randn(5, 2)
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    with pytest.warns(DeprecationWarning, match="'n_steps' is renamed 'flow_steps'"):
        old = nsgfpp_sample(zero, None, zero, x0, n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = nsgfpp_sample(zero, None, zero, x0, flow_steps=2)
    assert old.nfe == new.nfe == {"nsgf": 2, "predictor": 0, "straight": 5}
    with pytest.raises(TypeError, match="both 'n_steps' and its new name 'flow_steps'"):
        nsgfpp_sample(zero, None, zero, x0, n_steps=2, flow_steps=2)


def test_the_registry_is_the_one_list_of_variants():
    assert PHASE2_VARIANTS == tuple(PHASE2)
    assert PHASE2_VARIANTS[:4] == ("paper", "ot", "ot-source", "ot-predictor")  # later variants append
    assert PREDICTOR_VARIANTS == tuple(n for n in PHASE2 if PHASE2[n].uses_predictor)
    assert PREDICTOR_VARIANTS[:2] == ("paper", "ot-predictor")
    for name, cls in PHASE2.items():
        objective = NSGFPlusPlusObjective(SinkhornFlowMatcher(pool=None), phase2=name)
        assert type(objective.variant) is cls and objective.uses_predictor == cls.uses_predictor
        assert cls.help and cls.name == name


def test_the_old_module_paths_import():
    import importlib

    module = importlib.import_module("torchcfm_nsgf.nsgfpp")
    for name in ("NSGFPlusPlus", "NSGFPlusPlusObjective", "nsgfpp_sample", "predict_time", "straight_flow_from",
                 "MAX_PHASE1_STEPS", "DEFAULT_PHASE2", "DEFAULT_ENDPOINTS", "ENDPOINT_SOURCES"):  # fmt: skip
        assert hasattr(module, name)


def test_the_old_toy_module_still_serves_its_names_with_a_deprecation_warning():
    import torchcfm_nsgf.toy as toy
    from torchcfm_nsgf import datasets, metrics

    with pytest.warns(DeprecationWarning, match="toy.get_task moved to torchcfm_nsgf.datasets"):
        assert toy.get_task is datasets.get_task
    with pytest.warns(DeprecationWarning, match="toy.w2 moved to torchcfm_nsgf.metrics"):
        assert toy.w2 is metrics.w2
    with pytest.warns(DeprecationWarning, match="moved to benchmarks/toy_harness.py"):
        assert callable(toy.train_nsgf)
    with pytest.raises(AttributeError):
        toy.no_such_name  # noqa: B018
