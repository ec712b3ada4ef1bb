"""NSGF++: time predictor, phase-2 change of variable against closed forms and plain samplers, NFE against
independent counters, both phase-2 variants (paper, ot) on 2D and on MNIST-format images, phase-2 pairs from
phase-1 end points (against POT's exact OT cost), one training interface for the 2D driver and the image
method, checkpoint round trip, bad input."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

from torchcfm_nsgf import NSGFPlusPlusOptions, SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf.networks import TimePredictorCNN, TimePredictorMLP, VelocityMLP
from torchcfm_nsgf.nsgfpp import (
    MAX_PHASE1_STEPS,
    PHASE2_VARIANTS,
    PREDICTOR_VARIANTS,
    NSGFPlusPlus,
    NSGFPlusPlusObjective,
    nsgfpp_sample,
    predict_time,
    straight_flow_from,
)
from torchcfm_nsgf.sampling import SampleResult, odeint_sample
from torchcfm_nsgf.sinkhorn import HIGH_DIM_BLUR

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


class Counted(nn.Module):
    """Counts the calls of ``net`` with its own counter (independent of the code under test)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args)


class Linear(nn.Module):
    """u(t, x) = x + 2t, one time per sample or a shared one (closed form: :func:`linear_solution`)."""

    def forward(self, t, x, *args, **kwargs):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return x + 2 * t


def linear_solution(x_tau, tau):
    """x(1) of dx/dt = x + 2t from x(tau) = x_tau."""
    return linear_solution_to(x_tau, tau, torch.ones_like(tau))


def linear_solution_to(x_tau, tau, t):
    # dx/dt = x + 2t  ->  x(t) = C e^t - 2t - 2 with C = (x_tau + 2 tau + 2) e^{-tau}
    tau, t = (v.reshape(-1, *([1] * (x_tau.dim() - 1))) for v in (tau, t))
    return (x_tau + 2 * tau + 2) * torch.exp(t - tau) - 2 * t - 2


class Constant(nn.Module):
    def __init__(self, value, shape_fn=lambda x: (x.shape[0],)):
        super().__init__()
        self.value = value
        self.shape_fn = shape_fn

    def forward(self, x):
        return torch.full(self.shape_fn(x), self.value, dtype=x.dtype)


class Zero(nn.Module):
    def forward(self, t, x, *args, **kwargs):
        return torch.zeros_like(x)


# ---------------------------------------------------------------------------------------------- predictor
def test_predictor_recovers_time_on_held_out_interpolations():
    # source N(0, I), target N((6, 6), 0.2^2 I): t is identifiable from x_t up to ~1/(6 sqrt 2)
    torch.manual_seed(0)
    src = _randn(4096, 2, seed=1, dtype=torch.float32)
    tgt = 6.0 + 0.2 * _randn(4096, 2, seed=2, dtype=torch.float32)
    model = NSGFPlusPlus(
        VelocityMLP(2),
        TimePredictorMLP(2),
        VelocityMLP(2),
        phase2="paper",
        flow_steps=1,
        refresh_every=1000,
        lr=3e-3,
        generator=_gen(3),
    )
    model.fit(src, tgt, 400, batch_size=256)
    # held-out straight interpolations, built here by hand
    x0 = _randn(2000, 2, seed=11, dtype=torch.float32)
    x1 = 6.0 + 0.2 * _randn(2000, 2, seed=12, dtype=torch.float32)
    t = torch.rand(2000, generator=_gen(13))
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    with torch.no_grad():
        tau = model.nets["predictor"](xt)
    assert tau.shape == (2000,)
    assert bool(((tau >= 0) & (tau <= 1)).all())
    mae = float((tau - t).abs().mean())
    assert mae < 0.1, mae


def test_shipped_predictors_output_in_unit_interval():
    mlp = TimePredictorMLP(3)
    with torch.no_grad():
        tau = mlp(100.0 * torch.randn(50, 3, generator=_gen()))
    assert tau.shape == (50,) and bool(((tau >= 0) & (tau <= 1)).all())
    cnn = TimePredictorCNN(1, width=8)
    with torch.no_grad():
        tau = cnn(torch.randn(4, 1, 12, 12, generator=_gen()))
    assert tau.shape == (4,) and bool(((tau >= 0) & (tau <= 1)).all())
    with pytest.raises(ValueError, match="x must have shape"):
        cnn(torch.randn(4, 3, 12, 12))


def test_user_predictor_out_of_range_is_clamped_with_warning():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    raw = nn.Identity()  # tau = x: -3 .. 3, five samples outside [0, 1]
    with pytest.warns(RuntimeWarning, match="5 of 7 samples"):
        tau = predict_time(raw, x)
    assert torch.equal(tau, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tau = predict_time(raw, torch.tensor([[0.25], [0.5]], dtype=torch.float64))
    assert tau.tolist() == [0.25, 0.5]
    # through the sampler: tau always in [0, 1], and out-of-range samples start their straight flow there
    x0 = _randn(5, 1)
    with pytest.warns(RuntimeWarning, match="clamped"):
        out = nsgfpp_sample(
            Zero(), Constant(-2.0), Linear(), x0, flow_steps=2, solver="rk4", straight_steps=50
        )
    tau = out.extras["tau"]
    assert bool((tau == 0).all())
    torch.testing.assert_close(out.samples, linear_solution(x0, tau), atol=1e-6, rtol=0)


def test_predictor_bad_output_rejected():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"predictor\(x\) must return shape \(4,\)"):
        predict_time(Constant(0.5, lambda x: (x.shape[0], 2)), x)
    with pytest.raises(ValueError, match="NaN"):
        predict_time(Constant(float("nan")), x)
    with pytest.raises(TypeError, match="predictor"):
        predict_time("not a net", x)


