"""The Sinkhorn velocity engine against independent references: GeomLoss autograd and a float64 fixed point."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import fixed_point_velocity, rel_err
from torchcfm.utils import sample_moons

from torchcfm_nsgf import SinkhornConvergenceWarning, sinkhorn_solve, sinkhorn_velocity

geomloss = pytest.importorskip("geomloss")

# The accuracy tier (the engine's defaults before they moved to SinkhornOptions, whose tol is 1e-2):
# at these settings the velocity is within 1e-3 of the converged float64 fixed point.
ACCURATE = dict(tol=1e-4, max_iter=5000)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _moons(n: int) -> torch.Tensor:
    """torchcfm's two moons, centred and brought to unit scale."""
    y = sample_moons(n)
    return (y - y.mean(0)) / 3


def _cases():
    g = _gen(0)
    return {
        # 2-D: Gaussian -> moons with a small blur (eps / diameter^2 ~ 1e-3)
        "2d": (torch.randn(200, 2, generator=g), _moons(160) * 1.5, 0.1),
        "50d": (torch.randn(128, 50, generator=g), 0.5 * torch.randn(96, 50, generator=g) + 1.0, 2.0),
        "image": (
            torch.rand(64, 3, 8, 8, generator=g) * 2 - 1,
            torch.rand(80, 3, 8, 8, generator=g) * 2 - 1,
            2.0,
        ),
    }


def _geomloss_velocity(x: torch.Tensor, y: torch.Tensor, blur: float) -> torch.Tensor:
    """-n grad_x S_eps(mu_n, nu) by autograd through GeomLoss's debiased Sinkhorn divergence (float64)."""
    xs = x.double().reshape(len(x), -1).clone().requires_grad_(True)
    ys = y.double().reshape(len(y), -1)
    loss_fn = geomloss.SamplesLoss(
        "sinkhorn", p=2, blur=blur, scaling=0.999, debias=True, backend="tensorized"
    )
    (grad,) = torch.autograd.grad(loss_fn(xs, ys), xs)
    return (-len(x) * grad).reshape(x.shape)


@pytest.mark.parametrize("case", ["2d", "50d", "image"])
def test_matches_float64_fixed_point(case):
    x, y, blur = _cases()[case]
    v = sinkhorn_velocity(x, y, blur=blur, **ACCURATE)
    assert v.shape == x.shape and v.dtype == x.dtype
    assert rel_err(v, fixed_point_velocity(x, y, blur)) <= 1e-3


@pytest.mark.parametrize("case", ["50d", "image"])
def test_matches_geomloss_gradient(case):
    x, y, blur = _cases()[case]
    v = sinkhorn_velocity(x, y, blur=blur, **ACCURATE)
    assert rel_err(v, _geomloss_velocity(x, y, blur)) <= 1e-3


def test_matches_geomloss_gradient_2d_large_blur():
    # GeomLoss's annealing is itself accurate only where blur is not small against the data.
    g = _gen(1)
    x, y = torch.randn(150, 2, generator=g), _moons(120)
    v = sinkhorn_velocity(x, y, blur=0.5, **ACCURATE)
    assert rel_err(v, _geomloss_velocity(x, y, 0.5)) <= 1e-3


def test_weighted_matches_reference():
    # Non-uniform weights: v = grad f_xx - grad f_xy, i.e. -(1/a_i) grad_{x_i} S_eps.
    g = _gen(2)
    x, y = (
        torch.randn(40, 3, generator=g, dtype=torch.float64),
        torch.randn(30, 3, generator=g, dtype=torch.float64) + 1,
    )
    a = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    a = a / a.sum()
    b = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    b = b / b.sum()
    xs = x.clone().requires_grad_(True)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=1.0, scaling=0.999, debias=True, backend="tensorized")
    (grad,) = torch.autograd.grad(loss(a, xs, b, y), xs)
    ref = -grad / a[:, None]
    v = sinkhorn_velocity(x, y, blur=1.0, a=a, b=b, tol=1e-9)
    assert rel_err(v, ref) <= 1e-4


def test_float64_solution_is_a_fixed_point():
    x, y, blur = _cases()["2d"]
    sol = sinkhorn_solve(x.double(), y.double(), blur=blur, tol=1e-10)
    assert sol.converged and sol.marginal_error <= 1e-10
    assert sol.velocity.dtype == torch.float64
    assert rel_err(sol.velocity, fixed_point_velocity(x, y, blur)) <= 1e-7
    # Projections and potentials are consistent with the velocity and the closed form grad f = x - proj.
    torch.testing.assert_close(sol.proj_y - sol.proj_x, sol.velocity)
    assert sol.f_xy.shape == (len(x),) and sol.g_xy.shape == (len(y),) and sol.f_xx.shape == (len(x),)


