"""MeanFlow against independent references: a central finite difference of the network (float64) for the JVP
target, a closed-form average velocity on an exact straight-path case, a plain forward pass for the gradient,
logit-normal draws from NumPy for the time sampler, and counted network calls for the sampler's NFE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from torchcfm_nsgf import AverageVelocityMLP, MeanFlow, meanflow_sample


def _net(seed=0, dim=2):
    torch.manual_seed(seed)
    return AverageVelocityMLP(dim, width=32).double()


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = torch.rand(n, 2, generator=g, dtype=torch.float64) * 3
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    t = s + torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    return x0, x1, s, t


def test_target_matches_a_finite_difference_jvp():
    net = _net()
    x0, x1, s, t = _batch()
    z, v = (1 - s[:, None]) * x0 + s[:, None] * x1, x1 - x0
    u, target = MeanFlow().target(net, z, s, t, v)
    h = 1e-6
    with torch.no_grad():
        du = (net(z + h * v, s + h, t) - net(z - h * v, s - h, t)) / (2 * h)
        ref = v + (t - s)[:, None] * du
        torch.testing.assert_close(u, net(z, s, t), rtol=0, atol=1e-14)
    torch.testing.assert_close(target, ref, rtol=1e-7, atol=1e-8)
    assert not target.requires_grad and u.requires_grad


class _StraightMap(torch.nn.Module):
    """The exact average velocity of x1 = a x0 + b on straight paths: u(z, s, t) = (a - 1) x0(z, s) + b."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, z, s, t):
        x0 = (z - s[:, None] * self.b) / (1 - s[:, None] + s[:, None] * self.a)
        return self.scale * ((self.a - 1) * x0 + self.b)


def test_loss_is_zero_on_an_exact_straight_map():
    x0, _, s, t = _batch()
    model = _StraightMap(2.0, 1.0)
    x1 = 2.0 * x0 + 1.0
    loss = MeanFlow(weight_power=0.0).loss(model, x0, x1, s=s, t=t)
    assert float(loss.detach()) <= 1e-20
    # the terms of the JVP do not vanish one by one: their sum does
    z = (1 - s[:, None]) * x0 + s[:, None] * x1
    _, du = torch.func.jvp(lambda z_: model(z_, s, t), (z,), (x1 - x0,))
    assert float(du.detach().abs().max()) > 0.1
    model.scale.data.fill_(1.1)  # a wrong field is penalised
    assert float(MeanFlow(weight_power=0.0).loss(model, x0, x1, s=s, t=t).detach()) > 1e-3


def test_loss_gradient_is_the_weighted_regression_gradient():
    net = _net(1)
    x0, x1, s, t = _batch(seed=1)
    mf = MeanFlow(weight_power=1.0, weight_eps=1e-3)
    mf.loss(net, x0, x1, s=s, t=t).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    z = (1 - s[:, None]) * x0 + s[:, None] * x1
    _, target = mf.target(net, z, s, t, x1 - x0)
    sq = (net(z, s, t) - target).square().sum(1)
    (sq / (sq.detach() + 1e-3)).mean().backward()
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_time_sampler_matches_sorted_logit_normal_draws():
    mf = MeanFlow(logit_mean=0.4, logit_std=1.0, unequal_share=0.25)
    s, t = mf.sample_times(20_000, torch.zeros(1), torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and bool((s <= t).all()) and bool(((s > 0) & (t < 1)).all())
    unequal = s < t
    assert float(unequal.double().mean()) == pytest.approx(0.25, abs=0.015)
    rng = np.random.default_rng(0)
    draws = 1 / (1 + np.exp(-rng.normal(0.4, 1.0, size=(2, 20_000))))
    assert ks_2samp(s.numpy(), draws.min(0)).pvalue > 1e-3
    assert ks_2samp(t[unequal].numpy(), draws.max(0)).pvalue > 1e-3
    # the paper's clock: t_paper = 1 - s is lognorm(-0.4, 1.0) when s == t (the flow-matching pairs)
    assert (
        ks_2samp(s.numpy(), 1 / (1 + np.exp(-rng.normal(0.4, 1.0, 20_000)))).pvalue < 1e-6
    )  # min, not one draw


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, z, s, t, **kw):
        self.calls += 1
        return self.net(z, s, t)


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_sampler_counts_its_network_calls(n_steps):
    net = _Counting(_net())
    x0 = torch.randn(8, 2, dtype=torch.float64)
    out = meanflow_sample(net, x0, n_steps)
    assert out.nfe == {"field": n_steps} and net.calls == n_steps
    if n_steps == 1:
        s, t = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
        torch.testing.assert_close(out.samples, x0 + net.net(x0, s, t), rtol=0, atol=0)
    assert out.samples.dtype == x0.dtype and not out.samples.requires_grad