# ---------------------------------------------------------------------------------------------- phase 2
@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5"])
def test_phase2_from_tau_one_is_identity(solver):
    x = _randn(16, 3)
    steps = None if solver == "dopri5" else 4
    out = straight_flow_from(Linear(), x, torch.ones(16, dtype=x.dtype), solver=solver, n_steps=steps)
    assert torch.equal(out.samples, x)


def test_phase2_from_tau_zero_equals_plain_straight_flow_sampling():
    torch.manual_seed(0)
    net = VelocityMLP(2).double()
    x = _randn(64, 2)
    zeros = torch.zeros(64, dtype=x.dtype)
    for solver, kw in (("euler", {"n_steps": 7}), ("rk4", {"n_steps": 5}), ("dopri5", {})):
        out = straight_flow_from(net, x, zeros, solver=solver, **kw)
        ref = odeint_sample(net, x, solver=solver, **kw)
        assert isinstance(out, SampleResult)
        torch.testing.assert_close(out.samples, ref.samples, atol=1e-12, rtol=1e-12)
        assert out.nfe == {"straight": ref.nfe["field"]}
    assert ref.total_nfe > 0 and out.total_nfe == ref.total_nfe


@pytest.mark.parametrize(
    "solver,kw,tol", [("rk4", {"n_steps": 40}, 1e-6), ("dopri5", {"atol": 1e-10, "rtol": 1e-10}, 1e-7)]
)
def test_phase2_per_sample_tau_matches_closed_form(solver, kw, tol):
    x = _randn(32, 2)
    tau = torch.rand(32, generator=_gen(5), dtype=torch.float64)
    out = straight_flow_from(Linear(), x, tau, solver=solver, return_trajectory=True, **kw)
    torch.testing.assert_close(out.samples, linear_solution(x, tau), atol=tol, rtol=0)
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.samples)
    assert float(out.times[0]) == 0.0 and float(out.times[-1]) == 1.0


