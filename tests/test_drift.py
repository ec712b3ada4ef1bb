"""SinkhornDrift against independent references: POT's log-domain Sinkhorn plans (float64), GeomLoss's gradient
of the Sinkhorn divergence, the convex hull of a class's samples, and sharded solves against one process."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import ot
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import rel_err
from scipy.spatial import Delaunay

from torchcfm_nsgf import SinkhornDrift, SinkhornOptions

BLUR = 0.5
EXACT = SinkhornOptions(blur=BLUR, relative_blur=False, tol=1e-9, max_iter=20_000)


def _clouds(n=40, m=50, n_self=30, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    x1 = torch.rand(m, 2, generator=g, dtype=dtype) * 2 + torch.tensor([1.0, -0.5], dtype=dtype)
    xs = torch.randn(n_self, 2, generator=g, dtype=dtype) * 1.2 + 0.3
    return x, x1, xs


def _pot_projection(x, y, blur, symmetric=False):
    """Barycentric projection sum_j P_ij y_j / a_i of the plan of POT's ot.sinkhorn(method="sinkhorn_log")."""
    xn, yn = x.double().numpy(), y.double().numpy()
    cost = 0.5 * ot.dist(xn, yn)
    a, b = ot.unif(len(xn)), ot.unif(len(yn))
    plan = ot.sinkhorn(a, b, cost, blur**2, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    return torch.from_numpy(plan @ yn / a[:, None])


def _pot_velocity(x, x1, blur, self_term, xs=None):
    to_data = _pot_projection(x, x1, blur)
    if self_term == "same":
        return to_data - _pot_projection(x, x, blur)
    if self_term == "independent":
        return to_data - _pot_projection(x, xs, blur)
    return to_data - x.double()


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("self_term", ["same", "independent", "none"])
def test_targets_equal_x_plus_eta_times_pot_velocity(self_term):
    x, x1, xs = _clouds()
    drift = SinkhornDrift(0.7, sinkhorn=EXACT, self_term=self_term)
    kw = {"x_self": xs} if self_term == "independent" else {}
    targets = drift.targets(x, x1, **kw)
    ref = x + 0.7 * _pot_velocity(x, x1, BLUR, self_term, xs)
    assert rel_err(targets - x, ref - x) <= 1e-6


def test_same_batch_velocity_is_minus_n_grad_of_geomloss_divergence():
    geomloss = pytest.importorskip("geomloss")
    x, x1, _ = _clouds(n=30, m=35)
    xg = x.clone().requires_grad_(True)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=BLUR, scaling=0.999, debias=True, backend="tensorized")
    (grad,) = torch.autograd.grad(loss(xg, x1), xg)
    v = SinkhornDrift(1.0, sinkhorn=EXACT).velocity(x, x1)
    assert rel_err(v, -len(x) * grad) <= 2e-3


def test_relative_blur_is_a_fraction_of_the_data_radius():
    x, x1, _ = _clouds()
    radius = float((x1 - x1.mean(0)).square().sum(1).mean().sqrt())
    drift = SinkhornDrift(sinkhorn=SinkhornOptions(blur=0.4, tol=1e-9, max_iter=20_000))
    assert drift.blur_for(x1) == pytest.approx(0.4 * radius, rel=1e-12)
    ref = _pot_velocity(x, x1, 0.4 * radius, "same")
    assert rel_err(drift.velocity(x, x1), ref) <= 1e-6


def test_step_schedules_follow_the_call_count():
    x, x1, _ = _clouds(n=20, m=20)
    v = SinkhornDrift(sinkhorn=EXACT).velocity(x, x1)
    for step_size in ([0.5, 0.25], lambda k: 0.5 / (k + 1)):
        drift = SinkhornDrift(step_size, sinkhorn=EXACT)
        steps = [float((drift.targets(x, x1) - x).norm() / v.norm()) for _ in range(3)]
        expected = [0.5, 0.25, 0.25] if isinstance(step_size, list) else [0.5, 0.25, 0.5 / 3]
        assert steps == pytest.approx(expected, rel=1e-9)
        state = drift.state_dict()
        assert state["calls"] == 3
        fresh = SinkhornDrift(step_size, sinkhorn=EXACT)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.targets(x, x1), drift.targets(x, x1), rtol=0, atol=0)
        drift.reset()
        assert drift.n_calls == 0
        assert float((drift.targets(x, x1) - x).norm() / v.norm()) == pytest.approx(0.5, rel=1e-9)


def _halving(k: int) -> float:
    return 0.5 / (k + 1)


