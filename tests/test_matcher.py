"""SinkhornFlowMatcher: torchcfm conformance, exactness of the clock, training, bad input."""

from __future__ import annotations

import ot
import pytest
import torch
from reference import fixed_point_velocity, rel_err
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from torchcfm.models import MLP
from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
from torchdyn.core import NeuralODE

from torchcfm_nsgf import SinkhornFlowMatcher, TrajectoryPool, euler_sample


def _moons(n: int) -> torch.Tensor:
    y = sample_moons(n)
    return (y - y.mean(0)) / 3


def _w2(a: torch.Tensor, b: torch.Tensor) -> float:
    cost = ot.dist(a.detach().double(), b.detach().double())
    return float(ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost.numpy())) ** 0.5


def _matcher(**kw) -> SinkhornFlowMatcher:
    args = dict(n_steps=10, step_size=0.2, blur=0.3, scaling=0.8, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return SinkhornFlowMatcher(**args)


def test_is_a_torchcfm_matcher_with_same_shapes():
    fm = _matcher()
    assert isinstance(fm, ConditionalFlowMatcher)
    for shape in [(16, 2), (6, 1, 4, 4)]:
        x0, x1 = torch.randn(shape), torch.randn(shape)
        ref = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(
            x0, x1, return_noise=True
        )
        out = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        assert len(out) == 4
        for a, b in zip(out, ref, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        t, xt, ut = fm.sample_location_and_conditional_flow(x0.double(), x1.double())
        assert t.dtype == xt.dtype == ut.dtype == torch.float64
        assert bool(((t >= 0) & (t <= 1)).all())


def test_canonical_torchcfm_loop_runs_with_only_the_matcher_swapped():
    torch.manual_seed(0)
    model = MLP(dim=2, time_varying=True, w=32)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    FM = _matcher(n_steps=5)
    for _ in range(3):
        optimizer.zero_grad()
        x0, x1 = sample_8gaussians(32), sample_moons(32)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()
    node = NeuralODE(torch_wrapper(model), solver="euler", sensitivity="adjoint")
    with torch.no_grad():
        traj = node.trajectory(sample_8gaussians(64), t_span=torch.linspace(0, 1, 6))
    assert traj.shape == (6, 64, 2) and bool(torch.isfinite(traj).all())


def test_euler_with_returned_ut_reproduces_the_flow():
    fm = _matcher(n_steps=8, tol=1e-6)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(40, 2, generator=g, dtype=torch.float64), _moons(50).double()
    traj = fm.simulate(x0, x1)
    T = fm.n_steps
    # Integrate dx/dt = ut with T Euler steps, querying the matcher at the grid times.
    x = x0.clone()
    for k in range(T):
        t = torch.full((40,), k / T, dtype=torch.float64)
        tk, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
        torch.testing.assert_close(xt, x, rtol=0, atol=1e-9)
        torch.testing.assert_close(tk, t)
        x = x + ut / T
    torch.testing.assert_close(x, traj.xs[-1], rtol=0, atol=1e-9)
    # Each step's velocity is the Sinkhorn velocity at that step (independent cold float64 reference).
    for k in (0, T // 2, T - 1):
        ref = fixed_point_velocity(traj.xs[k], x1, 0.3) * (T * fm.step_size)
        assert rel_err(traj.us[k], ref) <= 1e-4


def test_off_grid_times_follow_the_euler_polyline():
    fm = _matcher(n_steps=4)
    x0, x1 = torch.randn(3, 2, dtype=torch.float64), _moons(20).double()
    traj = fm.simulate(x0, x1)
    t = torch.tensor([0.125, 0.6, 1.0], dtype=torch.float64)
    _, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
    # t=0.125: halfway through step 0; t=0.6: 40% into step 2; t=1: the end point with the last velocity.
    torch.testing.assert_close(xt[0], 0.5 * (traj.xs[0, 0] + traj.xs[1, 0]))
    torch.testing.assert_close(xt[1], 0.6 * traj.xs[2, 1] + 0.4 * traj.xs[3, 1])
    torch.testing.assert_close(xt[2], traj.xs[4, 2])
    torch.testing.assert_close(ut[2], traj.us[3, 2])


def test_flow_decreases_sinkhorn_divergence():
    geomloss = pytest.importorskip("geomloss")
    fm = _matcher(n_steps=8, step_size=0.4, blur=0.5)
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=torch.float64) + 2, _moons(64).double()
    traj = fm.simulate(x0, x1)
    s_eps = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.95, debias=True, backend="tensorized")
    values = torch.tensor([float(s_eps(x, x1)) for x in traj.xs])
    assert bool((values.diff() < 0).all()), values
    assert values[-1] < 0.05 * values[0]


def test_pool_serves_batches_and_refreshes():
    pool = TrajectoryPool(1000, generator=torch.Generator().manual_seed(0))
    fm = _matcher(n_steps=5, pool=pool, refresh_every=3)
    x0, x1 = torch.randn(20, 2), _moons(20)
    for call in range(7):
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        assert t.shape == (20,) and xt.shape == ut.shape == (20, 2)
        # refreshed at calls 0, 3, 6: 5 steps x 20 particles per flow
        assert len(pool) == 100 * (call // 3 + 1)
    with pytest.raises(ValueError, match="pool"):
        fm.sample_location_and_conditional_flow(x0, x1, t=torch.zeros(20))


def test_short_training_beats_untrained_field():
    torch.manual_seed(0)
    pool = TrajectoryPool(20_000, generator=torch.Generator().manual_seed(0))
    fm = SinkhornFlowMatcher(n_steps=10, step_size=0.15, blur=0.3, scaling=0.8, pool=pool, refresh_every=50)
    model = MLP(dim=2, time_varying=True, w=64)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    field = torch_wrapper(model)
    x_test0 = torch.randn(500, 2)
    target = _moons(500)
    untrained = _w2(euler_sample(field, x_test0, n_steps=10).samples, target)
    for _ in range(300):
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn(128, 2), _moons(128))
        loss = ((model(torch.cat([xt, t[:, None]], -1)) - ut) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _w2(euler_sample(field, x_test0, n_steps=10).samples, target)
    start = _w2(x_test0, target)
    assert trained < 0.5 * untrained and trained < 0.5 * start, (start, untrained, trained)


@pytest.mark.parametrize(
    "kw,exc,word",
    [
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(n_steps=2.5), TypeError, "n_steps"),
        (dict(step_size=0.0), ValueError, "step_size"),
        (dict(step_size=-0.1), ValueError, "step_size"),
        (dict(blur=0.0), ValueError, "blur"),
        (dict(scaling=1.5), ValueError, "scaling"),
        (dict(pool=object()), TypeError, "pool"),
    ],
)
def test_bad_construction(kw, exc, word):
    with pytest.raises(exc, match=word):
        _matcher(**kw)


def test_bad_calls():
    fm = _matcher(n_steps=3)
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="feature shape"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 3))
    with pytest.raises(ValueError, match="x1 contains NaN"):
        fm.sample_location_and_conditional_flow(x0, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(4,\)"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 2), t=torch.rand(3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 2), t=torch.tensor([0.0, 0.5, 1.5, 0.2]))
    with pytest.raises(ValueError, match="capacity"):
        TrajectoryPool(0)
    with pytest.raises(ValueError, match="fill_pool needs a pool"):
        fm.fill_pool(x0, torch.randn(4, 2))


def test_state_dict_round_trip_resumes_pool_schedule():
    def build():
        pool = TrajectoryPool(500, generator=torch.Generator().manual_seed(0))
        return _matcher(n_steps=3, pool=pool, refresh_every=2)

    x0, x1 = torch.randn(10, 2), _moons(10)
    a = build()
    a.sample_location_and_conditional_flow(x0, x1)
    state = a.state_dict()
    b = build()
    b.load_state_dict(state)
    for _ in range(3):
        out_a = a.sample_location_and_conditional_flow(x0, x1)
        out_b = b.sample_location_and_conditional_flow(x0, x1)
        for u, v in zip(out_a, out_b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert len(a.pool) == len(b.pool) == 60
