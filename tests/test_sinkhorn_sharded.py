"""Sinkhorn solves sharded over two CPU processes (gloo) against the same solves in one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import rel_err

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions, sinkhorn_solve

SPLIT = (70, 50)  # particles per rank: unequal on purpose
TARGET_SPLIT = (40, 65)
BLUR = 0.3


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 2, generator=g, dtype=torch.float64)
    y = torch.rand(sum(TARGET_SPLIT), 2, generator=g, dtype=torch.float64) * 2 + 1
    return x, y


def _labels():
    """Classes 0, 1, 2 in turn, of the particles and of the targets."""
    return torch.arange(sum(SPLIT)) % 3, torch.arange(sum(TARGET_SPLIT)) % 3


def _flow(x, y, steps: int, **kw):
    sol, out = None, []
    for _ in range(steps):
        sol = sinkhorn_solve(x, y, blur=BLUR, warm_start=sol, **kw)
        out.append(sol)
        x = x + sol.velocity
    return x, out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _data()
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        ylo, yhi = sum(TARGET_SPLIT[:rank]), sum(TARGET_SPLIT[: rank + 1])
        xr, yr = x[lo:hi], y[ylo:yhi]
        res = {}
        for backend in ("dense", "streaming"):
            sol = sinkhorn_solve(xr, yr, blur=BLUR, tol=1e-8, backend=backend, distributed=True)
            res[backend] = (sol.velocity, sol.g_xy, sol.n_iter, sol.n_anneal, sol.backend)
        x_end, sols = _flow(xr, yr, 2, distributed=True)
        res["flow"] = (x_end, [s.n_iter for s in sols])
        # Default options through SinkhornOptions (relative blur from the gathered targets).
        opts = SinkhornOptions(distributed=True)
        res["options"] = opts.solve(xr, yr, blur=opts.absolute_blur(y)).velocity
        res["default"] = sinkhorn_solve(xr, yr, distributed=True).velocity
        # The matcher's sharded flow: relative blur and warm-start decisions from all processes' data.
        fm = SinkhornFlowMatcher(sinkhorn=SinkhornOptions(distributed=True, tol=1e-8), flow_steps=3)
        traj = fm.simulate(xr, yr * (1.0 + 2.0 * rank))  # local spreads differ on purpose
        res["matcher"] = (traj.xs, fm.blur, traj.n_iters)
        # Class-conditional: one collective solve per class, every class on both processes.
        fm = SinkhornFlowMatcher(sinkhorn=SinkhornOptions(distributed=True, tol=1e-6), flow_steps=2)
        y0, y1 = _labels()
        traj, labels = fm.simulate_guided(xr, yr, y1[ylo:yhi], y0[lo:hi])
        res["guided"] = (traj.xs, labels)
        # Rank 1's particles all of class 0: classes 1 and 2 would have a solve on rank 0 alone.
        y0_partial = y0[lo:hi] if rank == 0 else torch.zeros(hi - lo, dtype=torch.long)
        try:
            fm.simulate_guided(xr, yr, y1[ylo:yhi], y0_partial)
            res["partial"] = None
        except ValueError as err:
            res["partial"] = str(err)
        torch.save(res, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    path = str(tmp_path_factory.mktemp("sharded"))
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return [torch.load(os.path.join(path, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("backend", ["dense", "streaming"])
def test_sharded_solve_equals_single_process(sharded, backend):
    x, y = _data()
    ref = sinkhorn_solve(x, y, blur=BLUR, tol=1e-8, backend=backend)
    v = torch.cat([r[backend][0] for r in sharded])
    assert rel_err(v, ref.velocity) <= 1e-10
    for r in sharded:
        torch.testing.assert_close(r[backend][1], ref.g_xy, rtol=0, atol=1e-10 * BLUR**2)
        assert r[backend][2:4] == (ref.n_iter, ref.n_anneal)  # the same stopping decisions
        assert r[backend][4] == "sharded-" + backend


def test_sharded_flow_equals_single_process(sharded):
    x, y = _data()
    x_end, sols = _flow(x, y, 2)
    assert rel_err(torch.cat([r["flow"][0] for r in sharded]), x_end) <= 1e-10
    assert all(r["flow"][1] == [s.n_iter for s in sols] for r in sharded)


def test_sharded_defaults_use_the_gathered_target(sharded):
    x, y = _data()
    ref = sinkhorn_solve(x, y)
    assert rel_err(torch.cat([r["default"] for r in sharded]), ref.velocity) <= 1e-10
    assert rel_err(torch.cat([r["options"] for r in sharded]), ref.velocity) <= 1e-10


def test_sharded_matcher_flow_equals_single_process(sharded):
    # Each process passes its own targets; the flow's target (and its relative blur) is all of them.
    x, y = _data()
    y_all = torch.cat([y[: TARGET_SPLIT[0]], y[TARGET_SPLIT[0] :] * 3.0])
    fm = SinkhornFlowMatcher(sinkhorn=SinkhornOptions(tol=1e-8), flow_steps=3)
    traj = fm.simulate(x, y_all)
    assert all(r["matcher"][1] == pytest.approx(fm.blur, rel=1e-12) for r in sharded)
    assert rel_err(torch.cat([r["matcher"][0] for r in sharded], dim=1), traj.xs) <= 1e-9
    assert all(r["matcher"][2] == traj.n_iters for r in sharded)


def test_sharded_guided_flow_equals_single_process(sharded):
    x, y = _data()
    y0, y1 = _labels()
    fm = SinkhornFlowMatcher(sinkhorn=SinkhornOptions(tol=1e-6), flow_steps=2)
    traj, labels = fm.simulate_guided(x, y, y1, y0)
    assert rel_err(torch.cat([r["guided"][0] for r in sharded], dim=1), traj.xs) <= 1e-9
    assert torch.equal(torch.cat([r["guided"][1] for r in sharded]), labels)


def test_sharded_guided_flow_with_a_class_missing_on_one_process_raises_everywhere(sharded):
    # Without the check, rank 0 would wait forever in the solves of classes 1 and 2.
    for r in sharded:
        assert r["partial"] is not None and "classes [1, 2]" in r["partial"]


def test_distributed_needs_an_initialised_group():
    x, y = _data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        sinkhorn_solve(x, y, blur=BLUR, distributed=True)
