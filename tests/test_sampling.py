"""Sampler: closed-form ODE solutions, NFE against independent call counters, torchdyn and torchcfm models."""

from __future__ import annotations

import math

import pytest
import torch
from torchcfm.models import MLP
from torchcfm.utils import torch_wrapper

from torchcfm_nsgf.guidance import CFGField, drop_labels
from torchcfm_nsgf.sampling import SOLVERS, NFECounter, SampleResult, euler_sample, odeint_sample

torch.set_num_threads(1)


class CountingField:
    """dx/dt = -x, counting its calls independently of the code under test."""

    def __init__(self):
        self.calls = 0
        self.times: list[torch.Tensor] = []

    def __call__(self, t, x):
        self.calls += 1
        self.times.append(t)
        return -x


def _x0(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_registry_lists_the_solvers_and_their_stages():
    assert {name: spec.stages for name, spec in SOLVERS.items()} == {
        "euler": 1,
        "midpoint": 2,
        "rk4": 4,
        "dopri5": None,
        "tsit5": None,
    }
    assert [name for name, spec in SOLVERS.items() if spec.adaptive] == ["dopri5", "tsit5"]


@pytest.mark.parametrize("n_steps", [1, 7, 50])
def test_euler_decay_matches_the_discrete_closed_form(n_steps):
    x0 = _x0(6, 3)
    field = CountingField()
    result = odeint_sample(field, x0, solver="euler", n_steps=n_steps, return_trajectory=True)
    assert isinstance(result, SampleResult)
    torch.testing.assert_close(result.samples, (1 - 1 / n_steps) ** n_steps * x0, rtol=1e-13, atol=1e-15)
    assert result.nfe == {"field": field.calls} and field.calls == n_steps == result.total_nfe
    assert result.extras == {}
    steps = torch.arange(n_steps + 1, dtype=torch.float64)
    torch.testing.assert_close(result.times, steps / n_steps)
    expected = (1 - 1 / n_steps) ** steps[:, None, None] * x0
    torch.testing.assert_close(result.trajectory, expected, rtol=1e-13, atol=1e-15)
    # the field saw 0-d times of x0's dtype: 0, 1/N, ..., (N-1)/N
    assert all(t.dim() == 0 and t.dtype == torch.float64 for t in field.times)
    torch.testing.assert_close(torch.stack(field.times), steps[:-1] / n_steps)
    # euler_sample is the same sampler
    again = euler_sample(lambda t, x: -x, x0, n_steps=n_steps)
    assert torch.equal(again.samples, result.samples) and again.nfe == {"field": n_steps}


def test_euler_converges_to_exp_at_first_order():
    x0 = _x0(4, 2)
    errors = [
        float((euler_sample(lambda t, x: -x, x0, n_steps=n).samples - math.exp(-1) * x0).abs().max())
        for n in (100, 1000)
    ]
    assert errors[1] < 1e-3 * float(x0.abs().max())
    assert 8 < errors[0] / errors[1] < 12  # error ∝ 1/N


def test_euler_uses_the_time_argument_and_reverse_interval():
    # dx/dt = t x: Euler gives x0 · Π_k (1 + t_k Δt)
    x0 = _x0(3, 2)
    n = 20
    t_span = torch.linspace(0.5, 1.0, n + 1, dtype=torch.float64)
    result = odeint_sample(lambda t, x: t * x, x0, solver="euler", t_span=t_span)
    dt = 0.5 / n
    factor = math.prod(1 + (0.5 + k * dt) * dt for k in range(n))
    torch.testing.assert_close(result.samples, factor * x0, rtol=1e-13, atol=0)
    back = odeint_sample(lambda t, x: -x, x0, solver="euler", t_span=torch.linspace(1.0, 0.0, n + 1))
    torch.testing.assert_close(back.samples, (1 + 1 / n) ** n * x0, rtol=1e-13, atol=0)
    # backwards with an adaptive solver: x(0) = e x(1)
    back = odeint_sample(lambda t, x: -x, x0, solver="dopri5", t_span=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(back.samples, math.e * x0, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("solver", "n_steps"), [("euler", 4), ("rk4", 4), ("dopri5", None)])
def test_callback_and_progress_switch(solver, n_steps, capsys):
    seen = []
    x0 = _x0(2, 2)
    t_span = None if n_steps else torch.linspace(0, 1, 5)
    result = odeint_sample(
        lambda t, x: -x,
        x0,
        solver=solver,
        n_steps=n_steps,
        t_span=t_span,
        return_trajectory=True,
        callback=lambda k, t, x: seen.append((k, t, x)),
    )
    assert [(k, t) for k, t, _ in seen] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    for k, _, x in seen:
        assert torch.equal(x, result.trajectory[k])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # progress=False is silent
    odeint_sample(lambda t, x: -x, x0, solver=solver, n_steps=n_steps, progress=True)
    assert capsys.readouterr().out == ""  # a progress bar goes to stderr, never to stdout


@pytest.mark.parametrize(("solver", "stages"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_nfe_equals_an_independent_count(solver, stages):
    field = CountingField()
    result = odeint_sample(field, _x0(5, 2), solver=solver, n_steps=10)
    assert result.nfe == {"field": field.calls} and field.calls == stages * 10 == result.total_nfe


def test_odeint_euler_matches_the_discrete_closed_form():
    x0 = _x0(5, 2)
    result = odeint_sample(lambda t, x: -x, x0, solver="euler", n_steps=8, return_trajectory=True)
    torch.testing.assert_close(result.samples, (7 / 8) ** 8 * x0, rtol=1e-12, atol=1e-14)
    assert result.trajectory.shape == (9, 5, 2)
    torch.testing.assert_close(result.times, torch.linspace(0, 1, 9, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_solver_matches_exp_decay(solver, dtype, capsys):
    x0 = _x0(8, 3, dtype=dtype)
    field = CountingField()
    result = odeint_sample(field, x0, solver=solver)
    assert result.samples.dtype == dtype
    torch.testing.assert_close(result.samples, math.exp(-1) * x0, rtol=0, atol=1e-4)
    assert result.nfe == {"field": field.calls} and field.calls > 0
    assert capsys.readouterr().out == ""  # torchdyn's notices are kept quiet

    times = torch.linspace(0, 1, 5)
    traj = odeint_sample(lambda t, x: -x, x0, solver=solver, t_span=times, return_trajectory=True)
    expected = torch.exp(-times.to(dtype))[:, None, None] * x0
    torch.testing.assert_close(traj.trajectory, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("solver", "step_factor"),
    [
        ("midpoint", lambda z: 1 + z + z**2 / 2),
        ("rk4", lambda z: 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24),
    ],
)
def test_fixed_step_decay_matches_the_stability_polynomial(solver, step_factor):
    # on dx/dt = -x one step multiplies x by R(-h); float32 solver constants would miss rtol 1e-13
    x0 = _x0(4, 2)
    n = 40
    result = odeint_sample(lambda t, x: -x, x0, solver=solver, n_steps=n)
    torch.testing.assert_close(result.samples, step_factor(-1 / n) ** n * x0, rtol=1e-13, atol=1e-15)


def test_rk4_is_fourth_order_on_a_time_dependent_field():
    # dx/dt = t x  ⇒  x(1) = exp(1/2) x0; wrong stage times (torchdyn 1.0.6's tableau) give ~1% error
    x0 = _x0(4, 2)
    errors = []
    for n in (10, 20):
        samples = odeint_sample(lambda t, x: t * x, x0, solver="rk4", n_steps=n).samples
        errors.append(float((samples - math.exp(0.5) * x0).abs().max() / x0.abs().max()))
    assert errors[1] < 1e-7
    assert 12 < errors[0] / errors[1] < 20  # error ∝ 1/N⁴


def test_torch_wrapper_mlp_against_torchdyn_and_a_float64_reference():
    from torchdyn.core import NeuralODE

    torch.manual_seed(0)
    model = torch_wrapper(MLP(dim=2, w=32, time_varying=True))
    x0 = _x0(16, 2, dtype=torch.float32)
    for solver in ("euler", "midpoint"):
        ours = odeint_sample(model, x0, solver=solver, n_steps=10)
        with torch.no_grad():
            theirs = NeuralODE(model, solver=solver).trajectory(x0, torch.linspace(0, 1, 11))[-1]
        torch.testing.assert_close(ours.samples, theirs, rtol=1e-5, atol=1e-6)
        assert ours.total_nfe == 10 * SOLVERS[solver].stages
        assert not ours.samples.requires_grad
    # float64 reference: a fine rk4 solve of the same (double-precision) network
    model64 = torch_wrapper(MLP(dim=2, w=32, time_varying=True)).double()
    model64.load_state_dict(model.state_dict())
    reference = odeint_sample(model64, x0.double(), solver="rk4", n_steps=25).samples
    adaptive = odeint_sample(model, x0, solver="dopri5")
    # the MLP's SELU has a kink at 0, so local error estimates are optimistic: a looser bound than 1e-5
    torch.testing.assert_close(adaptive.samples.double(), reference, rtol=0, atol=1e-3)
    assert model.model.net[0].weight.grad is None


def test_image_shaped_states():
    x0 = _x0(3, 1, 4, 4)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
    result = euler_sample(lambda t, x: -x, x0, n_steps=5, return_trajectory=True)
    assert result.trajectory.shape == (6, 3, 1, 4, 4)
    torch.testing.assert_close(result.samples, 0.8**5 * x0, rtol=1e-13, atol=1e-15)
    learned = odeint_sample(lambda t, x: t * conv(x), x0, solver="rk4", n_steps=3, return_trajectory=True)
    assert learned.samples.shape == (3, 1, 4, 4) and learned.trajectory.shape == (4, 3, 1, 4, 4)
    decay = odeint_sample(lambda t, x: -x, x0, solver="dopri5")
    torch.testing.assert_close(decay.samples, math.exp(-1) * x0, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- extra_args
class RateField:
    """dx/dt = -rate x with a required keyword ``rate`` (one per sample): x(1) = exp(-rate) x0."""

    def __init__(self):
        self.rates = []

    def __call__(self, t, x, *, rate):
        self.rates.append(rate)
        return -rate[:, None] * x


@pytest.mark.parametrize(("solver", "n_steps"), [("euler", 4), ("rk4", 4), ("dopri5", None)])
def test_extra_args_reach_the_field_on_every_call(solver, n_steps):
    x0 = _x0(3, 2)
    rate = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    field = RateField()
    out = odeint_sample(field, x0, solver=solver, n_steps=n_steps, extra_args={"rate": rate})
    assert len(field.rates) == out.total_nfe > 0 and all(r is rate for r in field.rates)
    z = -rate[:, None] / 4  # fixed-step: one step multiplies x by the stability polynomial R(z)
    if solver == "euler":
        torch.testing.assert_close(out.samples, (1 + z) ** 4 * x0, rtol=1e-13, atol=0)
    elif solver == "rk4":
        factor = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
        torch.testing.assert_close(out.samples, factor**4 * x0, rtol=1e-13, atol=0)
    else:
        torch.testing.assert_close(out.samples, torch.exp(-rate)[:, None] * x0, rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="rate"):  # without extra_args the field misses its argument
        odeint_sample(RateField(), x0, solver=solver, n_steps=n_steps)


def test_extra_args_carry_class_labels_to_torchcfm_unet():
    from torchcfm.models.unet.unet import UNetModelWrapper

    torch.manual_seed(0)
    unet = UNetModelWrapper(
        dim=(1, 8, 8),
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 1],
        class_cond=True,
        num_classes=3,
        attention_resolutions="-1",
    ).eval()
    with torch.no_grad():  # torchcfm zero-initialises the output layer: perturb every weight
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    out = odeint_sample(unet, x0, solver="euler", n_steps=2, extra_args={"y": y})
    # reference: the same two Euler steps written out with the labels
    x = x0
    with torch.no_grad():
        for t in (0.0, 0.5):
            x = x + 0.5 * unet(torch.tensor(t), x, y=y)
    torch.testing.assert_close(out.samples, x)
    other = odeint_sample(unet, x0, solver="euler", n_steps=2, extra_args={"y": torch.tensor([1, 1])})
    assert not torch.allclose(other.samples, out.samples)  # the labels changed the field


# ---------------------------------------------------------------------------------------------- errors
def test_nfe_counter_counts_resets_and_drops_keyword_arguments():
    counter = NFECounter(lambda t, x: 2 * x)  # a plain lambda rejects torchdyn's args=...
    x = torch.ones(2, 2)
    out = counter(torch.tensor(0.0), x, args={})
    counter(torch.tensor(0.5), x)
    assert counter.nfe == 2 and torch.equal(out, 2 * x)
    counter.reset()
    assert counter.nfe == 0
    scaled = NFECounter(lambda t, x, scale: scale * x, extra_args={"scale": 3.0})
    assert torch.equal(scaled(torch.tensor(0.0), x, args={}), 3 * x) and scaled.nfe == 1


def test_sample_result_total_nfe_sums_the_breakdown():
    result = SampleResult(samples=torch.zeros(1, 1), nfe={"nsgf": 5, "predictor": 1, "straight": 10})
    assert result.total_nfe == 16 and result.trajectory is None and result.extras == {}


def test_unknown_solver_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"solver must be one of .*'rk4'.*'dopri5'.*got 'heun'"):
        odeint_sample(CountingField(), _x0(2, 2), solver="heun", n_steps=2)


def test_bad_input_names_the_argument():
    x0 = _x0(2, 2)
    field = CountingField()
    with pytest.raises(ValueError, match="n_steps"):
        euler_sample(field, x0, n_steps=0)
    with pytest.raises(TypeError, match="n_steps"):
        euler_sample(field, x0, n_steps=2.5)
    with pytest.raises(ValueError, match="n_steps"):
        odeint_sample(field, x0, solver="rk4", n_steps=-1)
    with pytest.raises(ValueError, match="n_steps"):
        odeint_sample(field, x0, solver="rk4")
    with pytest.raises(ValueError, match="n_steps"):
        odeint_sample(field, x0, solver="dopri5", n_steps=10)
    with pytest.raises(ValueError, match="t_span"):
        odeint_sample(field, x0, solver="dopri5", t_span=torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="n_steps or t_span"):
        odeint_sample(field, x0, solver="euler", n_steps=2, t_span=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="extra_args"):
        odeint_sample(field, x0, solver="euler", n_steps=2, extra_args=[1])
    with pytest.raises(TypeError, match="callback"):
        odeint_sample(field, x0, solver="euler", n_steps=2, callback="print")
    with pytest.raises(TypeError, match="x0"):
        euler_sample(field, torch.ones(2, 2, dtype=torch.int64), n_steps=2)
    with pytest.raises(ValueError, match="x0"):
        odeint_sample(field, torch.full((2, 2), float("nan")), solver="euler", n_steps=2)
    with pytest.raises(ValueError, match="x0"):
        euler_sample(field, torch.ones(3), n_steps=2)
    with pytest.raises(TypeError, match="field"):
        euler_sample("not a field", x0, n_steps=2)
    for solver, n_steps in (("euler", 2), ("rk4", 2), ("dopri5", None)):
        with pytest.raises(ValueError, match=r"field\(t, x\) must return"):
            odeint_sample(lambda t, x: x[:, :1], x0, solver=solver, n_steps=n_steps)
    assert field.calls == 0


# ---------------------------------------------------------------------------------------------- guidance
class LabelField(torch.nn.Module):
    """A toy class-conditional field v(t, x, y) = a[y] - x (null label 3: a[3] = 0), counting its calls
    independently of the package's counters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
        self.calls = 0
        self.labels_seen: list[torch.Tensor] = []

    def forward(self, t, x, y=None):
        self.calls += 1
        self.labels_seen.append(y)
        return self.a[y] - x


@pytest.mark.parametrize(("solver", "n_steps"), [("euler", 5), ("midpoint", 3), ("dopri5", None)])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_sampling_counts_real_network_calls(solver, n_steps, w):
    model = LabelField()
    y = torch.tensor([0, 1, 2])
    out = odeint_sample(
        CFGField(model, w, null_label=3), _x0(3, 2), solver=solver, n_steps=n_steps, extra_args={"y": y}
    )
    assert out.total_nfe == model.calls > 0
    steps = model.calls if w in (0.0, 1.0) else model.calls // 2
    if not SOLVERS[solver].adaptive:
        assert steps == n_steps * SOLVERS[solver].stages
    assert all(seen is not None for seen in model.labels_seen)


def test_guidance_scale_zero_one_and_the_closed_form():
    model = LabelField()
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor(0.3, dtype=torch.float64), torch.tensor([0, 1, 2])
    v_c, v_u = model.a[y] - x, model.a[3] - x  # written out from the toy model's definition
    torch.testing.assert_close(CFGField(model, 0.0, 3)(t, x, y=y), v_u, rtol=0, atol=0)
    torch.testing.assert_close(CFGField(model, 1.0, 3)(t, x, y=y), v_c, rtol=0, atol=0)
    for w in (0.5, 3.0):
        torch.testing.assert_close(CFGField(model, w, 3)(t, x, y=y), v_u + w * (v_c - v_u))
    # the guided flow of dx/dt = (w a[y] + (1 - w) a[null]) - x from x0 = 0 is that point times (1 - e^{-1})
    out = odeint_sample(
        CFGField(model, 2.0, 3),
        torch.zeros(3, 2, dtype=torch.float64),
        solver="dopri5",
        atol=1e-9,
        rtol=1e-9,
        extra_args={"y": y},
    )
    torch.testing.assert_close(out.samples, 2.0 * model.a[y] * (1 - math.exp(-1)), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="y must be a tensor of shape"):
        CFGField(model, 2.0, 3)(t, x)


def test_label_dropout_rate_and_determinism():
    y = torch.arange(10).repeat(1000)
    dropped = drop_labels(y, 0.1, null_label=10, generator=torch.Generator().manual_seed(0))
    again = drop_labels(y, 0.1, null_label=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    is_null = dropped == 10
    assert 0.08 < float(is_null.float().mean()) < 0.12  # 10000 Bernoulli(0.1): std 0.003
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert drop_labels(y, 0.0, 10) is y
    with pytest.raises(ValueError, match="p must lie in"):
        drop_labels(y, 1.5, 10)
    with pytest.raises(ValueError, match="null_label"):
        drop_labels(y, 0.1, -1)
