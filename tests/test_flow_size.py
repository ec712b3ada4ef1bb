"""Flows larger than a batch (``flow_size``) and the large-coupling matcher.

References: the engine's own flow of the same staged points (an independent call of ``simulate`` on the
rows the matcher should have kept), POT's log-domain Sinkhorn plan for the coupling's row conditionals.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from torchcfm.utils import sample_8gaussians, sample_moons

from torchcfm_nsgf import SinkhornCouplingMatcher, SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf.coupling import sample_plan_rows


def _batches(n_calls: int, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 2, generator=g), 0.5 * torch.randn(bs, 2, generator=g) + 1.0) for _ in range(n_calls)
    ]


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (to compare sets of points)."""
    x = x.double()
    order = np.lexsort(x.T.numpy()[::-1])
    return x[torch.as_tensor(order.copy())]


@pytest.mark.parametrize("cls", [SinkhornFlowMatcher, SinkhornCouplingMatcher])
def test_a_flow_of_flow_size_particles_from_the_latest_calls(cls):
    bs, n, every = 32, 128, 2
    fm = cls(flow_size=n, refresh_every=every, generator=torch.Generator().manual_seed(0))
    calls = _batches(12, bs)
    sizes = []
    for k, (x0, x1) in enumerate(calls):
        before = len(fm.pool) if fm.pool is not None else 0
        fm.sample_location_and_conditional_flow(x0, x1)
        sizes.append(len(fm.pool) - before)
        if sizes[-1] == n:
            big_call = k
            break
    # flows are due at calls 0, 2, 4 (every refresh_every calls after a flow of one batch): at calls 0
    # and 2 fewer than flow_size rows are kept (32, 96), so those flows are of the call's batch; at call 4
    # the latest 128 rows (calls 1 to 4) make one flow
    assert sizes == [bs, 0, bs, 0, n] and big_call == 2 * every
    kept_x0 = torch.cat([c[0] for c in calls[: big_call + 1]])[-n:]
    kept_x1 = torch.cat([c[1] for c in calls[: big_call + 1]])[-n:]
    first = sum(sizes[:-1])
    start = fm.pool._xt[first : first + n]  # straight segments: the stored start points are the particles
    torch.testing.assert_close(_sorted_rows(start), _sorted_rows(kept_x0), rtol=0, atol=0)
    if cls is SinkhornFlowMatcher:
        # the served velocities are those of the engine's flow of exactly these particles and targets
        reference = SinkhornFlowMatcher(pool=None).simulate(kept_x0, kept_x1)
        expected = reference.xs[-1] - reference.xs[0]
        torch.testing.assert_close(fm.pool._ut[first : first + n], expected, rtol=1e-5, atol=1e-5)


def test_the_refresh_cadence_keeps_samples_served_per_particle():
    bs, n, every = 16, 64, 3
    fm = SinkhornFlowMatcher(flow_size=n, refresh_every=every)
    for x0, x1 in _batches(28, bs, seed=1):
        fm.sample_location_and_conditional_flow(x0, x1)
    # flows at call 0 (a batch), call 3 (n particles), then every every * n / bs = 12 calls: 15, 27
    assert fm.n_flows == 4 and len(fm.pool) == bs + 3 * n


def test_flow_size_resumes_exactly_from_a_state_dict_mid_staging():
    def build():
        return SinkhornFlowMatcher(flow_size=96, refresh_every=2, generator=torch.Generator().manual_seed(4))

    calls = _batches(10, 32, seed=2)
    a = build()
    for x0, x1 in calls[:3]:
        a.sample_location_and_conditional_flow(x0, x1)
    b = build()
    b.load_state_dict(a.state_dict())
    for x0, x1 in calls[3:]:
        for u, v in zip(
            a.sample_location_and_conditional_flow(x0, x1),
            b.sample_location_and_conditional_flow(x0, x1),
            strict=True,
        ):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert a.n_flows == b.n_flows >= 3