def test_two_phase_sampler_against_closed_form_and_euler():
    # phase 1: dx/dt = -x for T Euler steps of 1/T -> x0 (1 - 1/T)^T; tau = 0.5; phase 2: closed form
    class Decay(nn.Module):
        def forward(self, t, x, *args, **kwargs):
            return -x

    x0 = _randn(10, 2)
    out = nsgfpp_sample(
        Decay(),
        Constant(0.5),
        Linear(),
        x0,
        flow_steps=4,
        solver="dopri5",
        atol=1e-10,
        rtol=1e-10,
        return_trajectory=True,
    )
    steps = torch.arange(5, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out.trajectory[:5], x0 * (1 - 1 / 4) ** steps, atol=1e-14, rtol=0)
    x_T = out.trajectory[4]
    tau = out.extras["tau"]
    torch.testing.assert_close(out.samples, linear_solution(x_T, tau), atol=1e-7, rtol=0)
    clock = out.extras["phase2_clock"]
    assert out.trajectory.shape[0] == 4 + clock.shape[0] and out.times is None
    # phase-2 states sit on the closed form at their own times tau + s (1 - tau)
    for s, state in zip(clock.tolist(), out.trajectory[4:], strict=True):
        t = tau + s * (1 - tau)
        torch.testing.assert_close(state, linear_solution_to(x_T, tau, t), atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("solver,steps", [("euler", 6), ("rk4", 3), ("dopri5", None)])
def test_nfe_breakdown_equals_independent_counters(solver, steps):
    torch.manual_seed(0)
    nsgf, pred, straight = Counted(VelocityMLP(2)), Counted(TimePredictorMLP(2)), Counted(VelocityMLP(2))
    out = nsgfpp_sample(
        nsgf,
        pred,
        straight,
        torch.randn(20, 2),
        flow_steps=3,
        solver=solver,
        straight_steps=steps,
        atol=1e-4,
        rtol=1e-4,
    )
    assert out.nfe == {"nsgf": nsgf.calls, "predictor": pred.calls, "straight": straight.calls}
    assert (nsgf.calls, pred.calls) == (3, 1)
    expected = {"euler": 6, "rk4": 12}.get(solver)
    if expected is not None:
        assert straight.calls == expected
    else:
        assert straight.calls > 0
    assert out.total_nfe == nsgf.calls + pred.calls + straight.calls


def test_without_predictor_phase2_starts_at_zero_and_counts_no_predictor_call():
    class Decay(nn.Module):
        def forward(self, t, x, *args, **kwargs):
            return -x

    x0 = _randn(10, 2)
    nsgf, straight = Counted(Decay()), Counted(Linear())
    out = nsgfpp_sample(nsgf, None, straight, x0, flow_steps=3, solver="rk4", straight_steps=40)
    assert (
        out.nfe
        == {"nsgf": 3, "predictor": 0, "straight": 160}
        == {
            "nsgf": nsgf.calls,
            "predictor": 0,
            "straight": straight.calls,
        }
    )
    assert bool((out.extras["tau"] == 0).all())
    x_T = x0 * (1 - 1 / 3) ** 3  # Euler of dx/dt = -x, then the straight flow over its whole clock [0, 1]
    torch.testing.assert_close(
        out.samples, linear_solution(x_T, torch.zeros(10, dtype=x0.dtype)), atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------------------------------------- variants (2D)
def _small_model(seed: int, phase2: str = "ot", width: int = 32) -> NSGFPlusPlus:
    torch.manual_seed(seed)
    return NSGFPlusPlus(
        VelocityMLP(2, width),
        TimePredictorMLP(2, 32) if phase2 in PREDICTOR_VARIANTS else None,
        VelocityMLP(2, 32),
        phase2=phase2,
        flow_steps=3,
        step_size=0.3,
        sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False, scaling=0.7),
        refresh_every=2,
        generator=_gen(seed),
    )


def _data():
    return _randn(512, 2, seed=20, dtype=torch.float32), 3.0 + 0.3 * _randn(
        512, 2, seed=21, dtype=torch.float32
    )


@pytest.mark.parametrize("phase2", PHASE2_VARIANTS)
def test_each_variant_trains_on_2d_and_its_nfe_equals_network_calls(phase2):
    src, tgt = _data()
    model = _small_model(0, phase2)
    before = {k: [p.detach().clone() for p in net.parameters()] for k, net in model.nets.items()}
    history = model.fit(src, tgt, 4, batch_size=64)
    names = ("nsgf", "predictor", "straight") if phase2 in PREDICTOR_VARIANTS else ("nsgf", "straight")
    assert tuple(model.nets) == names and tuple(history) == names
    assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in history.values())
    assert model.iterations == 4
    for k, net in model.nets.items():  # every network was stepped
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before[k], strict=True)), k
    nets = nn.ModuleDict({k: Counted(v) for k, v in model.nets.items()})
    for solver, steps in (("euler", 4), ("rk4", 2), ("dopri5", None)):
        for net in nets.values():
            net.calls = 0
        out = model.objective.sample(
            nets, torch.randn(50, 2, generator=_gen(9)), solver=solver, straight_steps=steps
        )
        calls = {k: v.calls for k, v in nets.items()}
        assert out.nfe == {
            "nsgf": calls["nsgf"],
            "predictor": calls.get("predictor", 0),
            "straight": calls["straight"],
        }
        assert out.nfe["nsgf"] == 3 and out.nfe["predictor"] == (phase2 in PREDICTOR_VARIANTS)
        assert out.total_nfe == sum(calls.values())
        if steps is not None:
            assert out.nfe["straight"] == steps * {"euler": 1, "rk4": 4}[solver]


@pytest.mark.parametrize("phase2", ("paper", "ot", "ot-source", "ot-predictor"))  # what each does
def test_phase2_pairs_come_from_phase1_end_points(phase2, monkeypatch):
    # one Sinkhorn step of size 1 moves the source (near 0) onto the target (near (20, 20)): X_T is far from x0
    sink = SinkhornOptions(blur=0.3, relative_blur=False, scaling=0.7, tol=1e-6, max_iter=5000)
    objective = NSGFPlusPlusObjective(
        SinkhornFlowMatcher(flow_steps=1, step_size=1.0, path="grid", sinkhorn=sink, pool=None),
        phase2=phase2,
        generator=_gen(1),
        endpoints="simulated",
    )
    x0 = _randn(64, 2, seed=2)
    x1 = 20.0 + _randn(64, 2, seed=3)
    seen = {}
    original = objective.cfm.sample_location_and_conditional_flow

    def spy(a, b, t=None, return_noise=False):  # what the straight-flow loss is built from
        seen["a"], seen["b"] = a, b
        return original(a, b, t=t, return_noise=return_noise)

    monkeypatch.setattr(objective.cfm, "sample_location_and_conditional_flow", spy)
    nets = {
        "nsgf": VelocityMLP(2).double(),
        "predictor": TimePredictorMLP(2).double(),
        "straight": VelocityMLP(2).double(),
    }
    losses = objective.losses(nets, x0, x1)
    assert set(losses) == set(objective.net_names)
    a, b = seen["a"], seen["b"]
    if phase2 == "paper":
        assert torch.equal(a, x0) and torch.equal(b, x1)
        return
    # independent X_T: a fresh matcher of the same settings, one Sinkhorn step from x0
    x_T = (
        SinkhornFlowMatcher(flow_steps=1, step_size=1.0, path="grid", sinkhorn=sink, pool=None)
        .simulate(x0, x1)
        .xs[-1]
    )
    assert float(x_T.norm(dim=1).mean()) > 20  # the flow moved the particles far from the noise
    # every end point is used once (a permutation of X_T's rows), every data point once
    sort = lambda z: z[torch.argsort(z[:, 0] * 1e3 + z[:, 1])]  # noqa: E731
    torch.testing.assert_close(sort(a), sort(x_T), atol=1e-12, rtol=0)
    torch.testing.assert_close(sort(b), sort(x1), atol=0, rtol=0)
    # and the pairing is an exact OT plan, between X_T and x1 ("ot", "ot-predictor") or between the sources
    # of the end points and x1 ("ot-source"): its cost equals POT's emd2
    import ot

    if phase2 == "ot-source":
        source = x0[torch.cdist(a, x_T).argmin(dim=1)]  # the row of x0 each segment's end point flowed from
        cost = float(((source - b) ** 2).sum(1).mean())
        exact = float(ot.emd2(ot.unif(64), ot.unif(64), ot.dist(x0.numpy(), x1.numpy())))
    else:
        cost = float(((a - b) ** 2).sum(1).mean())
        exact = float(ot.emd2(ot.unif(64), ot.unif(64), ot.dist(x_T.numpy(), x1.numpy())))
    assert cost == pytest.approx(exact, rel=1e-9)