def test_zero_velocity_for_identical_clouds():
    x = torch.randn(100, 2, generator=_gen(3)) * 3
    v = sinkhorn_velocity(x, x.clone(), blur=0.1)
    assert float(v.abs().max()) <= 1e-4 * float(x.abs().max())


def test_translation_equivariance():
    x, y, blur = _cases()["2d"]
    shift = torch.tensor([10.0, -7.0])
    v = sinkhorn_velocity(x, y, blur=blur)
    v_shift = sinkhorn_velocity(x + shift, y + shift, blur=blur)
    assert rel_err(v_shift, v) <= 1e-4
    sol = sinkhorn_solve(x + shift, y + shift, blur=blur)
    sol0 = sinkhorn_solve(x, y, blur=blur)
    torch.testing.assert_close(sol.proj_y - shift, sol0.proj_y, atol=1e-3, rtol=0)


def test_euler_steps_decrease_divergence():
    g = _gen(4)
    x, y = torch.randn(128, 2, generator=g, dtype=torch.float64), _moons(128).double()
    s_eps = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.3, scaling=0.99, debias=True, backend="tensorized")
    values = [float(s_eps(x, y))]
    sol = None
    for _ in range(15):
        sol = sinkhorn_solve(x, y, blur=0.3, warm_start=sol)
        x = x + 0.1 * sol.velocity
        values.append(float(s_eps(x, y)))
    diffs = torch.tensor(values).diff()
    assert bool((diffs < 0).all()), values
    assert values[-1] < 0.2 * values[0]


def test_warm_start_reaches_same_solution_faster():
    x, y, blur = _cases()["2d"]
    sol = sinkhorn_solve(x, y, blur=blur, **ACCURATE)
    x2 = x + 0.01 * sol.velocity
    cold = sinkhorn_solve(x2, y, blur=blur, **ACCURATE)
    warm = sinkhorn_solve(x2, y, blur=blur, warm_start=sol, **ACCURATE)
    assert warm.n_anneal == 0 and warm.converged
    assert warm.n_iter + warm.n_anneal < cold.n_iter + cold.n_anneal
    assert rel_err(warm.velocity, cold.velocity) <= 1e-3


@pytest.mark.parametrize("n,m", [(50, 200), (200, 50)])
def test_unequal_sizes(n, m):
    g = _gen(5)
    x, y = torch.randn(n, 2, generator=g), torch.randn(m, 2, generator=g) + 2
    v = sinkhorn_velocity(x, y, blur=0.2, **ACCURATE)
    assert rel_err(v, fixed_point_velocity(x, y, 0.2)) <= 1e-3


def test_no_nan_extreme_scale_float32():
    # blur 1e-3 on data of scale 100 in float32, with duplicated points and n != m.
    g = _gen(6)
    x = torch.randn(300, 2, generator=g) * 100
    x[150:] = x[:150]
    y = torch.randn(257, 2, generator=g) * 100 + 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        sol = sinkhorn_solve(x, y, blur=1e-3, max_iter=200)
    for t in (sol.velocity, sol.f_xy, sol.g_xy, sol.f_xx):
        assert bool(torch.isfinite(t).all())
    assert math.isfinite(sol.marginal_error)


def test_cap_warns_and_reports_error():
    x, y, _ = _cases()["2d"]
    with pytest.warns(SinkhornConvergenceWarning, match="max_iter=5"):
        sol = sinkhorn_solve(x, y, blur=0.01, max_iter=5)
    assert not sol.converged and sol.marginal_error > 1e-4 and sol.n_iter == 5


def test_half_precision_input():
    x, y, blur = _cases()["2d"]
    v = sinkhorn_velocity(x.half(), y.half(), blur=blur, **ACCURATE)
    assert v.dtype == torch.float16
    assert rel_err(v.float(), fixed_point_velocity(x.half().float(), y.half().float(), blur)) <= 5e-3


def test_no_autograd_graph():
    x = torch.randn(20, 2, requires_grad=True)
    v = sinkhorn_velocity(x, torch.randn(20, 2), blur=0.5)
    assert not v.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y, blur = _cases()["2d"]
    v = sinkhorn_velocity(x.cuda(), y.cuda(), blur=blur)
    assert v.device.type == "cuda"
    assert rel_err(v.cpu(), sinkhorn_velocity(x, y, blur=blur)) <= 1e-4