def test_guided_calls_with_flow_size_flow_each_class_to_its_own_targets():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
    fm = SinkhornFlowMatcher(flow_size=128, refresh_every=1, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        y1 = torch.randint(0, 2, (32,), generator=g)
        x1 = centres[y1] + 0.3 * torch.randn(32, 2, generator=g)
        t, xt, ut, _, y = fm.guided_sample_location_and_conditional_flow(
            torch.randn(32, 2, generator=g), x1, y1=y1
        )
    assert fm.n_flows >= 2 and len(fm.pool) >= 128
    ends = fm.pool._xt[: len(fm.pool)] + fm.pool._ut[: len(fm.pool)]
    labels = fm.pool._y[: len(fm.pool)]
    assert bool(((ends[:, 0] > 0) == (labels == 1)).all())  # every end point on its class's side
    with pytest.raises(ValueError, match="y0"):
        fm.guided_sample_location_and_conditional_flow(torch.randn(32, 2), x1, y0=y1, y1=y1)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (2.5, TypeError), (-3, ValueError)])
def test_bad_flow_size_is_refused_naming_it(bad, exc):
    with pytest.raises(exc, match="flow_size"):
        SinkhornFlowMatcher(flow_size=bad)


def test_flow_size_without_a_pool_is_refused():
    with pytest.raises(ValueError, match="flow_size needs a pool"):
        SinkhornFlowMatcher(flow_size=512, pool=None)


def test_a_flow_size_below_the_batch_is_refused_at_the_call():
    fm = SinkhornFlowMatcher(flow_size=64)
    with pytest.raises(ValueError, match="flow_size=64 is smaller than this call's batch of 256"):
        fm.sample_location_and_conditional_flow(torch.randn(256, 2), torch.randn(256, 2))


# ---------------------------------------------------------------------------------------------- coupling
def test_plan_rows_follow_pots_entropic_plan():
    # The row conditionals pi(j | i) of POT's log-domain Sinkhorn plan at reg = eps, cost ½‖x − y‖², against
    # the frequencies of many partner draws from our potentials.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64) + 0.5
    blur = 0.6
    sol = SinkhornOptions(blur=blur, relative_blur=False, tol=1e-10, max_iter=100000).solve(x, y, blur=blur)
    cost = 0.5 * torch.cdist(x, y).square()
    plan = ot.sinkhorn(
        ot.unif(6), ot.unif(5), cost.numpy(), reg=blur**2, method="sinkhorn_log", stopThr=1e-12
    )
    rows = plan / plan.sum(1, keepdims=True)
    draws = 20000
    picks = sample_plan_rows(x.repeat(draws, 1), y, sol.g_xy, sol.eps, torch.Generator().manual_seed(1))
    freq = torch.zeros(6, 5, dtype=torch.float64)
    freq.index_put_(
        (torch.arange(6).repeat(draws), picks), torch.ones(6 * draws, dtype=torch.float64), accumulate=True
    )
    freq /= draws
    # binomial standard error at 20000 draws is at most 0.0036: 5 of those
    assert np.abs(freq.numpy() - rows).max() < 0.018, (freq.numpy(), rows)


def test_coupling_matcher_conforms_to_torchcfm_and_pairs_by_the_plan():
    g = torch.Generator().manual_seed(0)
    x0, x1 = sample_8gaussians(256), sample_moons(256)
    fm = SinkhornCouplingMatcher(generator=g)
    t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
    assert t.shape == (256,) and xt.shape == ut.shape == (256, 2) and t.dtype == xt.dtype == torch.float32
    starts = fm.pool._xt[:256]
    ends = starts + fm.pool._ut[:256]
    # every end point is one of the targets, and the pairs are much cheaper than independent ones
    assert float(torch.cdist(ends.double(), x1.double()).min(1).values.max()) < 1e-5
    paired = 0.5 * (ends - starts).square().sum(1).mean()
    independent = 0.5 * torch.cdist(x0, x1).square().mean()
    exact = ot.emd2(ot.unif(256), ot.unif(256), (0.5 * torch.cdist(x0, x1).square()).double().numpy())
    assert float(paired) < 0.5 * float(independent)
    assert math.isclose(float(paired), exact, rel_tol=0.25), (float(paired), exact)