class Shift(nn.Module):
    """A constant velocity field: T Euler steps over [0, 1] move every point by exactly ``c``."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.tensor(c, dtype=torch.float64)
        self.calls = 0

    def forward(self, t, x, *args, **kwargs):
        self.calls += 1
        return self.c.expand_as(x).clone()


@pytest.mark.parametrize("phase2", ["ot", "ot-source"])
@pytest.mark.parametrize("labelled", [False, True])
def test_network_end_points_come_from_the_nsgf_network(labelled, phase2):
    objective = NSGFPlusPlusObjective(
        SinkhornFlowMatcher(flow_steps=3, step_size=1.0, path="grid", pool=None),
        phase2=phase2,
        generator=_gen(1),
        endpoints="network",
    )
    x0, x1 = _randn(32, 2, seed=2), 20.0 + _randn(32, 2, seed=3)
    y1 = (torch.arange(32) % 2) if labelled else None
    nsgf = Shift([5.0, -1.0])
    a, b, y = objective.phase2_pairs(x0, x1, y1, nets={"nsgf": nsgf, "straight": Zero()})
    assert nsgf.calls == 3  # T Euler steps of the network, no Sinkhorn flow
    sort = lambda z: z[torch.argsort(z[:, 0] * 1e3 + z[:, 1])]  # noqa: E731
    torch.testing.assert_close(sort(a), sort(x0 + torch.tensor([5.0, -1.0], dtype=torch.float64)))
    torch.testing.assert_close(sort(b), sort(x1), atol=0, rtol=0)
    if labelled:  # segments stay within their class: row i of x0 took class y1[i]
        shifted = x0 + torch.tensor([5.0, -1.0], dtype=torch.float64)
        assert torch.equal(y1[torch.cdist(a, shifted).argmin(1)], y)
        assert torch.equal(y1[torch.cdist(b, x1).argmin(1)], y)
    if phase2 == "ot-source" and not labelled:  # the pairs are the exact OT plan of the sources and the data
        import ot

        source = x0[torch.cdist(a, x0 + torch.tensor([5.0, -1.0], dtype=torch.float64)).argmin(1)]
        exact = float(ot.emd2(ot.unif(32), ot.unif(32), ot.dist(x0.numpy(), x1.numpy())))
        assert float(((source - b) ** 2).sum(1).mean()) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="nets is required with endpoints='network'"):
        NSGFPlusPlusObjective(
            SinkhornFlowMatcher(pool=None), phase2=phase2, endpoints="network"
        ).phase2_pairs(x0, x1)
    with pytest.raises(ValueError, match="endpoints must be one of"):
        NSGFPlusPlusObjective(SinkhornFlowMatcher(), endpoints="noise")


class RowSpy(nn.Module):
    """Records the rows of every call's ``x`` and its labels ``y`` (None without) and returns ``x + 2 t`` (the
    :class:`Linear` field)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []
        self.labels: list[torch.Tensor | None] = []

    def forward(self, t, x, y=None):
        self.rows.append(x.shape[0])
        self.labels.append(y)
        return Linear()(t, x)


class _Traj:
    def __init__(self, end):
        self.xs = [end]


