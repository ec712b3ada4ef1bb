"""Class-conditional (guided) NSGF targets: own-class transport, torchcfm's guided convention, labels in the pool."""

from __future__ import annotations

import pytest
import torch
from reference import fixed_point_velocity, rel_err
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions

CENTRES = torch.tensor([[-8.0, 0.0], [8.0, 0.0]])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_classes(n: int, seed: int = 0, weights=(0.5, 0.5)):
    """Noise x0 near the origin, targets in two far-apart blobs, labels drawn independently of x0."""
    g = _gen(seed)
    x0 = torch.randn(n, 2, generator=g)
    y1 = (torch.rand(n, generator=g) < weights[1]).long()
    x1 = CENTRES[y1] + 0.5 * torch.randn(n, 2, generator=g)
    return x0, x1, y1


def _matcher(seed: int = 1, **kw) -> SinkhornFlowMatcher:
    args = dict(sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False), pool=None, generator=_gen(seed))
    args.update(kw)
    return SinkhornFlowMatcher(**args)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(path="polyline", flow_steps=3, step_size=0.6), dict(pool="auto", refresh_every=3)],
    ids=["straight", "polyline", "pool"],
)
def test_every_served_target_points_towards_its_own_class(kw):
    matcher = _matcher(**kw)
    for call in range(4):
        x0, x1, y1 = _two_classes(64, seed=call)
        t, xt, ut, y0_out, y1_out = matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
        assert y0_out is None
        own, other = CENTRES[y1_out], CENTRES[1 - y1_out]
        # the classes lie at -8 and +8 on the first axis: the velocity must point from the other to its own
        assert bool(((ut * (own - other)).sum(1) > 0).all()), "a target velocity points to the other class"
        # the served particle ends (straight: at t = 1) nearer its own class than the other one
        if matcher.path == "straight":
            end = xt + (1 - t)[:, None] * ut
            assert bool(((end - own).norm(dim=1) < (end - other).norm(dim=1)).all())
    # the unconditional flow of the same mixed batch pulls many particles to the other class: the test above
    # would fail if the labels were ignored
    x0, x1, y1 = _two_classes(64, seed=0)
    _, xt, ut = _matcher().sample_location_and_conditional_flow(x0, x1)
    assert int(((ut * (CENTRES[y1] - CENTRES[1 - y1])).sum(1) <= 0).sum()) > 10


def test_one_step_velocity_is_the_per_class_sinkhorn_velocity():
    """Each class's velocity equals an independent float64 Sinkhorn fixed point on that class's particles."""
    x0, x1, y1 = _two_classes(48, seed=3)
    x0, x1 = x0.double(), x1.double()
    matcher = _matcher(flow_steps=1, sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False, tol=1e-9))
    _, xt, ut, _, y = matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1, t=torch.zeros(48))
    assert torch.equal(y, y1) and torch.equal(xt, x0)
    for c in (0, 1):
        ref = fixed_point_velocity(x0[y1 == c], x1[y1 == c], blur=0.5)
        assert rel_err(ut[y1 == c], ref) < 1e-6


def test_return_convention_shapes_and_dtypes_match_torchcfm():
    x0, x1, y1 = _two_classes(32, seed=4)
    y1 = y1.int()
    ot = ExactOptimalTransportConditionalFlowMatcher()
    ours = _matcher()
    for return_noise in (False, True):
        a = ot.guided_sample_location_and_conditional_flow(x0, x1, y1=y1, return_noise=return_noise)
        b = ours.guided_sample_location_and_conditional_flow(x0, x1, y1=y1, return_noise=return_noise)
        assert len(a) == len(b) == 5 + return_noise
        assert a[3] is None and b[3] is None
        for u, v in zip(a, b, strict=True):
            if u is not None:
                assert u.shape == v.shape and u.dtype == v.dtype and u.device == v.device
    # with y0 too, both labels come back, one per served row, in the row's class
    y0 = (torch.arange(32) % 2).int()
    t, xt, ut, y0_out, y1_out = ours.guided_sample_location_and_conditional_flow(x0, x1, y0=y0, y1=y1)
    assert torch.equal(y0_out, y0) and torch.equal(y1_out, y0)
    assert bool(((ut * (CENTRES[y0.long()] - CENTRES[1 - y0.long()])).sum(1) > 0).all())
    # float64 inputs: times in x0's dtype, as torchcfm
    t64 = ours.guided_sample_location_and_conditional_flow(x0.double(), x1.double(), y1=y1)[0]
    assert t64.dtype == torch.float64


@pytest.mark.parametrize("pool", [None, "auto"])
def test_without_labels_it_is_the_unconditional_method(pool):
    x0, x1, _ = _two_classes(32, seed=5)
    a, b = _matcher(seed=7, pool=pool, sigma=0.1), _matcher(seed=7, pool=pool, sigma=0.1)
    for _ in range(3):
        plain = a.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        guided = b.guided_sample_location_and_conditional_flow(x0, x1, return_noise=True)
        assert guided[3] is None and guided[4] is None
        for u, v in zip(plain, guided[:3] + guided[5:], strict=True):
            assert torch.equal(u, v)


def test_particles_split_in_proportion_to_the_class_counts():
    g = _gen(6)
    x0 = torch.randn(10, 2, generator=g)
    y1 = torch.tensor([0] * 15 + [1] * 3 + [4] * 2)
    x1 = torch.cat(
        [CENTRES[0] + torch.randn(15, 2, generator=g), CENTRES[1] + torch.randn(5, 2, generator=g)]
    )
    traj, labels = _matcher().simulate_guided(x0, x1, y1)
    # shares 7.5, 1.5, 1.0: largest remainders give 8 (or 7), 2 (or 1), 1
    counts = torch.bincount(labels, minlength=5)
    assert int(counts.sum()) == 10 and counts[4] == 1
    assert sorted([int(counts[0]), int(counts[1])]) in ([2, 8], [1, 8], [2, 7])
    assert traj.xs.shape == (3, 10, 2)


def test_balanced_serving_and_refusals():
    x0, x1, y1 = _two_classes(200, seed=8, weights=(0.8, 0.2))
    m = _matcher(pool="auto", balanced=True, refresh_every=100)
    m.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)  # fills the pool with the 200 particles
    _, _, _, _, served = m.guided_sample_location_and_conditional_flow(x0[:60], x1[:60], y1=y1[:60])
    assert torch.bincount(served).tolist() == [30, 30]  # the data is about 4:1
    with pytest.raises(ValueError, match="y1 must be given"):
        m.sample_location_and_conditional_flow(x0, x1)
    plain = _matcher(pool="auto")
    plain.sample_location_and_conditional_flow(x0, x1)
    with pytest.raises(ValueError, match="y1 must be None"):
        plain.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
    with pytest.raises(ValueError, match="y0 needs y1"):
        _matcher().guided_sample_location_and_conditional_flow(x0, x1, y0=y1)
    with pytest.raises(ValueError, match=r"y0 holds the classes \[2\]"):
        _matcher().guided_sample_location_and_conditional_flow(x0, x1, y0=torch.full((200,), 2), y1=y1)
    with pytest.raises(ValueError, match=r"y1 must have shape \(200,\)"):
        _matcher().guided_sample_location_and_conditional_flow(x0, x1, y1=y1[:5])
