"""The Sinkhorn backends against each other and against the float64 fixed point; the "auto" choice."""

from __future__ import annotations

import math

import pytest
import torch
from reference import fixed_point_velocity, rel_err

from torchcfm_nsgf import SinkhornOptions, sinkhorn_solve
from torchcfm_nsgf.sinkhorn import backends, choose_backend, multiscale
from torchcfm_nsgf.sinkhorn.keops import keops_available
from torchcfm_nsgf.sinkhorn.multiscale import MultiscaleBackend, kd_clusters
from torchcfm_nsgf.sinkhorn.solver import _schedule, anneal


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(n: int, m: int, d: int, seed: int = 0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.rand(m, d, generator=g, dtype=dtype) * 2 + 1.5
    return x, y


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows, so that every reduction runs over many of them."""
    monkeypatch.setattr(backends, "_TILE_ELEMS_CPU", 2048)


@pytest.mark.parametrize(
    "n,m,dim,blur",
    [(120, 90, (2,), 0.3), (64, 80, (50,), 2.0), (40, 48, (3, 4, 4), 2.0)],
)
def test_streaming_equals_dense(small_tiles, n, m, dim, blur):
    g = _gen(1)
    x, y = torch.randn(n, *dim, generator=g), torch.rand(m, *dim, generator=g) + 0.5
    dense = sinkhorn_solve(x, y, blur=blur, tol=1e-4, backend="dense")
    stream = sinkhorn_solve(x, y, blur=blur, tol=1e-4, backend="streaming")
    assert dense.backend == "dense" and stream.backend == "streaming"
    assert stream.n_anneal == dense.n_anneal and stream.n_iter == dense.n_iter
    # The same arithmetic row by row: equal to rounding (bit for bit where the cost is formed per coordinate).
    assert rel_err(stream.velocity, dense.velocity) <= 1e-5
    torch.testing.assert_close(stream.g_xy, dense.g_xy, rtol=1e-5, atol=1e-5 * blur**2)
    assert rel_err(dense.velocity, fixed_point_velocity(x, y, blur)) <= 1e-3


def test_streaming_weighted_float64_matches_reference(small_tiles):
    x, y = _problem(50, 40, 3, seed=2, dtype=torch.float64)
    g = _gen(3)
    a = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    dense = sinkhorn_solve(x, y, blur=1.0, a=a, b=b, tol=1e-10, backend="dense")
    stream = sinkhorn_solve(x, y, blur=1.0, a=a, b=b, tol=1e-10, backend="streaming")
    assert stream.converged
    assert rel_err(stream.velocity, dense.velocity) <= 1e-12


def test_streaming_warm_started_flow(small_tiles):
    x, y = _problem(100, 100, 2, seed=4)
    flows = {}
    for name in ("dense", "streaming"):
        xs, sol = x.clone(), None
        for _ in range(3):
            sol = sinkhorn_solve(xs, y, blur=0.3, warm_start=sol, backend=name)
            xs = xs + sol.velocity
        flows[name] = xs
    assert rel_err(flows["streaming"], flows["dense"]) <= 1e-5


def test_defaults_come_from_options():
    x, y = _problem(80, 60, 2, seed=5)
    opts = SinkhornOptions()
    sol = sinkhorn_solve(x, y)
    ref = opts.solve(x, y, blur=opts.absolute_blur(y))
    assert math.isclose(sol.eps, opts.absolute_blur(y) ** 2, rel_tol=1e-12)
    torch.testing.assert_close(sol.velocity, ref.velocity, rtol=0, atol=0)
    assert sol.marginal_error <= opts.tol
    assert SinkhornOptions(backend="streaming").solve(x, y, blur=0.5).backend == "streaming"


def test_choose_backend_rules():
    gib = 1 << 30
    assert choose_backend(256, 256, 2, "cpu", torch.float32) == "dense"
    assert choose_backend(512, 512, 3, "cpu", torch.float32) == "dense"
    assert choose_backend(1024, 1024, 2, "cpu", torch.float32) == "multiscale"
    assert choose_backend(1 << 16, 1 << 16, 2, "cpu", torch.float32, free_bytes=64 * gib) == "multiscale"
    assert choose_backend(1 << 16, 1 << 16, 3, "cpu", torch.float32, free_bytes=64 * gib) == "multiscale"
    # High dimension: dense while its two n x n matrices take at most half the free memory, then streaming.
    assert choose_backend(16384, 16384, 784, "cpu", torch.float32, free_bytes=5 * gib) == "dense"
    assert choose_backend(16384, 16384, 784, "cpu", torch.float32, free_bytes=4 * gib) == "streaming"
    assert choose_backend(16384, 16384, 784, "cpu", torch.float64, free_bytes=8 * gib) == "streaming"
    # Large n * m in d = 4 is not multiscale's.
    assert choose_backend(1 << 16, 1 << 16, 4, "cpu", torch.float32, free_bytes=gib) == "streaming"


def test_auto_records_its_choice(monkeypatch):
    x, y = _problem(60, 50, 2, seed=6)
    assert sinkhorn_solve(x, y, blur=0.5).backend == "dense"
    monkeypatch.setattr(backends, "available_memory", lambda device: 1 << 10)
    assert sinkhorn_solve(x, y, blur=0.5).backend == "streaming"


@pytest.mark.parametrize("bad,exc", [("sparse", ValueError), (3, TypeError)])
def test_bad_backend(bad, exc):
    x, y = _problem(10, 10, 2)
    with pytest.raises(exc, match="backend"):
        sinkhorn_solve(x, y, blur=0.5, backend=bad)
    with pytest.raises(exc, match="backend"):
        SinkhornOptions(backend=bad)


def test_kd_clusters_are_balanced_and_compact():
    x = torch.randn(1000, 2, generator=_gen(7))
    order, gid = kd_clusters(x, 5)
    counts = torch.bincount(gid, minlength=32)
    assert int(counts.min()) >= 31 and int(counts.max()) <= 32
    assert bool((gid.diff() >= 0).all())  # contiguous in the returned order
    assert sorted(order.tolist()) == list(range(1000))
    # Compact: the mean cluster radius is far below the cloud's.
    pts = x[order]
    cent = torch.zeros(32, 2).index_add_(0, gid, pts) / counts[:, None]
    radius = (pts - cent[gid]).norm(dim=1).mean()
    assert float(radius) < 0.3 * float(x.norm(dim=1).mean())


@pytest.fixture
def small_clusters(monkeypatch):
    monkeypatch.setattr(MultiscaleBackend, "cluster_size", 8)
    monkeypatch.setattr(MultiscaleBackend, "max_clusters", 32)


@pytest.mark.parametrize("d,blur", [(2, 0.25), (3, 0.4), (1, 0.2)])
def test_multiscale_matches_dense(small_clusters, d, blur):
    x, y = _problem(300, 260, d, seed=8, dtype=torch.float64)
    y = y * torch.linspace(0.5, 1.5, d, dtype=torch.float64)  # anisotropic target
    dense = sinkhorn_solve(x, y, blur=blur, tol=1e-6, max_iter=5000, backend="dense")
    multi = sinkhorn_solve(x, y, blur=blur, tol=1e-6, max_iter=5000, backend="multiscale")
    assert multi.backend == "multiscale" and multi.converged
    assert rel_err(multi.velocity, dense.velocity) <= 1e-4
    assert rel_err(multi.proj_x, dense.proj_x) <= 1e-5


def test_multiscale_default_tolerance(small_clusters):
    x, y = _problem(800, 700, 2, seed=9)
    sol = sinkhorn_solve(x, y, blur=0.2, backend="multiscale")
    ref = sinkhorn_solve(x, y, blur=0.2, tol=1e-4, backend="dense")
    assert sol.converged and sol.marginal_error <= 1e-2
    assert rel_err(sol.velocity, ref.velocity) <= 2e-2


def test_multiscale_truncation_drops_most_cluster_pairs(monkeypatch):
    # Many small clusters against a small blur: most cluster pairs carry no mass.
    monkeypatch.setattr(MultiscaleBackend, "cluster_size", 8)
    x, y = _problem(2048, 2048, 2, seed=10)
    center = x.mean(0)
    log_w = torch.full((2048,), -math.log(2048))
    be = MultiscaleBackend(x - center, y - center, log_w, log_w, eps=0.01)
    assert be.cx.k == 256
    g, p, n_anneal = be.start(lambda: _schedule(be.max_cost(), 0.01, 0.9), anneal, None)
    assert g.shape == (2048,) and p.shape == (2048,) and n_anneal > 0
    kept = be.kept_fraction()
    assert 0.0 < max(kept.values()) < 0.3, kept


def test_multiscale_rejects_high_dimension():
    x, y = _problem(20, 20, 4)
    with pytest.raises(ValueError, match="d <= 3"):
        sinkhorn_solve(x, y, blur=0.5, backend="multiscale")


@pytest.mark.skipif(not keops_available(), reason="needs pykeops (the optional keops extra)")
def test_keops_equals_dense():
    x, y = _problem(150, 120, 2, seed=11, dtype=torch.float64)
    dense = sinkhorn_solve(x, y, blur=0.3, tol=1e-8, backend="dense")
    keops = sinkhorn_solve(x, y, blur=0.3, tol=1e-8, backend="keops")
    assert keops.backend == "keops"
    assert rel_err(keops.velocity, dense.velocity) <= 1e-9


@pytest.mark.skipif(keops_available(), reason="pykeops is installed")
def test_keops_missing_is_a_clear_error():
    x, y = _problem(10, 10, 2)
    with pytest.raises(ImportError, match="pykeops"):
        sinkhorn_solve(x, y, blur=0.5, backend="keops")


def _lse_softmin64(rows, cols, h, eps):
    """float64 reference of the soft-min over all columns."""
    c = 0.5 * torch.cdist(rows.double(), cols.double()) ** 2
    return -eps * torch.logsumexp(h.double()[None, :] - c / eps, dim=1)


@pytest.mark.parametrize("backend_cls", [backends.DenseBackend, backends.StreamingBackend])
def test_softmin_with_underflowing_entries_matches_float64(small_tiles, backend_cls):
    # A small eps puts most exponents far below exp's underflow threshold (the clamped fast path), and a
    # zero-weight column (log weight -inf) must still carry no mass.
    x, y = _problem(70, 90, 2, seed=12)
    log_a = torch.full((70,), -math.log(70))
    log_b = torch.full((90,), -math.log(89))
    log_b[5] = -math.inf
    be = backend_cls(x, y, log_a, log_b)
    eps = 1e-3
    g = torch.randn(90, generator=_gen(13)) * 0.1
    for pair, rows, cols, h in (("xy", x, y, log_b + g / eps), ("yx", y, x, log_a + g[:70] / eps)):
        out = be.softmin(pair, h, eps)
        ref = _lse_softmin64(rows, cols, h, eps)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * eps * 100)
    proj, _ = be.project("xy", log_b + g / eps, eps)
    w = torch.softmax(
        (log_b + g / eps).double()[None, :] - 0.5 * torch.cdist(x.double(), y.double()) ** 2 / eps, 1
    )
    torch.testing.assert_close(proj.double(), w @ y.double(), rtol=1e-5, atol=1e-5)


def test_dense_column_softmin_equals_streaming(small_tiles):
    # The dense "yx" soft-min reduces row tiles of C_xy along columns; streaming recomputes C_yx rows.
    x, y = _problem(130, 75, 3, seed=14)
    log_a = torch.full((130,), -math.log(130))
    log_b = torch.full((75,), -math.log(75))
    h = log_a + torch.randn(130, generator=_gen(15)) * 3
    dense = backends.DenseBackend(x, y, log_a, log_b).softmin("yx", h, 0.05)
    stream = backends.StreamingBackend(x, y, log_a, log_b).softmin("yx", h, 0.05)
    torch.testing.assert_close(dense, stream, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.double(), _lse_softmin64(y, x, h, 0.05), rtol=1e-5, atol=1e-6)


def test_multiscale_shifted_reductions_equal_the_maximum_shift(small_clusters, monkeypatch):
    # The first reduction over a truncation shifts by row maxima; later ones by the previous result
    # folded into the product, with a fallback when that shift is far off. All give the same numbers.
    monkeypatch.setattr(multiscale, "_TILE_ELEMS", 4096)  # many chunks
    x, y = _problem(400, 380, 2, seed=16)
    center = x.mean(0)
    la, lb = torch.full((400,), -math.log(400)), torch.full((380,), -math.log(380))
    be = MultiscaleBackend(x - center, y - center, la, lb, eps=0.05)
    g, p, _ = be.start(lambda: _schedule(be.max_cost(), 0.05, 0.9), anneal, None)
    h = lb + g / 0.05
    pair = be.pairs["xy"]
    pair._prev = None
    first, proj_first = pair.reduce(h, 0.05, project=True)
    again, proj_again = pair.reduce(h, 0.05, project=True)  # shift folded into the product
    assert pair.redone_chunks == 0 and len(pair.chunks) > 1
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj_again, proj_first, rtol=1e-5, atol=1e-5)
    pair._prev = pair._prev + 1e4  # a shift that would overflow: the chunks are redone with their maxima
    redone, _ = pair.reduce(h, 0.05, project=False)
    assert pair.redone_chunks == len(pair.chunks)
    torch.testing.assert_close(redone, first, rtol=1e-5, atol=1e-6)
    pair._prev = pair._prev - 2e4  # one that would underflow every entry
    redone, _ = pair.reduce(h, 0.05, project=False)
    assert pair.redone_chunks == 2 * len(pair.chunks)
    torch.testing.assert_close(redone, first, rtol=1e-5, atol=1e-6)