@pytest.mark.parametrize("labelled", [False, True])
def test_phase1_batch_fraction_trains_the_nsgf_field_on_a_share_of_the_targets(labelled, monkeypatch):
    t, xt, ut = torch.rand(32, dtype=torch.float64), _randn(32, 2, seed=5), _randn(32, 2, seed=6)
    y1 = (torch.arange(32) % 4) if labelled else None
    objective = NSGFPlusPlusObjective(
        SinkhornFlowMatcher(flow_steps=2, path="grid", pool=None),
        phase2="ot",
        generator=_gen(1),
        endpoints="simulated",
        phase1_batch_fraction=0.25,
    )
    # the matcher's targets, fixed here: the loss must be the MSE over their first 8 rows
    monkeypatch.setattr(objective.matcher, "sample_location_and_conditional_flow", lambda x0, x1: (t, xt, ut))
    monkeypatch.setattr(
        objective.matcher,
        "guided_sample_location_and_conditional_flow",
        lambda x0, x1, y1: (t, xt, ut, None, torch.arange(32) % 4),
    )
    monkeypatch.setattr(objective, "simulate_endpoints", lambda x0, x1: x0 + 1.0)
    monkeypatch.setattr(objective.matcher, "simulate_guided", lambda x0, x1, y1: (_Traj(x0 + 1.0), y1))
    nsgf, straight = RowSpy(), RowSpy()
    losses = objective.losses({"nsgf": nsgf, "straight": straight}, _randn(32, 2, seed=7), _randn(32, 2), y1)
    expected = torch.mean((xt[:8] + 2 * t[:8, None] - ut[:8]) ** 2)
    torch.testing.assert_close(losses["nsgf"], expected)
    assert nsgf.rows == [8] and straight.rows == [32]
    if labelled:  # the labels of the kept targets, row for row
        assert torch.equal(nsgf.labels[0], (torch.arange(32) % 4)[:8])
    else:
        assert nsgf.labels == [None]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="phase1_batch_fraction must"):
            NSGFPlusPlusObjective(SinkhornFlowMatcher(), phase1_batch_fraction=bad)


def _ot_objective(refresh_every=None, endpoint_capacity=None, seed=1):
    sink = SinkhornOptions(blur=0.5, relative_blur=False, scaling=0.7)
    matcher = SinkhornFlowMatcher(flow_steps=2, step_size=0.5, path="grid", sinkhorn=sink, refresh_every=10)
    return NSGFPlusPlusObjective(
        matcher,
        phase2="ot",
        generator=_gen(seed),
        refresh_every=refresh_every,
        endpoint_capacity=endpoint_capacity,
        endpoints="simulated",
    )


def test_ot_end_points_are_amortised_over_refresh_every_calls(monkeypatch):
    objective = _ot_objective()  # refresh_every defaults to the matcher's (10)
    assert objective.refresh_every == 10
    sims = []
    original = objective.simulate_endpoints

    def spy(x0, x1):
        sims.append(x0.shape[0])
        return original(x0, x1)

    monkeypatch.setattr(objective, "simulate_endpoints", spy)
    nets = {"nsgf": VelocityMLP(2).double(), "straight": VelocityMLP(2).double()}
    for k in range(20):
        objective.losses(nets, _randn(32, 2, seed=100 + k), 3.0 + _randn(32, 2, seed=200 + k))
    assert objective.n_flows == len(sims) == 2 and objective.n_calls == 20
    assert objective.n_endpoints == 64 and objective.endpoint_capacity == 16 * 32
    # a smaller refresh period simulates more flows; the buffer stays bounded, FIFO
    objective = _ot_objective(refresh_every=3, endpoint_capacity=80)
    for k in range(20):
        objective.losses(nets, _randn(32, 2, seed=100 + k), 3.0 + _randn(32, 2, seed=200 + k))
    assert objective.n_flows == 7 and objective.n_endpoints == 80


