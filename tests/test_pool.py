"""TrajectoryPool: capacity, FIFO eviction against a deque, storage dtype/bytes, disk round trips."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from torchcfm_nsgf.pool import TrajectoryPool

N_IDS = 4096  # ids are integers < N_IDS, stored exactly in t = id / N_IDS and in xt[..., 0] = id


def _batch(ids: list[int], dim: tuple[int, ...] = (3,), dtype: torch.dtype = torch.float32):
    """Items whose t, xt and ut all encode their id, so that misaligned rows are detected."""
    ids_t = torch.tensor(ids, dtype=torch.float64)
    t = (ids_t / N_IDS).to(torch.float32)
    xt = ids_t.reshape(-1, *([1] * len(dim))).expand(-1, *dim).clone().to(dtype)
    ut = -xt
    return t, xt, ut


def _all_ids(pool: TrajectoryPool) -> list[int]:
    """Every id in the pool (sample of the whole pool), after checking t, xt, ut agree row by row."""
    t, xt, ut = pool.sample(len(pool), dtype=torch.float64)
    ids_from_t = torch.round(t * N_IDS)
    flat = xt.reshape(len(pool), -1)
    assert torch.equal(flat, ids_from_t[:, None].expand_as(flat))
    assert torch.equal(ut, -xt)
    ids = ids_from_t.long().tolist()
    assert len(set(ids)) == len(ids), "a full-pool sample must not repeat items"
    return sorted(ids)


def test_capacity_never_exceeded_and_fifo_matches_a_deque():
    gen = torch.Generator().manual_seed(0)
    pool = TrajectoryPool(37, generator=gen)
    reference = collections.deque(maxlen=37)  # independent FIFO model
    next_id = 0
    for step in range(60):
        k = int(torch.randint(1, 50, (1,), generator=torch.Generator().manual_seed(step)))
        ids = list(range(next_id, next_id + k))
        next_id += k
        pool.add(*_batch(ids))
        reference.extend(ids)
        assert len(pool) == len(reference) <= pool.capacity == 37
        assert pool.n_added == next_id
        if step % 7 == 0:
            assert _all_ids(pool) == sorted(reference)
    assert _all_ids(pool) == list(range(next_id - 37, next_id))


def test_batch_larger_than_capacity_keeps_the_most_recent_items():
    pool = TrajectoryPool(10)
    pool.add(*_batch(list(range(3))))
    pool.add(*_batch(list(range(100, 125))))
    assert len(pool) == 10
    assert _all_ids(pool) == list(range(115, 125))
    pool.add(*_batch([7, 8]))  # the two oldest (115, 116) go
    assert _all_ids(pool) == [7, 8] + list(range(117, 125))


def test_scalar_time_is_shared_by_the_batch():
    pool = TrajectoryPool(8)
    pool.add(0.25, torch.zeros(4, 2), torch.ones(4, 2))
    t, _, _ = pool.sample(4)
    assert torch.equal(t, torch.full((4,), 0.25))


def test_storage_dtype_and_sample_dtype_device():
    pool = TrajectoryPool(16, dtype=torch.float16, device="cpu")
    x = torch.randn(5, 3, dtype=torch.float64)
    pool.add(torch.rand(5, dtype=torch.float64), x, 2 * x)
    assert pool.dtype == torch.float16 and pool.device == torch.device("cpu")
    t, xt, ut = pool.sample(5)
    assert t.dtype == xt.dtype == ut.dtype == torch.float32  # half storage is returned as float32
    t, xt, ut = pool.sample(5, dtype=torch.float64)
    assert xt.dtype == torch.float64 and t.dtype == torch.float64
    # every stored row equals the float16 rounding of one added row
    stored = {tuple(row.tolist()) for row in xt}
    assert stored == {tuple(row.tolist()) for row in x.to(torch.float16).to(torch.float64)}

    inferred = TrajectoryPool(4)
    inferred.add(torch.rand(2, dtype=torch.float64), x[:2], x[:2])
    assert inferred.dtype == torch.float64
    assert inferred.sample(2)[1].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_storage_while_inputs_on_gpu():
    pool = TrajectoryPool(8, device="cpu")
    x = torch.randn(4, 3, device="cuda")
    pool.add(torch.rand(4, device="cuda"), x, x)
    assert pool.sample(4)[1].device.type == "cpu"
    assert pool.sample(4, device="cuda")[1].device.type == "cuda"


def test_nbytes_half_precision_halves_the_feature_buffers():
    capacity, dim = 64, (3, 8, 8)
    features = 3 * 8 * 8
    sizes = {}
    for dtype in (torch.float16, torch.float32):
        pool = TrajectoryPool(capacity, dtype=dtype)
        assert pool.nbytes == 0  # lazily allocated
        pool.add(*_batch([1, 2], dim=dim))
        sizes[dtype] = pool.nbytes
        assert sizes[dtype] == capacity * 4 + 2 * capacity * features * dtype.itemsize
    t_bytes = capacity * 4  # t is float32 in both
    assert 2 * (sizes[torch.float16] - t_bytes) == sizes[torch.float32] - t_bytes


def test_byte_bound_sets_the_effective_capacity():
    dim = (10,)
    per_item = 4 + 2 * 10 * 4
    pool = TrajectoryPool(1000, max_bytes=1000)
    pool.add(*_batch(list(range(30)), dim=dim))
    assert pool.capacity == 1000 // per_item == 11
    assert len(pool) == 11 and pool.nbytes <= 1000
    assert _all_ids(pool) == list(range(19, 30))

    roomy = TrajectoryPool(5, max_bytes=10**6)
    roomy.add(*_batch(list(range(30)), dim=dim))
    assert roomy.capacity == 5

    tiny = TrajectoryPool(10, max_bytes=per_item - 1)
    with pytest.raises(ValueError, match="max_bytes"):
        tiny.add(*_batch([0], dim=dim))


def test_same_seed_same_samples_and_different_seed_differs():
    def run(seed: int) -> list[torch.Tensor]:
        pool = TrajectoryPool(500, generator=torch.Generator().manual_seed(seed))
        pool.add(*_batch(list(range(300))))
        draws = [pool.sample(32)[0]]
        pool.add(*_batch(list(range(300, 700))))
        draws.append(pool.sample(400)[0])  # randperm branch
        return draws

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("batch", [5, 15])  # redraw-duplicates path and randperm path
def test_sample_is_uniform_without_replacement(batch):
    n, rounds = 20, 2000
    pool = TrajectoryPool(n, generator=torch.Generator().manual_seed(1))
    pool.add(*_batch(list(range(n))))
    counts = torch.zeros(n)
    for _ in range(rounds):
        ids = torch.round(pool.sample(batch)[0].double() * N_IDS).long()
        assert len(set(ids.tolist())) == batch
        counts += torch.bincount(ids, minlength=n)
    expected = rounds * batch / n  # binomial std about 19 for both batch sizes
    assert float((counts - expected).abs().max()) < 100


def test_state_dict_round_trip_samples_identically():
    pool = TrajectoryPool(50, dtype=torch.float16, generator=torch.Generator().manual_seed(5))
    pool.add(*_batch(list(range(70)), dim=(2, 2)))
    state = pool.state_dict()
    expected = [pool.sample(16) for _ in range(3)]

    restored = TrajectoryPool(999, generator=torch.Generator().manual_seed(123))
    restored.load_state_dict(state)
    assert len(restored) == 50 and restored.capacity == 50 and restored.dtype == torch.float16
    got = [restored.sample(16) for _ in range(3)]
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # eviction continues from the saved position: the next add evicts the oldest saved ids
    restored.add(*_batch([1000, 1001], dim=(2, 2)))
    assert _all_ids(restored) == list(range(22, 70)) + [1000, 1001]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_disk_pool_round_trips_exactly(tmp_path, dtype):
    gen = torch.Generator().manual_seed(2)
    pool = TrajectoryPool(30, dtype=dtype, storage="disk", path=tmp_path / "pool", generator=gen)
    x = torch.randn(40, 2, 3, generator=torch.Generator().manual_seed(0))
    t = torch.arange(40, dtype=torch.float32) / N_IDS
    pool.add(t[:25], x[:25], 3 * x[:25])
    pool.add(t[25:], x[25:], 3 * x[25:])
    assert len(pool) == 30
    files = ["t.bin", "xt.bin", "ut.bin"]
    assert pool.nbytes == sum(os.path.getsize(tmp_path / "pool" / f) for f in files)
    assert pool.nbytes == 30 * 4 + 2 * 30 * 6 * dtype.itemsize

    st, sx, su = pool.sample(30, dtype=dtype)
    ids = torch.round(st.double() * N_IDS).long()
    assert sorted(ids.tolist()) == list(range(10, 40))  # FIFO kept the last 30
    assert torch.equal(sx, x[ids].to(dtype))  # bit-exact in the storage dtype
    assert torch.equal(su, (3 * x[ids]).to(dtype))


def test_disk_pool_reopens_from_state_dict_and_from_path(tmp_path):
    path = tmp_path / "replay"
    pool = TrajectoryPool(12, dtype=torch.float16, storage="disk", path=path)
    pool.add(*_batch(list(range(20)), dim=(1, 2, 2)))
    state = pool.state_dict()
    assert "xt" not in state and state["path"] == os.fspath(path)
    before = _all_ids(pool)
    del pool

    reopened = TrajectoryPool(12, storage="disk", path=path)
    reopened.load_state_dict(state)
    assert _all_ids(reopened) == before == list(range(8, 20))
    reopened.add(*_batch([500], dim=(1, 2, 2)))  # evicts id 8
    del reopened

    from_path = TrajectoryPool.open(path)
    assert from_path.feature_shape == (1, 2, 2) and from_path.dtype == torch.float16
    assert _all_ids(from_path) == list(range(9, 20)) + [500]

    with pytest.warns(UserWarning, match="overwriting"):
        fresh = TrajectoryPool(4, storage="disk", path=path)
        fresh.add(*_batch([1], dim=(1, 2, 2)))
    assert _all_ids(fresh) == [1]


def test_clear_empties_but_keeps_the_buffers():
    pool = TrajectoryPool(8)
    pool.add(*_batch([1, 2, 3]))
    allocated = pool.nbytes
    pool.clear()
    assert len(pool) == 0 and pool.nbytes == allocated
    with pytest.raises(ValueError, match="batch_size"):
        pool.sample(1)
    pool.add(*_batch([4]))
    assert _all_ids(pool) == [4]


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="capacity"):
        TrajectoryPool(0)
    with pytest.raises(TypeError, match="capacity"):
        TrajectoryPool(2.5)
    with pytest.raises(ValueError, match="storage"):
        TrajectoryPool(4, storage="cloud")
    with pytest.raises(ValueError, match="path"):
        TrajectoryPool(4, storage="disk")
    with pytest.raises(ValueError, match="dtype"):
        TrajectoryPool(4, dtype=torch.int64)

    pool = TrajectoryPool(4)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="ut"):
        pool.add(torch.zeros(3), x, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="t must have shape"):
        pool.add(torch.zeros(2), x, x)
    with pytest.raises(ValueError, match="xt"):
        pool.add(torch.zeros(3), torch.full((3, 2), float("nan")), x)
    with pytest.raises(ValueError, match="ut"):
        pool.add(torch.zeros(3), x, torch.full((3, 2), float("inf")))
    with pytest.raises(ValueError, match="t must lie"):
        pool.add(torch.full((3,), 1.5), x, x)
    with pytest.raises(TypeError, match="xt"):
        pool.add(torch.zeros(3), torch.zeros(3, 2, dtype=torch.int64), x)
    pool.add(torch.zeros(3), x, x)
    with pytest.raises(ValueError, match="xt has feature shape"):
        pool.add(torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="batch_size"):
        pool.sample(4)
    assert len(pool) == 3  # failed adds stored nothing

    half = TrajectoryPool(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="xt overflows"):
        half.add(torch.zeros(1), torch.full((1, 2), 1e6), torch.zeros(1, 2))
