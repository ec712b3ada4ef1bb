"""The trajectory pool at image scale: bounded memory over a long fill, float16, disk round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pool_mod = pytest.importorskip("torchcfm_nsgf.pool")
TrajectoryPool = pool_mod.TrajectoryPool


def _flow_batch(gen: torch.Generator, k: int, shape=(3, 32, 32)):
    x = torch.randn((k, *shape), generator=gen)
    v = torch.randn((k, *shape), generator=gen)
    t = torch.rand(k, generator=gen)
    return t, x, v


def test_pool_bytes_stay_under_the_bound_over_a_long_fill():
    max_bytes = 1_000_000
    pool = TrajectoryPool(10**9, max_bytes=max_bytes, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    per_item = 4 + 2 * 3 * 32 * 32 * 2  # t in float32, x and v in float16
    for _ in range(100):  # 100 flows of 16 particles: 1600 items offered, 81 fit
        pool.add(*_flow_batch(gen, 16))
        assert pool.nbytes <= max_bytes
        assert len(pool) <= pool.capacity
    assert pool.capacity == max_bytes // per_item
    assert len(pool) == pool.capacity == 81 and pool.n_added == 1600
    t, xt, ut = pool.sample(32)
    assert xt.shape == (32, 3, 32, 32) and xt.dtype == torch.float32
    # float16 storage is half the memory of float32 for the same items
    wide = TrajectoryPool(10**9, max_bytes=max_bytes, dtype=torch.float32)
    wide.add(*_flow_batch(gen, 16))
    assert wide.capacity == max_bytes // (4 + 2 * 3 * 32 * 32 * 4) < pool.capacity


def test_disk_pool_round_trips_images(tmp_path):
    gen = torch.Generator().manual_seed(1)
    pool = TrajectoryPool(100, dtype=torch.float16, storage="disk", path=tmp_path / "pool")
    tx, x, vx = _flow_batch(gen, 80, shape=(1, 28, 28))
    ty, y, vy = _flow_batch(gen, 40, shape=(1, 28, 28))
    pool.add(tx, x, vx)
    pool.add(ty, y, vy)  # a ring buffer of 100 slots: y[:20] fills slots 80-99, y[20:] overwrites 0-19
    pool.flush()
    expected = torch.cat([y[20:], x[20:], y[:20]]).half()
    # the file, read without the pool's code, holds exactly these float16 values
    raw = np.fromfile(tmp_path / "pool" / "xt.bin", dtype=np.float16).reshape(100, 1, 28, 28)
    assert np.array_equal(raw, expected.numpy())

    reopened = TrajectoryPool.open(tmp_path / "pool", generator=torch.Generator().manual_seed(5))
    assert len(reopened) == 100 and reopened.n_added == 120
    t, xt, ut = reopened.sample(100)  # all items, in random order: compare as sets of rows
    order = torch.argsort(t)
    t_all = torch.cat([ty[20:], tx[20:], ty[:20]])
    ref = torch.argsort(t_all)
    assert torch.equal(t[order], t_all[ref])
    assert torch.equal(xt[order], expected[ref].float())
    assert torch.equal(ut[order], torch.cat([vy[20:], vx[20:], vy[:20]]).half()[ref].float())