def test_ot_end_points_drawn_without_replacement_from_the_buffer_fifo():
    objective = _ot_objective(refresh_every=100, endpoint_capacity=48)
    x1 = 3.0 + _randn(16, 2, seed=3)
    flows = [_randn(16, 2, seed=s) for s in (10, 11, 12, 13)]
    sims = [objective.simulate_endpoints(x0, x1) for x0 in flows]
    # the first call simulates; the second draws from the buffer only (no new flow)
    first = objective.phase1_endpoints(flows[0], x1)
    second = objective.phase1_endpoints(flows[1], x1)
    assert objective.n_flows == 1
    sort = lambda z: z[torch.argsort(z[:, 0] * 1e3 + z[:, 1])]  # noqa: E731
    torch.testing.assert_close(sort(first), sort(sims[0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(sort(second), sort(sims[0]), atol=1e-12, rtol=0)
    # a batch larger than the buffer triggers a refresh
    objective.phase1_endpoints(_randn(24, 2, seed=16), 3.0 + _randn(24, 2, seed=17))
    assert objective.n_flows == 2 and objective.n_endpoints == 40
    # FIFO eviction at the capacity; draws are distinct buffer rows
    objective.buffer.add(sims[1])
    objective.buffer.add(sims[2])
    objective.buffer.add(sims[3])  # capacity 48: the first flow is evicted
    buffer = torch.cat(sims[1:])
    torch.testing.assert_close(objective.buffer.items, buffer, atol=0, rtol=0)
    drawn = objective.phase1_endpoints(_randn(40, 2, seed=14), 3.0 + _randn(40, 2, seed=15))
    rows = [int(torch.cdist(z[None], buffer).argmin()) for z in drawn]
    assert len(set(rows)) == 40
    torch.testing.assert_close(drawn, buffer[rows], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"endpoint_capacity \(48\) must be at least the batch size \(64\)"):
        objective.phase1_endpoints(_randn(64, 2), _randn(64, 2))
    with pytest.raises(ValueError, match="endpoint_capacity must be"):
        _ot_objective(endpoint_capacity=0)
    with pytest.raises(ValueError, match="refresh_every must be"):
        _ot_objective(refresh_every=-1)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("phase2", PHASE2_VARIANTS)
def test_checkpoint_round_trip_reproduces_samples_and_training(tmp_path, phase2):
    src, tgt = _data()
    a = _small_model(0, phase2)
    a.fit(src, tgt, 4, batch_size=64)
    path = tmp_path / "sub" / "nsgfpp.pt"
    a.save(path)
    assert os.listdir(tmp_path / "sub") == ["nsgfpp.pt"]  # no temp file left behind

    b = _small_model(1, phase2)  # other initial weights, other generator
    b.load(path)
    assert b.iterations == a.iterations == 4 and b.phase2 == phase2
    x0 = torch.randn(100, 2, generator=_gen(7))
    for solver, steps in (("euler", 5), ("dopri5", None)):
        sa = a.sample(x0, solver=solver, straight_steps=steps)
        sb = b.sample(x0, solver=solver, straight_steps=steps)
        assert torch.equal(sa.samples, sb.samples) and torch.equal(sa.extras["tau"], sb.extras["tau"])
        assert sa.nfe == sb.nfe
    # training resumes identically: optimiser state, generator, the pool and the refresh counter
    assert len(b.matcher.pool) == len(a.matcher.pool) > 0
    assert (b.objective.n_calls, b.objective.n_flows) == (a.objective.n_calls, a.objective.n_flows)
    buffered = phase2 in ("ot", "ot-predictor")  # "ot-source" uses each call's own end points
    assert b.objective.n_endpoints == a.objective.n_endpoints == (128 if buffered else 0)  # 2 flows
    if buffered:
        assert torch.equal(b.objective.buffer.items, a.objective.buffer.items)
    assert a.fit(src, tgt, 3, 64) == b.fit(src, tgt, 3, 64)
    for k in a.nets:
        for pa, pb in zip(a.nets[k].parameters(), b.nets[k].parameters(), strict=True):
            assert torch.equal(pa, pb)


def test_default_sinkhorn_follows_the_matcher_rule_and_survives_a_checkpoint(tmp_path):
    # sinkhorn=None is the matcher's default: blur 0.1 in 2D, HIGH_DIM_BLUR on many features (resolved
    # per flow from its targets), and the matcher's state is restored from a checkpoint.
    for dim, expected in ((2, SinkhornOptions().blur), (32, HIGH_DIM_BLUR)):
        torch.manual_seed(0)
        a = NSGFPlusPlus(VelocityMLP(dim, 16), None, VelocityMLP(dim, 16), refresh_every=2, generator=_gen(0))
        src, tgt = (
            _randn(128, dim, seed=1, dtype=torch.float32),
            _randn(128, dim, seed=2, dtype=torch.float32),
        )
        a.fit(src, tgt + 3.0, 2, batch_size=32)
        assert a.matcher.flow_blur(tgt) == pytest.approx(expected * SinkhornOptions.scale_of(tgt))
        a.save(tmp_path / f"d{dim}.pt")
        b = NSGFPlusPlus(VelocityMLP(dim, 16), None, VelocityMLP(dim, 16), generator=_gen(1))
        b.load(tmp_path / f"d{dim}.pt")
        assert (b.matcher.sinkhorn, b.matcher.blur) == (a.matcher.sinkhorn, a.matcher.blur)
        assert b.matcher.state_dict()["targets"]["scale"] == a.matcher.state_dict()["targets"]["scale"]


def test_format_1_checkpoint_loads_as_paper_variant(tmp_path):
    a = _small_model(0, "paper")
    src, tgt = _data()
    a.fit(src, tgt, 2, batch_size=64)
    state = a.state_dict()
    # the earlier three-loop trainer's format: one counter per network, no variant
    state["format"] = "torchcfm_nsgf.nsgfpp/1"
    state["settings"] = {k: v for k, v in state["settings"].items() if k != "phase2"}
    state["settings"]["iterations"] = {"nsgf": 2, "predictor": 5, "straight": 3}
    torch.save(state, tmp_path / "v1.pt")
    b = _small_model(1, "paper")
    b.load(tmp_path / "v1.pt")
    assert b.iterations == 5 and b.phase2 == "paper"
    x0 = torch.randn(20, 2, generator=_gen(7))
    assert torch.equal(a.sample(x0, straight_steps=3).samples, b.sample(x0, straight_steps=3).samples)
    with pytest.raises(ValueError, match="variant 'paper', this model is 'ot'"):
        _small_model(1, "ot").load(tmp_path / "v1.pt")


def test_load_rejects_other_architecture_and_garbage(tmp_path):
    a = _small_model(0)
    path = tmp_path / "a.pt"
    a.save(path)
    with pytest.raises(ValueError, match="nsgf network does not fit"):
        _small_model(0, width=16).load(path)
    torch.save({"hello": 1}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not an NSGF\\+\\+ checkpoint"):
        a.load(tmp_path / "b.pt")
    with pytest.raises(FileNotFoundError):
        a.load(tmp_path / "missing.pt")
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        a.load(tmp_path / "c.pt")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(ValueError, match=f"flow_steps must be at most {MAX_PHASE1_STEPS}"):
        NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), flow_steps=6)
    with pytest.raises(ValueError, match="flow_steps must be at most"):
        nsgfpp_sample(Zero(), Constant(0.5), Zero(), torch.randn(3, 2), flow_steps=10)
    with pytest.raises(TypeError, match="predictor must be a torch.nn.Module"):
        NSGFPlusPlus(VelocityMLP(2), lambda x: x, VelocityMLP(2), phase2="paper")
    with pytest.raises(ValueError, match="predictor is required for phase2='paper'"):
        NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), phase2="paper")
    with pytest.raises(ValueError, match="predictor must be None for phase2='ot'"):
        NSGFPlusPlus(VelocityMLP(2), TimePredictorMLP(2), VelocityMLP(2), phase2="ot")
    with pytest.raises(
        ValueError, match=r"phase2 must be one of \['paper', 'ot', 'ot-source', 'ot-predictor'"
    ):
        NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), phase2="noise")
    with pytest.raises(TypeError, match="matcher must be a SinkhornFlowMatcher"):
        NSGFPlusPlusObjective("matcher")
    with pytest.raises(ValueError, match="matcher.flow_steps must be at most 5"):
        NSGFPlusPlusObjective(SinkhornFlowMatcher(flow_steps=6))
    with pytest.raises(ValueError, match=r"nets misses \['predictor'\]"):
        NSGFPlusPlusObjective(SinkhornFlowMatcher(), phase2="paper").losses(
            {"nsgf": VelocityMLP(2), "straight": VelocityMLP(2)}, torch.randn(4, 2), torch.randn(4, 2)
        )
    with pytest.raises(ValueError, match=r"straight\(t, x\) must return"):
        straight_flow_from(lambda t, x: x[:, :1], torch.randn(3, 2), torch.zeros(3), n_steps=2)
    with pytest.raises(ValueError, match="tau must be a tensor of shape"):
        straight_flow_from(Zero(), torch.randn(3, 2), torch.zeros(4), n_steps=2)
    with pytest.raises(ValueError, match="tau must lie in"):
        straight_flow_from(Zero(), torch.randn(3, 2), torch.full((3,), 1.5), n_steps=2)
    with pytest.raises(ValueError, match="straight_steps has no meaning"):
        straight_flow_from(Zero(), torch.randn(3, 2), torch.zeros(3), solver="dopri5", n_steps=2)
    with pytest.raises(ValueError, match="solver must be one of"):
        nsgfpp_sample(Zero(), Constant(0.5), Zero(), torch.randn(3, 2), solver="leapfrog")
    with pytest.raises(ValueError, match=r"field\(t, x\) must return"):
        nsgfpp_sample(lambda t, x: x[:, :1], Constant(0.5), Zero(), torch.randn(3, 2), flow_steps=2)

    model = _small_model(0)
    src, tgt = _data()
    with pytest.raises(ValueError, match="source and target must have the same feature shape"):
        model.fit(src, torch.randn(100, 3), 1, 8)
    model = _small_model(0)
    model.fit(src, tgt, 1, 8)
    with pytest.raises(ValueError, match=r"x0 has feature shape \(3,\)"):
        model.sample(torch.randn(4, 3))
    with pytest.raises(TypeError, match="source must be a tensor"):
        model.fit([1, 2], tgt, 1, 8)
    with pytest.raises(ValueError, match=r"target\(8\) must return"):
        model.fit(src, lambda n: torch.randn(n + 1, 2), 1, 8)