@pytest.mark.parametrize("step_size", [0.5, [0.5, 0.25], _halving])
def test_a_pickled_drift_continues_its_schedule(step_size):
    """A drift survives pickling mid-schedule (spawned workers, DDP) and gives the original's next targets."""
    x, x1, _ = _clouds(n=20, m=20)
    drift = SinkhornDrift(step_size, sinkhorn=EXACT)
    drift.targets(x, x1)
    copy = pickle.loads(pickle.dumps(drift))
    assert copy.n_calls == 1
    torch.testing.assert_close(copy.targets(x, x1), drift.targets(x, x1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- classes
def _two_classes():
    """Data of class 0 around (-3, 0) and class 1 around (3, 0); generated samples of class 0 sit near class 1."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(60, 2, generator=g, dtype=torch.float64) * 0.5
    y1 = torch.arange(60) % 2
    x1[:, 0] += torch.where(y1 == 0, -3.0, 3.0).double()
    x = torch.randn(40, 2, generator=g, dtype=torch.float64) * 0.5
    y = torch.arange(40) % 2
    x[:, 0] += 2.5  # every generated sample starts by class 1's data
    return x, x1, y, y1


def test_class_conditional_targets_stay_in_their_class_hull():
    x, x1, y, y1 = _two_classes()
    drift = SinkhornDrift(
        1.0, sinkhorn=EXACT, self_term="none"
    )  # target = T_{q->p}(x): inside the data's hull
    targets = drift.targets(x, x1, y=y, y1=y1)
    for c in (0, 1):
        hull = Delaunay(x1[y1 == c].numpy())
        assert (hull.find_simplex(targets[y == c].numpy()) >= 0).all()
    # Without labels the class-0 samples go to the nearer class-1 data: the test above can fail.
    pooled = drift.targets(x, x1)
    assert (Delaunay(x1[y1 == 0].numpy()).find_simplex(pooled[y == 0].numpy()) < 0).mean() > 0.5


@pytest.mark.parametrize("column", [False, True], ids=["labels(n,)", "labels(n,1)"])
@pytest.mark.parametrize("self_term", ["same", "independent"])
def test_class_conditional_velocity_is_the_per_class_reference(self_term, column):
    # labels of shape (n, 1), as every guided matcher call takes them, are the same labels
    x, x1, y, y1 = _two_classes()
    xs, ys = x.flip(0) + 0.1, y.flip(0)
    shaped = (lambda lab: lab[:, None]) if column else (lambda lab: lab)
    kw = {"x_self": xs, "y_self": shaped(ys)} if self_term == "independent" else {}
    v = SinkhornDrift(sinkhorn=EXACT, self_term=self_term).velocity(x, x1, y=shaped(y), y1=shaped(y1), **kw)
    for c in (0, 1):
        ref = _pot_velocity(x[y == c], x1[y1 == c], BLUR, self_term, xs[ys == c])
        assert rel_err(v[y == c], ref) <= 1e-6


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_gradient_moves_the_generator_towards_the_targets():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    z, x1, _ = _clouds(n=64, m=64)
    drift = SinkhornDrift(1.0, sinkhorn=EXACT)
    x = net(z)
    loss = drift.loss(x, x1)
    targets = drift.targets(x, x1)
    assert float(loss.detach()) == pytest.approx(float(((x.detach() - targets) ** 2).mean()), rel=1e-9)
    # d loss / d x = -2 eta V / N with V the independent velocity
    (gx,) = torch.autograd.grad(drift.loss(x, x1), x, retain_graph=True)
    ref = _pot_velocity(x.detach(), x1, BLUR, "same")
    assert rel_err(gx, -2.0 * ref / x.numel()) <= 1e-6
    before = float(((net(z) - targets) ** 2).sum().detach())
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-2 * p.grad
    assert float(((net(z) - targets) ** 2).sum().detach()) < before


# ---------------------------------------------------------------------------------------------- input, state
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_kept_and_calls_do_not_leak(dtype):
    drift = SinkhornDrift(sinkhorn=SinkhornOptions(blur=0.3))
    x, x1, _ = _clouds(dtype=dtype)
    first = drift.targets(x, x1)
    assert first.dtype == dtype and first.device == x.device and first.shape == x.shape
    assert not first.requires_grad
    other = drift.targets(torch.randn(7, 3, dtype=torch.float64), torch.rand(9, 3, dtype=torch.float64))
    assert other.shape == (7, 3) and other.dtype == torch.float64
    torch.testing.assert_close(drift.targets(x, x1), first, rtol=0, atol=0)  # constant step: no state


def test_bad_input_raises_named_errors():
    x, x1, xs = _clouds()
    y, y1 = torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x1), dtype=torch.long)
    with pytest.raises(ValueError, match="self_term"):
        SinkhornDrift(self_term="other")
    with pytest.raises(TypeError, match="sinkhorn"):
        SinkhornDrift(sinkhorn={"blur": 0.1})
    for bad, err in (
        (0.0, ValueError),
        (-1.0, ValueError),
        ([], ValueError),
        ("1", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(err, match="step_size"):
            SinkhornDrift(bad)
    with pytest.raises(ValueError, match=r"step_size\(0\)"):
        SinkhornDrift(lambda k: float("nan")).targets(x, x1)
    drift = SinkhornDrift()
    with pytest.raises(ValueError, match="x1"):
        drift.targets(x, x1[:, :1])
    with pytest.raises(ValueError, match="x contains NaN"):
        drift.targets(x * float("nan"), x1)
    with pytest.raises(ValueError, match="x_self"):
        drift.targets(x, x1, x_self=xs)
    with pytest.raises(ValueError, match="x_self is required"):
        SinkhornDrift(self_term="independent").targets(x, x1)
    with pytest.raises(ValueError, match="y1"):
        drift.targets(x, x1, y=y)
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        drift.targets(x, x1, y=y + 3 * (torch.arange(len(x)) == 0), y1=y1)
    with pytest.raises(ValueError, match="y_self"):
        SinkhornDrift(self_term="independent").targets(x, x1, y=y, y1=y1, x_self=xs)
    with pytest.raises(TypeError, match="y must hold integer"):
        drift.targets(x, x1, y=y.double(), y1=y1)
    assert drift.n_calls == 0  # refused calls are not counted


def test_load_state_dict_refuses_foreign_dicts():
    drift = SinkhornDrift()
    with pytest.raises(ValueError, match="not a SinkhornDrift state"):
        drift.load_state_dict({"calls": 3, "flows": 1})
    with pytest.raises(ValueError, match="non-negative int"):
        drift.load_state_dict({"kind": "SinkhornDrift", "calls": -1})
    with pytest.raises(TypeError, match="state must be a dict"):
        drift.load_state_dict([("calls", 1)])


# ---------------------------------------------------------------------------------------------- sharded
SPLIT, DATA_SPLIT = (30, 26), (20, 34)


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, x1, xs = _clouds(n=sum(SPLIT), m=sum(DATA_SPLIT), n_self=sum(SPLIT))
        y, y1 = torch.arange(len(x)) % 2, torch.arange(len(x1)) % 2
        r, d = (
            slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])),
            slice(sum(DATA_SPLIT[:rank]), sum(DATA_SPLIT[: rank + 1])),
        )
        options = SinkhornOptions(blur=0.4, tol=1e-9, max_iter=20_000, distributed=True)
        res = {
            "same": SinkhornDrift(sinkhorn=options).velocity(x[r], x1[d]),
            "independent": SinkhornDrift(sinkhorn=options, self_term="independent").velocity(
                x[r], x1[d], x_self=xs[r]
            ),
            "classes": SinkhornDrift(sinkhorn=options).velocity(x[r], x1[d], y=y[r], y1=y1[d]),
        }
        torch.save(res, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_drift_equals_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, x1, xs = _clouds(n=sum(SPLIT), m=sum(DATA_SPLIT), n_self=sum(SPLIT))
    y, y1 = torch.arange(len(x)) % 2, torch.arange(len(x1)) % 2
    options = SinkhornOptions(blur=0.4, tol=1e-9, max_iter=20_000)
    ref = {
        "same": SinkhornDrift(sinkhorn=options).velocity(x, x1),
        "independent": SinkhornDrift(sinkhorn=options, self_term="independent").velocity(x, x1, x_self=xs),
        "classes": SinkhornDrift(sinkhorn=options).velocity(x, x1, y=y, y1=y1),
    }
    for key, value in ref.items():
        assert rel_err(torch.cat([r[key] for r in ranks]), value) <= 1e-8, key
    assert np.isfinite(float(ref["same"].norm()))


# ---------------------------------------------------------------------------------------------- 2D benchmark
def test_benchmark_generator_learns_a_two_dim_task():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from one_step import DriftSettings, train_drift

    from torchcfm_nsgf.datasets import get_task
    from torchcfm_nsgf.metrics import w2

    class Config:
        train_steps, time_budget_s, batch_size, lr, width = 50, None, 128, 3e-3, 64

    task = get_task("8gaussians-moons")
    sampler = train_drift(task, Config(), 0, DriftSettings(ema_decay=0.9))
    g = torch.Generator().manual_seed(5)
    x0, y = task.source(300, g), task.target(300, g)
    samples, nfe = sampler.sample(x0, 10, "dopri5")
    assert nfe == 1 and samples.shape == (300, 2) and sampler.n_opt_steps == 50
    assert w2(samples, y) < 0.3 * w2(x0, y)  # 0.59 against 2.88 when written


@pytest.mark.parametrize("backend", ["dense", "streaming", "multiscale"])
def test_every_backend_gives_the_pot_velocity(backend):
    x, x1, _ = _clouds()
    options = SinkhornOptions(blur=BLUR, relative_blur=False, tol=1e-9, max_iter=20_000, backend=backend)
    v = SinkhornDrift(sinkhorn=options).velocity(x, x1)
    assert rel_err(v, _pot_velocity(x, x1, BLUR, "same")) <= 1e-6
