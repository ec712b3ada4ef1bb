"""The state SinkhornFlowMatcher keeps between calls never changes what a later call returns silently.

torchcfm's matchers are stateless: a sanity call on a dummy batch, then training on other data, then another
dataset, all on one object, is ordinary use. These tests pin what such reuse gives: the call's own shape and
dtype (as torchcfm's ConditionalFlowMatcher returns for the same inputs), or a clear error; a blur resolved
from each flow's own targets; a warning when the targets move away from what the pool holds; ``reset()``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from torchcfm.utils import sample_8gaussians, sample_moons

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions, TrajectoryPool


def _drift_warnings(seen) -> list[str]:
    return [str(w.message) for w in seen if "reset()" in str(w.message)]


def _calls(fm, batches):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        outs = [fm.sample_location_and_conditional_flow(x0, x1) for x0, x1 in batches]
    return outs, seen


# ---------------------------------------------------------------------------------------------- shapes, dtypes
def test_a_call_of_another_sample_shape_raises_naming_both_shapes_and_reset():
    fm = SinkhornFlowMatcher()
    fm.sample_location_and_conditional_flow(torch.randn(64, 2), torch.randn(64, 2) + 1)
    for shape in [(8, 1, 6, 6), (64, 3)]:
        with pytest.raises(ValueError) as err:
            fm.sample_location_and_conditional_flow(torch.randn(shape), torch.randn(shape))
        message = str(err.value)
        assert str(tuple(shape[1:])) in message and "(2,)" in message and "reset()" in message
    fm.reset()  # then the images are served in their own shape
    t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn(8, 1, 6, 6), torch.randn(8, 1, 6, 6))
    assert t.shape == (8,) and xt.shape == ut.shape == (8, 1, 6, 6)


def test_a_pool_of_the_callers_keeps_its_item_shape_and_the_error_says_so():
    pool = TrajectoryPool(1000)
    fm = SinkhornFlowMatcher(pool=pool)
    fm.sample_location_and_conditional_flow(torch.randn(32, 2), torch.randn(32, 2))
    fm.reset()
    assert len(pool) == 0 and fm.pool is pool and fm.n_calls == 0
    with pytest.raises(ValueError, match="new TrajectoryPool"):
        fm.sample_location_and_conditional_flow(torch.randn(32, 3), torch.randn(32, 3))


# (x0 shape, x0 dtype, x1 dtype): one matcher object answers them in this order
_CALLS = [
    ((64, 2), torch.float32, torch.float32),  # a sanity call
    ((256, 2), torch.float32, torch.float32),  # training
    ((256, 2), torch.float64, torch.float64),
    ((256, 2), torch.float32, torch.float64),
    ((256, 2), torch.float64, torch.float32),
    ((32, 2), torch.float16, torch.float32),
    ((16, 2), torch.bfloat16, torch.bfloat16),
]


def test_every_call_returns_torchcfms_shapes_and_dtypes_for_the_same_inputs():
    fm, reference = SinkhornFlowMatcher(), ConditionalFlowMatcher(sigma=0.0)
    g = torch.Generator().manual_seed(0)
    for shape, d0, d1 in _CALLS:
        x0 = torch.randn(shape, generator=g).to(d0)
        x1 = (3 + torch.randn(shape, generator=g)).to(d1)
        for return_noise in (False, True):
            ours = fm.sample_location_and_conditional_flow(x0, x1, return_noise=return_noise)
            theirs = reference.sample_location_and_conditional_flow(x0, x1, return_noise=return_noise)
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs, strict=True):
                assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), (shape, d0, d1)
                assert bool(torch.isfinite(a.float()).all())


def test_without_a_pool_every_shape_is_served_on_one_object():
    fm, reference = SinkhornFlowMatcher(pool=None), ConditionalFlowMatcher()
    for shape in [(64, 2), (8, 1, 6, 6), (16, 3)]:
        x0, x1 = torch.randn(shape), torch.randn(shape)
        for a, b in zip(
            fm.sample_location_and_conditional_flow(x0, x1),
            reference.sample_location_and_conditional_flow(x0, x1),
            strict=True,
        ):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)


# ---------------------------------------------------------------------------------------------- blur
def test_a_dummy_first_call_does_not_fix_the_blur_of_later_flows():
    g = torch.Generator().manual_seed(1)
    x0, x1 = sample_8gaussians(256), sample_moons(256)
    trained = SinkhornFlowMatcher()
    trained.sample_location_and_conditional_flow(x0, x1)
    checked = SinkhornFlowMatcher()
    dummy = 3 + torch.randn(64, 2, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the drift warning, tested below
        checked.sample_location_and_conditional_flow(torch.randn(64, 2, generator=g), dummy)
        assert checked.blur == pytest.approx(0.1 * SinkhornOptions.scale_of(dummy))
        checked.sample_location_and_conditional_flow(x0, x1)  # the pool holds < 256 items: a new flow
    # closed form: 0.1 times the RMS distance of this flow's targets to their mean
    expected = 0.1 * float((x1.double() - x1.double().mean(0)).norm(dim=1).square().mean().sqrt())
    assert checked.blur == trained.blur == pytest.approx(expected, rel=1e-12)


def test_an_absolute_blur_stays_as_given():
    fm = SinkhornFlowMatcher(sinkhorn=SinkhornOptions(blur=0.3, relative_blur=False), pool=None)
    for c in (1.0, 10.0):
        fm.simulate(torch.randn(32, 2), c * sample_moons(32))
        assert fm.blur == 0.3


# ---------------------------------------------------------------------------------------------- reset
def test_reset_gives_a_freshly_constructed_matcher():
    g = torch.Generator()
    used = SinkhornFlowMatcher(flow_steps=3, refresh_every=4, generator=g)
    for _ in range(6):
        used.sample_location_and_conditional_flow(torch.randn(40, 2), sample_8gaussians(40))
    g.manual_seed(7)
    used.reset()
    assert (used.n_calls, used.n_flows, used.n_solves, used.blur, used.pool) == (0, 0, 0, None, None)
    fresh = SinkhornFlowMatcher(flow_steps=3, refresh_every=4, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(3)
    for _ in range(9):
        x0, x1 = torch.randn(20, 1, 3, 3, generator=data), torch.rand(20, 1, 3, 3, generator=data)
        for a, b in zip(
            used.sample_location_and_conditional_flow(x0, x1),
            fresh.sample_location_and_conditional_flow(x0, x1),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (used.n_calls, used.n_flows, used.n_solves) == (fresh.n_calls, fresh.n_flows, fresh.n_solves)
    assert used.blur == fresh.blur


def test_reset_lets_a_guided_matcher_serve_unconditional_calls():
    fm = SinkhornFlowMatcher()
    x0, x1, y1 = torch.randn(32, 2), torch.randn(32, 2), torch.arange(32) % 4
    fm.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
    with pytest.raises(ValueError, match="reset"):
        fm.sample_location_and_conditional_flow(x0, x1)
    fm.reset()
    assert fm.sample_location_and_conditional_flow(x0, x1)[1].shape == (32, 2)


# ---------------------------------------------------------------------------------------------- drift warning
def test_a_mean_shift_of_the_targets_warns_once_naming_reset():
    g = torch.Generator().manual_seed(0)
    fm = SinkhornFlowMatcher()

    def batch(centre: float):
        return torch.randn(128, 2, generator=g), centre + torch.randn(128, 2, generator=g)

    _, seen = _calls(fm, [batch(10.0), batch(10.0)])
    assert _drift_warnings(seen) == []
    outs, seen = _calls(fm, [batch(-10.0) for _ in range(5)])
    messages = _drift_warnings(seen)
    assert len(messages) == 1 and "pool" in messages[0]
    # the pool's flows towards N(+10, I) are not served for N(-10, I): every served end point X_T = xt +
    # (1 - t) ut is near -10 (its mean within the flow's debiasing error of the targets' mean)
    for t, xt, ut in outs:
        ends = xt + (1 - t)[:, None] * ut
        assert float(ends.max()) < -5.0 and torch.allclose(ends.mean(0), torch.full((2,), -10.0), atol=0.3)
    assert len(fm.pool) == 128 and fm.n_flows == 2
    fm.reset()  # a reset matcher warns again, once, on the next change
    _, seen = _calls(fm, [batch(-10.0), batch(-10.0), batch(10.0), batch(-10.0)])
    assert len(_drift_warnings(seen)) == 1


def test_a_change_of_scale_alone_warns():
    g = torch.Generator().manual_seed(0)
    fm = SinkhornFlowMatcher()
    _, seen = _calls(fm, [(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))])
    _, seen = _calls(fm, [(torch.randn(64, 2, generator=g), 255 * torch.rand(64, 2, generator=g) - 127.5)])
    assert len(_drift_warnings(seen)) == 1


@pytest.mark.parametrize("batch_size,steps", [(256, 2000), (16, 1000)])
def test_an_ordinary_training_run_never_warns(batch_size, steps):
    torch.manual_seed(0)
    fm = SinkhornFlowMatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for _ in range(steps):
            fm.sample_location_and_conditional_flow(sample_8gaussians(batch_size), sample_moons(batch_size))
    assert fm.n_calls == steps and fm.n_flows == steps // fm.refresh_every


def test_an_ordinary_guided_run_never_warns():
    g = torch.Generator().manual_seed(0)
    fm = SinkhornFlowMatcher()
    centres = 4 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(300):
            y1 = torch.randint(0, 4, (128,), generator=g)
            x1 = centres[y1] + 0.3 * torch.randn(128, 2, generator=g)
            fm.guided_sample_location_and_conditional_flow(torch.randn(128, 2, generator=g), x1, y1=y1)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_keeps_blur_targets_and_the_warning_state():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), 5 + torch.randn(64, 2, generator=g)
    a = SinkhornFlowMatcher(refresh_every=3, generator=torch.Generator().manual_seed(1))
    a.sample_location_and_conditional_flow(x0, x1)
    b = SinkhornFlowMatcher(refresh_every=3, generator=torch.Generator().manual_seed(99))
    b.sample_location_and_conditional_flow(-x0, 3 * x1)  # state that the load must replace
    b.load_state_dict(a.state_dict())
    assert b.blur == a.blur and b.n_calls == a.n_calls and len(b.pool) == len(a.pool)
    shifted = (x0, x1 - 20)
    out_a, seen_a = _calls(a, [shifted, shifted, shifted])
    out_b, seen_b = _calls(b, [shifted, shifted, shifted])
    assert len(_drift_warnings(seen_a)) == len(_drift_warnings(seen_b)) == 1
    for call_a, call_b in zip(out_a, out_b, strict=True):
        for u, v in zip(call_a, call_b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    c = SinkhornFlowMatcher(refresh_every=3)
    c.load_state_dict(a.state_dict())  # a has warned: the loaded matcher does not warn again
    _, seen_c = _calls(c, [(x0, x1 + 40)])
    assert _drift_warnings(seen_c) == []


def test_a_state_written_before_the_per_flow_blur_still_loads():
    a = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(1))
    x0, x1 = torch.randn(32, 2), sample_moons(32)
    a.sample_location_and_conditional_flow(x0, x1)
    old = a.state_dict()
    del old["targets"], old["warned_drift"]
    old["sinkhorn_blur"] = 0.1  # what the earlier format stored next to the resolved blur
    b = SinkhornFlowMatcher(generator=torch.Generator())
    b.load_state_dict(old)
    assert b.blur == a.blur and b.sinkhorn == SinkhornOptions() and len(b.pool) == len(a.pool)
    t, xt, ut = b.sample_location_and_conditional_flow(x0, 4 * x1)
    assert xt.shape == (32, 2)