def _bad(**over):
    args = dict(x=torch.randn(5, 2), y=torch.randn(6, 2), blur=0.5, scaling=0.9)
    args.update(over)
    x, y = args.pop("x"), args.pop("y")
    return lambda: sinkhorn_velocity(x, y, **args)


@pytest.mark.parametrize(
    "over,exc,word",
    [
        (dict(y=torch.randn(6, 3)), ValueError, "feature shape"),
        (dict(x=torch.randn(0, 2)), ValueError, "x is empty"),
        (dict(y=torch.tensor([[0.0, float("nan")]])), ValueError, "y contains NaN"),
        (dict(x=torch.tensor([[1.0, float("inf")]])), ValueError, "x contains NaN or Inf"),
        (dict(x=torch.ones(5, 2, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x=[[0.0, 1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(blur=0.0), ValueError, "blur must be positive"),
        (dict(blur=-1.0), ValueError, "blur"),
        (dict(scaling=1.0), ValueError, "scaling"),
        (dict(scaling=0.0), ValueError, "scaling"),
        (dict(a=torch.tensor([0.5, 0.5, 0.5, -0.5, 0.0])), ValueError, "a has negative"),
        (dict(b=torch.full((6,), 0.5)), ValueError, "b must sum to 1"),
        (dict(b=torch.full((5,), 0.2)), ValueError, r"b must have shape \(6,\)"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(max_iter=0), ValueError, "max_iter"),
    ],
)
def test_bad_input(over, exc, word):
    with pytest.raises(exc, match=word):
        _bad(**over)()


def test_bad_input_devices_and_warm_start():
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="device"):
        sinkhorn_velocity(x.to("meta"), y, blur=0.5)
    sol = sinkhorn_solve(x, y, blur=0.5)
    with pytest.raises(ValueError, match="warm_start"):
        sinkhorn_solve(torch.randn(7, 2), y, blur=0.5, warm_start=sol)
    with pytest.raises(ValueError, match="warm_start"):
        sinkhorn_solve(x, y, blur=0.4, warm_start=sol)
    with pytest.raises(ValueError, match="omega"):
        sinkhorn_solve(x, y, blur=0.4, omega=2.0)


def test_symmetric_problem_within_tol_at_exit():
    # The symmetric problem's updates pause while it is within tol; at exit it must still be (independent check).
    x, y, blur = _cases()["2d"]
    xs = x.double()
    sol = sinkhorn_solve(xs, y.double(), blur=blur, tol=1e-6)
    assert sol.converged
    eps, n = sol.eps, len(xs)
    c_xx = 0.5 * torch.cdist(xs, xs) ** 2
    t_p = -eps * torch.logsumexp(-math.log(n) + (sol.f_xx[None, :] - c_xx) / eps, dim=1)
    assert float((torch.expm1((sol.f_xx - t_p) / eps).abs() / n).sum()) <= 2e-6
    assert rel_err(sol.velocity, fixed_point_velocity(x, y, blur)) <= 1e-5


def test_adaptive_omega_float64_fewer_iterations_same_fixed_point():
    # Small-eps 2-D case in float64: the tuner raises omega above the fixed 1.9 and saves iterations;
    # the solution is the same fixed point (the fixed-omega path is checked against the reference above).
    x, y, _ = _cases()["2d"]
    xs, ys = x.double(), y.double()
    fixed = sinkhorn_solve(xs, ys, blur=0.05, tol=1e-7, max_iter=5000)
    tuned = sinkhorn_solve(xs, ys, blur=0.05, tol=1e-7, max_iter=5000, adapt_omega=True)
    assert fixed.converged and tuned.converged
    assert fixed.omega == 1.9 and 1.9 < tuned.omega < 2.0
    assert tuned.n_iter < 0.85 * fixed.n_iter
    assert rel_err(tuned.velocity, fixed.velocity) <= 1e-5
    # a warm start begins at the tuned omega
    x2 = xs + 0.01 * tuned.velocity
    warm = sinkhorn_solve(x2, ys, blur=0.05, tol=1e-7, max_iter=5000, adapt_omega=True, warm_start=tuned)
    assert warm.omega >= tuned.omega and warm.converged
    assert torch.isfinite(warm.velocity).all()
    with pytest.raises(TypeError, match="adapt_omega"):
        sinkhorn_solve(xs, ys, blur=0.05, adapt_omega=1)