# ---------------------------------------------------------------------------------------------- images
def _image_settings(phase2: str, network: str = "separate"):
    from torchcfm_nsgf.images import NSGFSettings
    from torchcfm_nsgf.images.settings import IMAGE_NSGFPP

    return NSGFSettings(
        nsgfpp=IMAGE_NSGFPP.replace(phase2=phase2, flow_steps=2, network=network),
        pool_capacity=64,
        refresh_every=2,
        sinkhorn=SinkhornOptions(blur=5.0, relative_blur=False, scaling=0.5),
    )


def _per_network(nfe: dict[str, int], network: str) -> dict[str, int]:
    """The NFE breakdown as calls per network: one network ``field`` makes both phases' calls when shared."""
    if network == "separate":
        return {"predictor": 0, **nfe} if "predictor" not in nfe else nfe
    return {"field": nfe["nsgf"] + nfe["straight"], "predictor": nfe["predictor"]}


@pytest.mark.parametrize("network", ["separate", "shared"])
@pytest.mark.parametrize("phase2", PHASE2_VARIANTS)
def test_image_method_budget_and_nfe_equal_network_calls(phase2, network):
    from torchcfm_nsgf.images import available_methods, make_method

    if "nsgf++" not in available_methods():
        pytest.skip("nsgf++ is not offered")
    torch.manual_seed(0)
    method = make_method("nsgf++", (1, 8, 8), preset="tiny", nsgf=_image_settings(phase2, network))
    paper = phase2 in PREDICTOR_VARIANTS  # a predictor call
    fields = ("field",) if network == "shared" else ("nsgf", "straight")
    assert tuple(method.nets) == fields[:1] + ("predictor",) * paper + fields[1:]
    nets = nn.ModuleDict({k: Counted(v) for k, v in method.nets.items()})
    x1 = torch.randn(4, 1, 8, 8, generator=_gen(1))
    loss = method.loss(method.nets, torch.randn(4, 1, 8, 8, generator=_gen(2)), x1)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    out = method.sample(nets, torch.randn(3, 1, 8, 8, generator=_gen(3)), nfe=9)
    assert out.samples.shape == (3, 1, 8, 8)
    calls = {k: v.calls for k, v in nets.items()}
    expected = (
        {"nsgf": 2, "predictor": 1, "straight": 6} if paper else {"nsgf": 2, "predictor": 0, "straight": 7}
    )
    assert out.nfe == expected and _per_network(out.nfe, network) == {"predictor": 0, **calls}
    assert out.total_nfe == 9
    least = 4 if paper else 3
    with pytest.raises(ValueError, match=f"nfe must be at least {least} for nsgf\\+\\+"):
        method.sample(nets, torch.randn(3, 1, 8, 8), nfe=least - 1)
    from torchcfm_nsgf.images import NSGFSettings

    with pytest.raises(ValueError, match="flow_steps must be at most 5"):
        make_method(
            "nsgf++", (1, 8, 8), preset="tiny", nsgf=NSGFSettings(nsgfpp=NSGFPlusPlusOptions(flow_steps=6))
        )


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    from _fake_datasets import write_fake_mnist

    root = tmp_path_factory.mktemp("mnist")
    write_fake_mnist(root, n_train=16, n_test=4, strokes=True)
    return root


