"""torchcfm's call patterns on every matcher the package exports, in every pool mode and path.

Written from torchcfm's documented contract (``torchcfm.conditional_flow_matching``):
``sample_location_and_conditional_flow(x0, x1, t=None, return_noise=False) -> (t, xt, ut[, eps])`` with ``t``
of shape (bs,) drawn in [0, 1) like ``x0`` when not given and returned as given otherwise, ``xt = mu_t +
sigma * eps``; ``compute_lambda(t) = 2 sigma_t / (sigma^2 + 1e-8)`` weighting the SF2M score loss;
``guided_sample_location_and_conditional_flow(x0, x1, y0=None, y1=None, t=None, return_noise=False) ->
(t, xt, ut, y0, y1[, eps])``; a matcher survives pickling and ``deepcopy`` (DDP spawn). The references are
torchcfm's own ``ConditionalFlowMatcher`` (shapes, dtypes, devices) and the geometry of the paths: with
``sigma`` removed (``xt - sigma * eps``), a straight target's start ``xt - t ut`` is a row of the caller's
``x0``, whatever the pool mode.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

import torchcfm_nsgf
from torchcfm_nsgf import TrajectoryPool

MATCHERS = [
    getattr(torchcfm_nsgf, name)
    for name in torchcfm_nsgf.__all__
    if inspect.isclass(getattr(torchcfm_nsgf, name))
    and issubclass(getattr(torchcfm_nsgf, name), ConditionalFlowMatcher)
]
POOLS = ["auto", None, "caller"]
SHAPES = [(1,), (2,), (1, 2), (3, 4, 5)]
SIGMAS = [0, 0.25, 1]  # int and float, as torchcfm's users pass them


def _paths(cls) -> list[str]:
    return list(torchcfm_nsgf.PATHS) if "path" in inspect.signature(cls).parameters else ["straight"]


CASES = [(cls, pool, path) for cls in MATCHERS for pool in POOLS for path in _paths(cls)]


def _ids(case) -> str:
    cls, pool, path = case
    return f"{cls.__name__}-{pool}-{path}"


def _make(cls, pool, path, sigma=0.0, seed=0):
    # refresh_every=2: two calls after construction are served from a flow of the pool, the next one refreshes
    kwargs = {"path": path, "flow_steps": 2} if "path" in inspect.signature(cls).parameters else {}
    pool = TrajectoryPool(10_000, generator=torch.Generator().manual_seed(seed)) if pool == "caller" else pool
    return cls(sigma, pool=pool, refresh_every=2, generator=torch.Generator().manual_seed(seed), **kwargs)


def _batch(shape, n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(dtype), (3 + torch.randn(n, *shape, generator=g)).to(dtype)


def _like_torchcfm(ours, x0, x1, **kwargs):
    if kwargs.get("t") is not None:  # a given t comes back in x0's dtype and on its device (documented)
        kwargs["t"] = kwargs["t"].to(x0)
    theirs = ConditionalFlowMatcher(0.1).sample_location_and_conditional_flow(x0, x1, **kwargs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
        assert bool(torch.isfinite(a).all())


def _starts_are_rows_of(x0, t, xt, ut, sigma, eps):
    """Straight targets: ``xt - sigma eps - t ut`` is a row of ``x0`` (the particle the segment starts at)."""
    mu = xt - sigma * eps
    start = (mu - t.reshape(-1, *[1] * (xt.dim() - 1)) * ut).flatten(1).double()
    distance = torch.cdist(start, x0.flatten(1).double()).min(1).values
    assert float(distance.max()) < 1e-4


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torchcfm_call_patterns(case):
    cls, pool, path = case
    for i, shape in enumerate(SHAPES):
        sigma = SIGMAS[i % len(SIGMAS)]
        fm = _make(cls, pool, path, sigma)
        x0, x1 = _batch(shape, seed=i)
        for _ in range(2):  # t drawn: U[0, 1) (the grid k/T for "grid"), x0's dtype and device
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            _like_torchcfm((t, xt, ut), x0, x1)
            assert bool(((t >= 0) & (t < 1)).all())
            if path == "grid":
                assert torch.allclose(t * fm.flow_steps, (t * fm.flow_steps).round(), atol=1e-5)
        given = torch.rand(x0.shape[0], generator=torch.Generator().manual_seed(i))
        given[0], given[-1] = 0.0, 1.0
        t, xt, ut, eps = fm.sample_location_and_conditional_flow(x0, x1, t=given, return_noise=True)
        _like_torchcfm((t, xt, ut, eps), x0, x1, t=given, return_noise=True)
        assert torch.equal(t, given)  # returned as given
        if path == "straight":
            _starts_are_rows_of(x0, t, xt, ut, sigma, eps)
        lam = fm.compute_lambda(t)  # SF2M: loss = mean((lambda_t * s(t, xt) + eps)^2)
        assert lam.shape == t.shape
        torch.testing.assert_close(lam, torch.full_like(t, 2 * sigma / (sigma**2 + 1e-8)))
        score_loss = torch.mean((lam.reshape(-1, *[1] * len(shape)) * torch.zeros_like(xt) + eps) ** 2)
        assert torch.isfinite(score_loss)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_double_and_mixed_dtypes_follow_torchcfm(case):
    fm = _make(*case)
    for d0, d1 in [(torch.float64, torch.float64), (torch.float32, torch.float64)]:
        if fm.pool is not None:
            fm.reset()
        x0, x1 = _batch((2,))
        x0, x1 = x0.to(d0), x1.to(d1)
        _like_torchcfm(fm.sample_location_and_conditional_flow(x0, x1), x0, x1)
        t = torch.linspace(0, 1, 8, dtype=d1)
        out = fm.sample_location_and_conditional_flow(x0, x1, t=t)
        _like_torchcfm(out, x0, x1, t=t)
        assert torch.equal(out[0], t.to(d0))


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("column", [False, True], ids=["labels(n,)", "labels(n,1)"])
def test_guided_labels_come_back_in_the_shape_given(case, column):
    fm = _make(*case)
    y = torch.arange(12) % 3
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(12, 2, generator=g)
    x1 = 4 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])[y] + 0.3 * torch.randn(12, 2, generator=g)
    y1 = y[:, None] if column else y
    shape = (12, 1) if column else (12,)
    for t in (None, torch.rand(12, generator=torch.Generator().manual_seed(0))):
        t_out, xt, ut, y0_out, y1_out = fm.guided_sample_location_and_conditional_flow(x0, x1, y1=y1, t=t)
        assert y0_out is None and y1_out.shape == shape and y1_out.dtype == y1.dtype
        assert xt.shape == ut.shape == (12, 2) and t_out.shape == (12,)
        # every served row flows towards its class: the end point X_T = xt + (1 - t) ut (straight paths)
        if case[2] == "straight":
            ends = xt + (1 - t_out)[:, None] * ut
            centres = torch.stack([x1[y == c].mean(0) for c in range(3)])
            nearest = torch.cdist(ends, centres).argmin(1)
            assert (nearest == y1_out.flatten()).float().mean() > 0.7
    if case[1] is None:  # y0 given (no pool: the caller's rows are the particles)
        y0 = y1.flip(0).to(torch.int32)  # torchcfm returns y0 in its own dtype, whatever y1's
        out = fm.guided_sample_location_and_conditional_flow(x0, x1, y0=y0, y1=y1, return_noise=True)
        assert len(out) == 6 and out[3].shape == out[4].shape == shape and out[3].dtype == torch.int32
        if case[2] == "straight":  # row i is the particle x0[i], of class y0[i]
            assert torch.equal(out[3], y0)
        else:  # rows are segments drawn at random, each of its particle's class
            assert set(out[3].flatten().tolist()) <= set(y0.flatten().tolist())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pickle_and_deepcopy_mid_training_continue_as_the_original(case):
    fm = _make(*case, sigma=0.1)
    x0, x1 = _batch((1, 2))
    for _ in range(2):
        fm.sample_location_and_conditional_flow(x0, x1)
    copies = [copy.deepcopy(fm), pickle.loads(pickle.dumps(fm))]
    expected = [fm.sample_location_and_conditional_flow(x0, x1, return_noise=True) for _ in range(2)]
    for other in copies:
        got = [other.sample_location_and_conditional_flow(x0, x1, return_noise=True) for _ in range(2)]
        for a, b in zip(expected, got, strict=True):
            for u, v in zip(a, b, strict=True):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
        assert (other.n_calls, other.n_flows) == (fm.n_calls, fm.n_flows)


def test_validation_batches_between_training_batches_do_not_warn_or_drift():
    # the runner sends validation batches through the same matcher
    for cls in MATCHERS:
        fm = cls(generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(12):
                x0, x1 = _batch((2,), n=64, seed=step)
                fm.sample_location_and_conditional_flow(x0, x1)
                if step % 4 == 3:
                    v0, v1 = _batch((2,), n=16, seed=100 + step)
                    fm.sample_location_and_conditional_flow(v0, v1)
