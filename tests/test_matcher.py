"""SinkhornFlowMatcher: torchcfm conformance, paths and clock, pool serving, defaults, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import fixed_point_velocity, rel_err
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
from torchcfm.models import MLP
from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
from torchdyn.core import NeuralODE

import torchcfm_nsgf.matcher as matcher_module
import torchcfm_nsgf.serving as serving
from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions, TrajectoryPool


def _moons(n: int) -> torch.Tensor:
    y = sample_moons(n)
    return (y - y.mean(0)) / 3


def _opts(**kw) -> SinkhornOptions:
    args = dict(blur=0.3, relative_blur=False, scaling=0.8)
    args.update(kw)
    return SinkhornOptions(**args)


def _matcher(**kw) -> SinkhornFlowMatcher:
    args = dict(
        flow_steps=4, step_size=0.5, sinkhorn=_opts(), pool=None, generator=torch.Generator().manual_seed(0)
    )
    args.update(kw)
    return SinkhornFlowMatcher(**args)


def _rows_in(rows: torch.Tensor, pool: torch.Tensor, atol: float) -> bool:
    """Every row of ``rows`` (k, d) is within ``atol`` of some row of ``pool`` (n, d)."""
    dist = torch.cdist(rows.double(), pool.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return bool((dist.min(1).values <= atol).all())


def _ks_uniform(t: torch.Tensor) -> float:
    """Kolmogorov-Smirnov statistic of ``t`` against U[0, 1]."""
    s = t.double().sort().values
    n = len(s)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - s, s - (grid - 1 / n)).max())


# ---------------------------------------------------------------------------------------------- torchcfm contract
@pytest.mark.parametrize("path", ["straight", "polyline", "grid"])
def test_is_a_torchcfm_matcher_with_same_shapes_and_dtypes(path):
    fm = _matcher(path=path)
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
        t = out[0]
        assert bool(((t >= 0) & (t <= 1)).all())
    # Mixed dtypes promote as torchcfm's do: t in x0's dtype, xt and ut promoted.
    x0, x1 = torch.randn(8, 2), torch.randn(8, 2, dtype=torch.float64)
    ref = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(x0, x1)
    out = fm.sample_location_and_conditional_flow(x0, x1)
    assert [o.dtype for o in out] == [r.dtype for r in ref] == [torch.float32, torch.float64, torch.float64]


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_canonical_torchcfm_loop_runs_with_only_the_matcher_swapped(sigma):
    # torchcfm's scripts write Matcher(sigma=sigma); the rest of the loop is theirs.
    torch.manual_seed(0)
    model = MLP(dim=2, time_varying=True, w=32)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    FM = SinkhornFlowMatcher(sigma=sigma)
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
    out = FM.sample(torch_wrapper(model), sample_8gaussians(64))
    assert out.total_nfe == FM.flow_steps and out.samples.shape == (64, 2)


def test_default_matcher_in_a_20_step_loop_needs_few_solves():
    # SinkhornFlowMatcher() in torchcfm's loop: the first call builds a pool, later calls are served from
    # it, refreshed every refresh_every calls; 2D batch 256 and image batch 128 alike.
    for shape in [(256, 2), (128, 1, 8, 8)]:
        FM = SinkhornFlowMatcher()
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            x0 = torch.randn(shape, generator=g)
            x1 = 2 + 0.5 * torch.randn(shape, generator=g)
            FM.sample_location_and_conditional_flow(x0, x1)
        refreshes = math.ceil(20 / FM.refresh_every)
        assert FM.n_calls == 20
        assert FM.n_flows == refreshes and FM.n_solves == refreshes * FM.flow_steps <= 10
        assert len(FM.pool) == refreshes * shape[0]  # straight path: one segment per particle


def test_relative_blur_follows_the_target_scale():
    # blur is 0.1 of the target's RMS radius, measured on the first x1; the whole matcher is then
    # equivariant under scaling the data: targets of c*data are c times the targets of data.
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=torch.float64), _moons(64).double()
    radius = float((x1 - x1.mean(0)).norm(dim=1).square().mean().sqrt())
    outs = []
    for c in (1.0, 10.0):
        fm = SinkhornFlowMatcher(pool=None)  # Sinkhorn's iterates and its stopping rule are scale-free
        fm.generator = torch.Generator().manual_seed(5)
        outs.append(fm.sample_location_and_conditional_flow(c * x0, c * x1))
        assert fm.blur == pytest.approx(0.1 * c * radius, rel=1e-9)
    t1, xt1, ut1 = outs[0]
    t10, xt10, ut10 = outs[1]
    torch.testing.assert_close(t10, t1)
    torch.testing.assert_close(xt10, 10 * xt1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ut10, 10 * ut1, rtol=1e-6, atol=1e-6)


def _sparse_images(n: int, g: torch.Generator) -> torch.Tensor:
    """Image-like samples in {-1, 1}: thresholded blobs on a dark 28x28 background (about 3 % lit)."""
    smooth = torch.nn.functional.avg_pool2d(torch.randn(n, 1, 32, 32, generator=g), 5, stride=1)
    return torch.where(smooth > 0.35, 1.0, -1.0)


def test_default_blur_is_smaller_on_images_so_end_points_are_samples_not_blends():
    # SinkhornFlowMatcher() keeps 0.1 of the target's scale in 2D and takes HIGH_DIM_BLUR (0.05) on images.
    # At 0.1, flows of image-like samples often end between samples (a blend of two images, far from
    # every one of them); at the default almost every end point is one of the target samples.
    g = torch.Generator().manual_seed(0)
    x2 = _moons(64)
    fm2 = SinkhornFlowMatcher(pool=None)
    fm2.simulate(torch.randn(64, 2, generator=g), x2)
    assert fm2.blur == pytest.approx(0.1 * SinkhornOptions.scale_of(x2)) and fm2.sinkhorn.blur == 0.1
    assert fm2.flow_blur(x2) == fm2.blur  # what the next flow towards x2 would use
    far = {}
    for name, options in [("default", None), ("0.1", SinkhornOptions(blur=0.1))]:
        g = torch.Generator().manual_seed(1)
        n_far = 0
        for _ in range(3):
            x1 = _sparse_images(64, g)
            fm = SinkhornFlowMatcher(pool=None, sinkhorn=options)
            x_end = fm.simulate(torch.randn(x1.shape, generator=g), x1).xs[-1]
            n_far += int((torch.cdist(x_end.flatten(1), x1.flatten(1)).min(1).values > 1.0).sum())
        far[name] = n_far
        expected = matcher_module.HIGH_DIM_BLUR if options is None else 0.1
        assert fm.blur == pytest.approx(expected * SinkhornOptions.scale_of(x1))
    assert far["default"] <= 4, far  # of 192 end points (2 here)
    assert far["0.1"] >= 5 * max(far["default"], 2), far  # the reason for the smaller blur (28 here)


def test_cli_flags_at_their_defaults_keep_the_matchers_blur_rule():
    # The 2D scripts' matcher flags: untouched Sinkhorn flags leave the blur to the matcher's rule (0.05 on
    # many features); a changed flag is used as given.
    import argparse

    from torchcfm_nsgf._cli import add_matcher_flags, matcher_from_args

    parser = argparse.ArgumentParser()
    add_matcher_flags(parser)
    x1 = torch.randn(16, 32)
    for argv, expected in (([], matcher_module.HIGH_DIM_BLUR), (["--blur", "0.2"], 0.2)):
        fm = matcher_from_args(parser.parse_args(argv), pool=None)
        fm.simulate(torch.randn(16, 32), x1)
        assert fm.blur == pytest.approx(expected * SinkhornOptions.scale_of(x1))


# ---------------------------------------------------------------------------------------------- paths and clock
def test_simulated_steps_are_the_sinkhorn_velocity_with_the_step_schedule():
    etas = [1.0, 0.5, 0.25]
    fm = _matcher(flow_steps=3, step_size=etas, sinkhorn=_opts(tol=1e-7, max_iter=20000))
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(40, 2, generator=g, dtype=torch.float64), _moons(50).double()
    traj = fm.simulate(x0, x1)
    assert fm.flow_time == pytest.approx(1.75)
    for k, eta in enumerate(etas):
        # independent cold float64 fixed point at every step
        ref = fixed_point_velocity(traj.xs[k], x1, 0.3)
        assert rel_err(traj.us[k], 3 * eta * ref) <= 1e-4
        torch.testing.assert_close(traj.xs[k + 1], traj.xs[k] + eta * ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["polyline", "grid", "straight"])
@pytest.mark.parametrize("factor", [1, 2])
def test_euler_on_the_served_velocity_reproduces_the_flow(path, factor):
    # Integrate dx/dt = ut with T and 2T Euler steps, reading the path at each step's time.
    fm = _matcher(flow_steps=4, path=path, sinkhorn=_opts(tol=1e-6))
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(40, 2, generator=g, dtype=torch.float64), _moons(50).double()
    traj = fm.simulate(x0, x1)
    n = factor * fm.flow_steps
    x = x0.clone()
    for j in range(n):
        t = torch.full((40,), j / n, dtype=torch.float64)
        tj, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
        torch.testing.assert_close(xt, x, rtol=0, atol=1e-9)
        torch.testing.assert_close(tj, t)
        x = x + ut / n
    torch.testing.assert_close(x, traj.xs[-1], rtol=0, atol=1e-9)


def test_off_grid_times_follow_the_euler_polyline():
    fm = _matcher(path="polyline")
    x0, x1 = torch.randn(3, 2, dtype=torch.float64), _moons(20).double()
    traj = fm.simulate(x0, x1)
    t = torch.tensor([0.125, 0.6, 1.0], dtype=torch.float64)
    _, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
    # t=0.125: halfway through step 0; t=0.6: 40% into step 2; t=1: the end point with the last velocity.
    torch.testing.assert_close(xt[0], 0.5 * (traj.xs[0, 0] + traj.xs[1, 0]))
    torch.testing.assert_close(xt[1], 0.6 * traj.xs[2, 1] + 0.4 * traj.xs[3, 1])
    torch.testing.assert_close(xt[2], traj.xs[4, 2])
    torch.testing.assert_close(ut[2], traj.us[3, 2])


def _served_on_path(fm, traj, t, xt, ut, x0):
    """Check served items lie on the trajectory's paths, with the segment's velocity (the pool stores t in
    float32, hence the tolerance)."""
    T = fm.flow_steps
    if fm.path == "straight":
        assert _rows_in(xt - t[:, None] * ut, x0, 1e-9)  # start point is a source particle ...
        assert _rows_in(xt + (1 - t)[:, None] * ut, traj.xs[T], 1e-9)  # ... and the end point its image
        return
    k = (t * T + 1e-9).floor().long().clamp(0, T - 1)
    if fm.path == "grid":
        torch.testing.assert_close(t, k.double() / T)
    for step in range(T):
        sel = k == step
        if sel.any():
            start = xt[sel] - (t[sel] - step / T)[:, None] * ut[sel]
            assert _rows_in(start, traj.xs[step], 1e-6)
            pairs = torch.cat([start, ut[sel]], 1)
            assert _rows_in(pairs, torch.cat([traj.xs[step], traj.us[step]], 1), 1e-6)


@pytest.mark.parametrize("path", ["straight", "polyline", "grid"])
def test_pool_and_direct_serving_give_points_on_the_path_with_uniform_times(path):
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(32, 2, generator=g, dtype=torch.float64), _moons(32).double()
    opts = _opts(blur=0.5)
    direct = _matcher(path=path, flow_steps=3, step_size=1.0, sinkhorn=opts)
    pooled = _matcher(
        path=path,
        flow_steps=3,
        step_size=1.0,
        sinkhorn=opts,
        pool=TrajectoryPool(10_000),
        refresh_every=10**6,
    )
    traj = direct.simulate(x0, x1)
    times = {}
    for name, fm in (("direct", direct), ("pool", pooled)):
        ts = []
        for _ in range(16):
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            _served_on_path(fm, traj, t, xt, ut, x0)
            ts.append(t)
        times[name] = torch.cat(ts)
    assert pooled.n_flows == 1 and direct.n_flows == 17
    for t in times.values():
        if path == "grid":  # each of the T grid times about equally often
            counts = torch.bincount((t * 3).round().long(), minlength=3).double() / len(t)
            assert bool(((counts - 1 / 3).abs() < 0.08).all()), counts
        else:  # uniform on [0, 1]: 512 draws, KS critical value at level 1e-3 about 0.086
            assert _ks_uniform(t) < 0.086


def test_sigma_adds_gaussian_noise_around_the_path_and_keeps_the_velocity():
    sigma = 0.1
    fm = _matcher(sigma=sigma, path="straight")
    x0, x1 = torch.randn(32, 2, dtype=torch.float64), _moons(32).double()
    traj = fm.simulate(x0, x1)
    t, xt, ut, eps = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    _served_on_path(fm, traj, t, xt - sigma * eps, ut, x0)
    assert float(eps.std()) == pytest.approx(1.0, abs=0.2)
    # torchcfm's constant-sigma values (a float there), as tensors shaped like t here
    ref = ConditionalFlowMatcher(sigma=sigma)
    torch.testing.assert_close(fm.compute_sigma_t(t), torch.full_like(t, ref.compute_sigma_t(t)))
    torch.testing.assert_close(fm.compute_lambda(t), torch.full_like(t, ref.compute_lambda(t)))
    assert fm.compute_lambda(t)[:, None].shape == (32, 1)  # as torchcfm's SF2M loop indexes it


@pytest.mark.parametrize("path", ["straight", "polyline"])
def test_inherited_path_methods_describe_the_nsgf_path(path):
    fm = _matcher(path=path)
    x0, x1 = torch.randn(16, 2, dtype=torch.float64), _moons(16).double()
    t = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t)
    torch.testing.assert_close(fm.compute_mu_t(x0, x1, t), xt)
    torch.testing.assert_close(fm.compute_conditional_flow(x0, x1, t, xt), ut)
    eps = torch.randn_like(x0)
    torch.testing.assert_close(fm.sample_xt(x0, x1, t, eps), xt)  # sigma = 0
    # and not torchcfm's straight line between the caller's pairs
    assert float((xt - ((1 - t)[:, None] * x0 + t[:, None] * x1)).abs().max()) > 0.1


def test_flow_decreases_sinkhorn_divergence():
    geomloss = pytest.importorskip("geomloss")
    fm = _matcher(flow_steps=8, step_size=0.4, sinkhorn=_opts(blur=0.5))
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(64, 2, generator=g, dtype=torch.float64) + 2, _moons(64).double()
    traj = fm.simulate(x0, x1)
    s_eps = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.95, debias=True, backend="tensorized")
    values = torch.tensor([float(s_eps(x, x1)) for x in traj.xs])
    assert bool((values.diff() < 0).all()), values
    assert values[-1] < 0.05 * values[0]


# ---------------------------------------------------------------------------------------------- pool, warnings
@pytest.mark.parametrize("path,per_flow", [("straight", 20), ("polyline", 100)])
def test_pool_serves_batches_and_refreshes(path, per_flow):
    pool = TrajectoryPool(1000, generator=torch.Generator().manual_seed(0))
    fm = _matcher(flow_steps=5, path=path, pool=pool, refresh_every=3)
    x0, x1 = torch.randn(20, 2), _moons(20)
    for call in range(7):
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        assert t.shape == (20,) and xt.shape == ut.shape == (20, 2)
        assert len(pool) == per_flow * (call // 3 + 1)  # refreshed at calls 0, 3, 6
    assert fm.n_calls == 7 and fm.n_flows == 3 and fm.n_solves == 15


def test_slow_configuration_warns_once(monkeypatch):
    monkeypatch.setattr(serving, "SLOW_CALL_S", 0.0)
    fm = _matcher(flow_steps=2)
    x0, x1 = torch.randn(16, 2), _moons(16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            fm.sample_location_and_conditional_flow(x0, x1)
    slow = [w for w in seen if "per call" in str(w.message)]
    assert len(slow) == 1 and "pool" in str(slow[0].message)


def test_state_dict_round_trip_resumes_pool_schedule_and_blur():
    def build():
        return SinkhornFlowMatcher(flow_steps=3, refresh_every=2, generator=torch.Generator().manual_seed(0))

    x0, x1 = torch.randn(10, 2), _moons(10)
    a = build()
    a.sample_location_and_conditional_flow(x0, x1)
    state = a.state_dict()
    b = build()
    b.load_state_dict(state)
    assert b.blur == a.blur
    for _ in range(3):
        out_a = a.sample_location_and_conditional_flow(x0, 1.5 * x1)
        out_b = b.sample_location_and_conditional_flow(x0, 1.5 * x1)
        for u, v in zip(out_a, out_b, strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert len(a.pool) == len(b.pool) == 20 and a.n_flows == b.n_flows == 2  # refreshed at calls 0 and 2
    # the refresh at call 2 flowed towards 1.5 * x1: its blur is resolved from those targets
    assert a.blur == b.blur == pytest.approx(0.1 * SinkhornOptions.scale_of(1.5 * x1))
    assert a.state_dict()["targets"]["scale"] == pytest.approx(SinkhornOptions.scale_of(1.5 * x1))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,exc,word",
    [
        (dict(flow_steps=0), ValueError, "flow_steps"),
        (dict(flow_steps=2.5), TypeError, "flow_steps"),
        (dict(step_size=0.0), ValueError, "step_size"),
        (dict(step_size=[1.0, 0.5]), ValueError, "one value per flow step"),
        (dict(step_size=[1.0, -1.0, 1.0, 1.0]), ValueError, "step_size"),
        (dict(sigma=-0.1), ValueError, "sigma"),
        (dict(path="curve"), ValueError, "path"),
        (dict(sinkhorn=dict(blur=0.1)), TypeError, "sinkhorn"),
        (dict(pool=object()), TypeError, "pool"),
        (dict(refresh_every=0), ValueError, "refresh_every"),
    ],
)
def test_bad_construction(kw, exc, word):
    with pytest.raises(exc, match=word):
        _matcher(**kw)


@pytest.mark.parametrize(
    "kw,exc,word",
    [
        (dict(blur=0.0), ValueError, "blur"),
        (dict(scaling=1.5), ValueError, "scaling"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(max_iter=10.5), TypeError, "max_iter"),
        (dict(omega=2.0), ValueError, "omega"),
        (dict(relative_blur=1), TypeError, "relative_blur"),
    ],
)
def test_bad_sinkhorn_options(kw, exc, word):
    with pytest.raises(exc, match=word):
        SinkhornOptions(**kw)


def test_bad_calls():
    fm = _matcher(flow_steps=3)
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="feature shape"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 3))
    with pytest.raises(ValueError, match="x1 contains NaN"):
        fm.sample_location_and_conditional_flow(x0, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(4,\)"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 2), t=torch.rand(3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 2), t=torch.tensor([0.0, 0.5, 1.5, 0.2]))
    with pytest.raises(ValueError, match="fill_pool needs a pool"):
        fm.fill_pool(x0, torch.randn(4, 2))
    with pytest.raises(ValueError, match="zero spread"):
        SinkhornFlowMatcher().sample_location_and_conditional_flow(x0, torch.ones(4, 2))
