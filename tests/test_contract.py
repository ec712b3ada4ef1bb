"""The matcher's contract where torchcfm's patterns meet its state: given times served from the pool, named
errors for states it cannot load (nothing half-loaded), one home for NSGF++'s defaults, Hydra construction."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from torchcfm_nsgf import (
    NSGFPlusPlusOptions,
    SinkhornCouplingMatcher,
    SinkhornFlowMatcher,
    TrajectoryPool,
    nsgfpp_sample,
)
from torchcfm_nsgf.nsgfpp import NSGFPlusPlusObjective


def _pooled(path: str, steps: int = 3):
    pool = TrajectoryPool(10_000, generator=torch.Generator().manual_seed(0))
    fm = SinkhornFlowMatcher(flow_steps=steps, path=path, pool=pool, refresh_every=100)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(16, 2, generator=g), 3 + torch.randn(16, 2, generator=g)
    fm.sample_location_and_conditional_flow(x0, x1)  # one flow in the pool
    return fm, pool, x0, x1


def _items(pool: TrajectoryPool):
    """Every item of the pool: (t0, xs, u), read through sample (all items, without replacement)."""
    return pool.sample(len(pool), dtype=torch.float64)


@pytest.mark.parametrize("path", ["straight", "polyline", "grid"])
def test_a_given_t_is_served_from_a_pooled_segment_whose_range_holds_it_placed_at_t(path):
    fm, pool, x0, x1 = _pooled(path)
    T = fm.flow_steps
    t = torch.tensor([0.0, 0.1, 1 / 3, 0.34, 0.5, 2 / 3 - 1e-6, 0.9, 1.0] * 2)
    t_out, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
    assert torch.equal(t_out, t) and fm.n_flows == 1
    t0s, xss, us = _items(pool)
    for i in range(t.shape[0]):
        # the segment that serves row i: same velocity and on the line through xt along ut
        match = (us - ut[i].double()).norm(dim=1) < 1e-5
        match &= (xss + (t[i].double() - t0s)[:, None] * us - xt[i].double()).norm(dim=1) < 1e-5
        assert bool(match.any()), i
        t0 = t0s[match]
        if path == "straight":
            assert bool((t0 == 0).all())
        else:  # the step whose range holds t (k = min(floor(tT), T - 1)); for "grid" the grid time below t
            k = min(int(t[i].double() * T), T - 1)
            assert bool(((t0 - k / T).abs() < 1e-6).any()), (i, t0, k)


def test_a_given_t_with_a_guided_pool_serves_labels_of_the_served_rows():
    fm = SinkhornFlowMatcher(flow_steps=2, path="polyline")
    y1 = torch.arange(12) % 2
    x0, x1 = torch.randn(12, 2), 4 * torch.stack([y1.float(), 1 - y1.float()], 1) + 0.1 * torch.randn(12, 2)
    fm.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
    t = torch.linspace(0, 1, 12)
    _, xt, ut, _, y = fm.guided_sample_location_and_conditional_flow(x0, x1, y1=y1[:, None], t=t)
    assert y.shape == (12, 1)
    ends = xt + (1 - t)[:, None] * ut  # the polyline's last step ends at X_T only for k = T - 1
    last = t >= 0.5
    assert torch.equal(ends[last].argmax(1) == 0, y[last, 0] == 1)


# ---------------------------------------------------------------------------------------------- load_state_dict
def _trained(**kw) -> SinkhornFlowMatcher:
    fm = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(0), refresh_every=2, **kw)
    for _ in range(3):
        fm.sample_location_and_conditional_flow(torch.randn(16, 2), 2 + torch.randn(16, 2))
    return fm


def _same_state(a: dict, b: dict) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: {"foo": 1}, "has no key 'calls'"),
        (lambda s: {**s, "format": "SinkhornFlowMatcher/9"}, "format 'SinkhornFlowMatcher/9'"),
        (lambda s: {**s, "settings": {**s["settings"], "flow_steps": 3}}, "flow_steps=3.*flow_steps=2"),
        (
            lambda s: {**s, "settings": {**s["settings"], "step_sizes": [1.0, 0.5]}},
            r"step_sizes=\[1.0, 0.5\]",
        ),
        (lambda s: {**s, "settings": {**s["settings"], "path": "grid"}}, "path='grid'.*path='straight'"),
        (lambda s: {**s, "settings": {**s["settings"], "class": "Other"}}, "class='Other'"),
        (lambda s: {**s, "calls": -1}, "state\\['calls'\\] must be a non-negative int"),
        (
            lambda s: {**s, "pool": {**s["pool"], "xt": s["pool"]["xt"][:3]}},
            "state\\['xt'\\] must be a tensor",
        ),
        (lambda s: {**s, "generator": torch.zeros(3, dtype=torch.uint8)}, "state\\['generator'\\]"),
        (lambda s: {**s, "blur": "abc"}, "state\\['blur'\\] must be a finite float"),
        (lambda s: {**s, "blur": float("nan")}, "state\\['blur'\\] must be a finite float"),
        (lambda s: {**s, "fixed_blur": "abc"}, "state\\['fixed_blur'\\] must be a finite float"),
        (lambda s: {**s, "targets": {"mean": "x", "scale": 1.0}}, "state\\['targets'\\]"),
        (lambda s: {**s, "targets": {"mean": torch.zeros(2)}}, "state\\['targets'\\]"),
        (lambda s: {**s, "staged": 5}, "state\\['staged'\\]"),
        (lambda s: {**s, "staged": {"x0": torch.zeros(2, 2), "x1": "x", "y1": None}}, "state\\['staged'\\]"),
    ],
)
def test_a_state_it_cannot_load_raises_a_named_error_and_changes_nothing(change, match):
    source, target = _trained(), _trained()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(change(source.state_dict()))
    assert _same_state(target.state_dict(), before)


def test_a_state_of_another_sample_shape_raises_for_a_pool_that_holds_items():
    pool = TrajectoryPool(1000)
    fm = SinkhornFlowMatcher(pool=pool)
    fm.sample_location_and_conditional_flow(torch.randn(8, 3), torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"shape \(2,\).*shape \(3,\)"):
        fm.load_state_dict(_trained().state_dict())
    with pytest.raises(TypeError, match="state must be a dict"):
        fm.load_state_dict([1, 2])


def test_states_of_other_flow_settings_raise_and_the_coupling_matcher_keeps_its_own():
    with pytest.raises(ValueError, match="flow_steps=2.*flow_steps=3"):
        SinkhornFlowMatcher(flow_steps=3).load_state_dict(_trained().state_dict())
    with pytest.raises(ValueError, match="step_sizes"):
        SinkhornFlowMatcher(step_size=0.5).load_state_dict(_trained().state_dict())
    coupling = SinkhornCouplingMatcher()
    coupling.sample_location_and_conditional_flow(torch.randn(8, 2), torch.randn(8, 2))
    with pytest.raises(ValueError, match="class='SinkhornCouplingMatcher'"):
        SinkhornFlowMatcher(flow_steps=1).load_state_dict(coupling.state_dict())
    SinkhornCouplingMatcher().load_state_dict(coupling.state_dict())


# ---------------------------------------------------------------------------------------------- defaults
def test_the_sampler_without_flow_steps_integrates_what_the_trainer_trained():
    assert NSGFPlusPlusOptions().flow_steps == 2
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    out = nsgfpp_sample(zero, None, zero, torch.randn(4, 2))
    assert out.nfe["nsgf"] == NSGFPlusPlusOptions().flow_steps
    objective = NSGFPlusPlusObjective(SinkhornFlowMatcher(pool=None))
    assert objective.phase1_batch_fraction == NSGFPlusPlusOptions().phase1_batch_fraction


# ---------------------------------------------------------------------------------------------- the runner
def test_hydra_builds_the_matchers_from_a_target():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create(
        {"_target_": "torchcfm_nsgf.SinkhornFlowMatcher", "sigma": 0.1, "flow_steps": 3, "path": "polyline"}
    )
    fm = hydra_utils.instantiate(config)
    assert isinstance(fm, SinkhornFlowMatcher) and (fm.sigma, fm.flow_steps, fm.path) == (0.1, 3, "polyline")
    t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn(8, 2), torch.randn(8, 2))
    assert xt.shape == (8, 2)
    plain = hydra_utils.instantiate({"_target_": "torchcfm_nsgf.SinkhornCouplingMatcher", "sigma": 0})
    assert isinstance(plain, SinkhornCouplingMatcher) and plain.sigma == 0


@pytest.mark.parametrize("bad", ["batch", "y0"])
def test_a_call_refused_for_its_arguments_leaves_the_pool_and_the_drift_warning_alone(bad):
    g = torch.Generator().manual_seed(0)
    fm = SinkhornFlowMatcher(flow_size=64, refresh_every=4, generator=torch.Generator().manual_seed(1))
    y1 = torch.arange(32) % 2
    for _ in range(2):
        fm.guided_sample_location_and_conditional_flow(
            torch.randn(32, 2, generator=g), torch.randn(32, 2), y1=y1
        )
    before = copy.deepcopy(fm.state_dict())
    n = 128 if bad == "batch" else 32
    far = 40 + torch.randn(
        n, 2, generator=g
    )  # targets that drifted: a served call would warn and empty the pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="flow_size=64 is smaller" if bad == "batch" else "y0 cannot"):
            fm.guided_sample_location_and_conditional_flow(
                torch.randn(n, 2), far, y0=None if bad == "batch" else y1, y1=torch.arange(n) % 2
            )
    assert _same_state(fm.state_dict(), before)