def _image_config(root, phase2: str, network: str = "separate", **kw):
    from torchcfm_nsgf.images import TrainConfig

    return TrainConfig(
        dataset="mnist",
        data_root=str(root),
        method="nsgf++",
        train_steps=2,
        batch_size=4,
        preset="tiny",
        warmup=1,
        progress=False,
        verify_checksums=False,
        ema_decay=0.5,
        sample_steps=3,
        nsgf=_image_settings(phase2, network),
        device="cpu",
        **kw,
    )


@pytest.mark.filterwarnings("ignore:ema_decay=0.5 averages:UserWarning")
@pytest.mark.parametrize("network", ["separate", "shared"])
@pytest.mark.parametrize("phase2", PHASE2_VARIANTS)
def test_each_variant_trains_on_mnist_format_and_its_nfe_equals_network_calls(mnist_root, phase2, network):
    from torchcfm_nsgf.images import train

    torch.manual_seed(0)
    result = train(_image_config(mnist_root, phase2, network))
    assert result.step == 2 and len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    method = result.method
    assert method.objective.phase2 == phase2 and tuple(method.nets) == method.objective.net_names
    nets = nn.ModuleDict({k: Counted(v) for k, v in result.ema.items()})
    out = method.sample(nets, torch.randn(2, 1, 28, 28, generator=_gen(4)), nfe=6)
    calls = {k: v.calls for k, v in nets.items()}
    assert _per_network(out.nfe, network) == {"predictor": 0, **calls} and out.total_nfe == 6
    assert out.nfe["predictor"] == (phase2 in PREDICTOR_VARIANTS)


# ---------------------------------------------------------------------------------------------- one code path
@pytest.mark.filterwarnings("ignore:ema_decay=0.5 averages:UserWarning")
def test_2d_driver_and_image_method_train_through_the_same_interface(mnist_root, monkeypatch):
    from torchcfm_nsgf.images import train

    calls = []
    losses, sample = NSGFPlusPlusObjective.losses, NSGFPlusPlusObjective.sample

    def spy_losses(self, nets, x0, x1, y1=None):
        calls.append(("losses", tuple(x0.shape[1:])))
        return losses(self, nets, x0, x1, y1)

    def spy_sample(self, nets, x0, **kw):
        calls.append(("sample", tuple(x0.shape[1:])))
        return sample(self, nets, x0, **kw)

    monkeypatch.setattr(NSGFPlusPlusObjective, "losses", spy_losses)
    monkeypatch.setattr(NSGFPlusPlusObjective, "sample", spy_sample)
    src, tgt = _data()
    model = _small_model(0)
    model.fit(src, tgt, 2, batch_size=16)
    model.sample(src[:8], straight_steps=2)
    assert calls == [("losses", (2,)), ("losses", (2,)), ("sample", (2,))]
    calls.clear()
    torch.manual_seed(0)
    result = train(_image_config(mnist_root, "ot"))
    result.method.sample(result.ema, torch.randn(2, 1, 28, 28), nfe=4)
    assert calls == [("losses", (1, 28, 28)), ("losses", (1, 28, 28)), ("sample", (1, 28, 28))]