def test_sampler_on_the_exact_map_lands_on_the_data():
    model = _StraightMap(2.0, 1.0)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    for n in (1, 3):
        torch.testing.assert_close(meanflow_sample(model, x0, n).samples, 2.0 * x0 + 1.0)


def test_bad_input_raises_named_errors():
    net = _net()
    x0, x1, s, t = _batch()
    with pytest.raises(ValueError, match="unequal_share"):
        MeanFlow(unequal_share=1.5)
    with pytest.raises(ValueError, match="weight_power"):
        MeanFlow(weight_power=-1.0)
    with pytest.raises(ValueError, match="logit_std"):
        MeanFlow(logit_std=0.0)
    with pytest.raises(ValueError, match="same number of rows"):
        MeanFlow().loss(net, x0, x1[:3])
    with pytest.raises(ValueError, match="s <= t"):
        MeanFlow().loss(net, x0, x1, s=t, t=s + 0.0 * t - 0.1)
    with pytest.raises(ValueError, match="both s and t"):
        MeanFlow().loss(net, x0, x1, s=s)
    with pytest.raises(ValueError, match="x1 contains NaN"):
        MeanFlow().loss(net, x0, x1 * float("nan"))
    with pytest.raises(ValueError, match="n_steps"):
        meanflow_sample(net, x0, 0)


# ---------------------------------------------------------------------------------------------- image methods
def test_image_one_step_methods_sample_with_counted_calls_and_refuse_what_they_cannot_do():
    from torchcfm_nsgf.images import make_method

    torch.manual_seed(0)
    x0 = torch.randn(3, 1, 28, 28)
    meanflow = make_method("meanflow", (1, 28, 28), preset="tiny")
    counted = _Counting(meanflow.nets["average_velocity"])
    nets = torch.nn.ModuleDict({"average_velocity": counted})
    for nfe, calls in ((None, 1), (3, 3)):
        counted.calls = 0
        out = meanflow.sample(nets, x0, nfe=nfe)
        assert out.nfe == {"average_velocity": calls} == {"average_velocity": counted.calls}
        assert out.samples.shape == x0.shape
    drift = make_method("drift", (1, 28, 28), preset="tiny")
    assert drift.sample(drift.nets, x0).nfe == {"generator": 1}
    with pytest.raises(ValueError, match="one-step generator"):
        drift.sample(drift.nets, x0, nfe=2)
    with pytest.raises(ValueError, match="solver"):
        meanflow.sample(meanflow.nets, x0, solver="dopri5")
    for name in ("drift", "meanflow"):
        with pytest.raises(ValueError, match="cfg_dropout"):
            make_method(name, (1, 28, 28), preset="tiny", num_classes=10, cfg_dropout=0.1)
    # the untrained second time embedding is zero: the network starts as the UNet at time s
    unet = meanflow.nets["average_velocity"].unet
    s, t = torch.full((3,), 0.3), torch.full((3,), 0.9)
    with torch.no_grad():
        torch.testing.assert_close(meanflow.nets["average_velocity"](x0, s, t), unet(s, x0))
