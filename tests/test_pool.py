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


# ---------------------------------------------------------------- buffers that grow with the contents

BIG = (64, 64)  # float32 items of 4 + 2 * 4096 * 4 = 32_772 bytes: about 32 per MiB, so small pools grow
BIG_ITEM = 4 + 2 * 64 * 64 * 4
MIB = 2**20  # the first allocation holds about 1 MiB of items (at most 1 MiB, at least one item)


def _slots_of_files(path) -> list[int]:
    """Slots held by each of the t, xt, ut files of a disk pool of BIG float32 items."""
    return [
        os.path.getsize(path / "t.bin") // 4,
        os.path.getsize(path / "xt.bin") // (64 * 64 * 4),
        os.path.getsize(path / "ut.bin") // (64 * 64 * 4),
    ]


def test_nbytes_follows_the_items_held_not_the_capacity():
    per_item = 4 + 2 * 3 * 32 * 32 * 2  # float32 t + float16 xt, ut of a CIFAR image: 12_292 bytes
    full_size = 200_000 * per_item  # 2.46e9 bytes (2.3 GiB) at full capacity, never allocated here
    pool = TrajectoryPool(200_000, dtype=torch.float16)
    for start in range(0, 300, 100):
        pool.add(*_batch(list(range(start, start + 100)), dim=(3, 32, 32)))
        assert pool.capacity == 200_000
        # doubling: never more than twice what is held, or the 1 MiB first allocation
        assert len(pool) * per_item <= pool.nbytes <= max(2 * len(pool) * per_item, MIB)
    assert pool.nbytes <= 600 * per_item < full_size / 300
    assert _all_ids(pool) == list(range(300))


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_fifo_across_growth_and_wrap_around_matches_a_deque(tmp_path, storage):
    capacity = 200
    kwargs = {"storage": "disk", "path": tmp_path / "pool"} if storage == "disk" else {}
    pool = TrajectoryPool(capacity, **kwargs)
    reference = collections.deque(maxlen=capacity)
    sizes, next_id = [], 0
    # totals 1, 6, 36, 38, 78, 79, 149, 182, 272 (wraps), 279, 529 (batch > capacity), 532
    for k in [1, 5, 30, 2, 40, 1, 70, 33, 90, 7, 250, 3]:
        ids = list(range(next_id, next_id + k))
        next_id += k
        pool.add(*_batch(ids, dim=BIG))
        reference.extend(ids)
        assert len(pool) == len(reference)
        assert _all_ids(pool) == sorted(reference)
        bound = min(capacity * BIG_ITEM, max(2 * len(pool) * BIG_ITEM, MIB))
        assert len(pool) * BIG_ITEM <= pool.nbytes <= bound
        if storage == "disk":
            files = ["t.bin", "xt.bin", "ut.bin"]
            assert pool.nbytes == sum(os.path.getsize(tmp_path / "pool" / f) for f in files)
        sizes.append(pool.nbytes)
    assert sizes == sorted(sizes) and len(set(sizes)) >= 4  # grew several times, never shrank
    assert sizes[-1] == capacity * BIG_ITEM  # full: exactly the full-capacity size, no slack


def test_samples_follow_the_ring_slot_order_across_growth():
    """Item number j (no batch exceeds the capacity) sits in slot j % capacity, as in a preallocated ring:
    a full-pool sample (a random permutation of the slots) is reproducible from the generator alone."""
    capacity, seed = 150, 11
    pool = TrajectoryPool(capacity, generator=torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)  # replays the pool's generator
    slots = [-1] * capacity  # id held by each slot of a preallocated ring buffer
    next_id = 0
    for k in [3, 40, 25, 60, 90, 8]:  # grows 31 -> 62 -> 124 -> 150, then wraps
        ids = list(range(next_id, next_id + k))
        next_id += k
        pool.add(*_batch(ids, dim=BIG))
        for i in ids:
            slots[i % capacity] = i
        perm = torch.randperm(len(pool), generator=replay)
        t = pool.sample(len(pool))[0]
        assert torch.round(t.double() * N_IDS).long().tolist() == [slots[p] for p in perm.tolist()]


def test_state_dict_mid_growth_round_trips_and_keeps_growing():
    pool = TrajectoryPool(200, generator=torch.Generator().manual_seed(7))
    pool.add(*_batch(list(range(45)), dim=BIG))
    state = pool.state_dict()
    restored = TrajectoryPool(5, generator=torch.Generator().manual_seed(0))
    restored.load_state_dict(state)
    assert restored.capacity == 200 and len(restored) == 45
    assert restored.nbytes <= max(2 * 45 * BIG_ITEM, MIB) < 200 * BIG_ITEM
    for start, k in [(45, 50), (95, 120)]:  # growth, then the wrap-around
        for each in (pool, restored):
            each.add(*_batch(list(range(start, start + k)), dim=BIG))
        for a, b in zip(pool.sample(16), restored.sample(16), strict=True):
            assert torch.equal(a, b)
    assert _all_ids(restored) == list(range(15, 215))


def test_state_of_a_partly_filled_pool_from_the_preallocating_format_loads():
    # the layout written before buffers grew: items in buffer order, counters, effective capacity
    ids = [10, 11, 12, 13]
    t, xt, ut = _batch(ids)
    state = {
        "storage": "memory", "capacity": 100, "dtype": "float32", "feature_shape": [3],
        "head": 4, "size": 4, "n_added": 4, "generator_state": None, "t": t, "xt": xt, "ut": ut,
    }  # fmt: skip
    pool = TrajectoryPool(7)
    pool.load_state_dict(state)
    assert pool.capacity == 100 and _all_ids(pool) == ids
    pool.add(*_batch(list(range(100, 199))))  # 103 items: ids 10, 11, 12 are evicted
    assert _all_ids(pool) == [13, *range(100, 199)]


def test_disk_pool_reopens_mid_growth_and_its_files_grow(tmp_path):
    path = tmp_path / "replay"
    reference = collections.deque(maxlen=200)
    pool = TrajectoryPool(200, storage="disk", path=path)
    pool.add(*_batch(list(range(40)), dim=BIG))
    reference.extend(range(40))
    first = _slots_of_files(path)
    assert first[0] == first[1] == first[2] and 40 <= first[0] <= max(80, MIB // BIG_ITEM) < 200
    del pool

    for start, k in [(40, 100), (140, 200)]:  # growth after a reopen, then growth to full and wrap
        reopened = TrajectoryPool.open(path)
        assert reopened.capacity == 200 and _all_ids(reopened) == sorted(reference)
        before = _slots_of_files(path)
        reopened.add(*_batch(list(range(start, start + k)), dim=BIG))
        reference.extend(range(start, start + k))
        after = _slots_of_files(path)
        assert after[0] == after[1] == after[2] > before[0]
        del reopened
    assert after[0] == 200
    assert _all_ids(TrajectoryPool.open(path)) == list(range(140, 340))


def test_disk_pool_recovers_an_interrupted_growth_and_rejects_short_files(tmp_path):
    path = tmp_path / "replay"
    pool = TrajectoryPool(200, storage="disk", path=path)
    pool.add(*_batch(list(range(40)), dim=BIG))
    slots = _slots_of_files(path)[0]
    del pool
    os.truncate(path / "xt.bin", 2 * slots * 64 * 64 * 4)  # xt.bin grew, t.bin and ut.bin did not
    reopened = TrajectoryPool.open(path)
    assert _slots_of_files(path) == [slots] * 3  # cut back to the shortest file
    assert _all_ids(reopened) == list(range(40))
    del reopened

    os.truncate(path / "ut.bin", 39 * 64 * 64 * 4)  # fewer slots than the 40 items held
    with pytest.raises(ValueError, match="ut.bin"):
        TrajectoryPool.open(path)


# --------------------------------------------------------------------------- class labels
N_CLASSES = 7


def _labelled(ids: list[int], dim: tuple[int, ...] = (3,)):
    """Items of :func:`_batch` with the label ``id % N_CLASSES``, so that a misaligned label is detected."""
    return (*_batch(ids, dim), torch.tensor(ids) % N_CLASSES)


def _check_labels_aligned(pool: TrajectoryPool) -> list[int]:
    t, xt, ut, y = pool.sample(len(pool), dtype=torch.float64)
    ids = torch.round(t * N_IDS).long()
    assert y.dtype == torch.int64
    assert torch.equal(y, ids % N_CLASSES)
    assert torch.equal(xt.reshape(len(pool), -1)[:, 0].long(), ids)
    return sorted(ids.tolist())


def test_labels_stay_aligned_through_eviction_growth_and_wrap_around():
    pool = TrajectoryPool(50, generator=torch.Generator().manual_seed(0))
    reference: collections.deque[int] = collections.deque(maxlen=50)
    start = 0
    for k in (3, 20, 1, 40, 17, 9):
        ids = list(range(start, start + k))
        start += k
        pool.add(*_labelled(ids))
        reference.extend(ids)
        assert _check_labels_aligned(pool) == sorted(reference)
    assert pool.labelled is True


def test_labels_count_in_the_bytes_and_the_byte_bound():
    plain, labelled = TrajectoryPool(100), TrajectoryPool(100)
    plain.add(*_batch(list(range(100))))
    labelled.add(*_labelled(list(range(100))))
    assert labelled.nbytes - plain.nbytes == 100 * 8  # one int64 per item
    per_item = 4 + 2 * 3 * 4 + 8
    bounded = TrajectoryPool(1000, max_bytes=10 * per_item + per_item - 1)
    bounded.add(*_labelled(list(range(30))))
    assert bounded.capacity == 10 and len(bounded) == 10
    assert bounded.nbytes <= 10 * per_item + per_item - 1
    assert _check_labels_aligned(bounded) == list(range(20, 30))


def test_labelled_state_dict_and_disk_round_trips(tmp_path):
    pool = TrajectoryPool(40, generator=torch.Generator().manual_seed(1))
    pool.add(*_labelled(list(range(60))))
    copy = TrajectoryPool(40, generator=torch.Generator())
    copy.load_state_dict(pool.state_dict())
    for a, b in zip(pool.sample(16, balanced=True), copy.sample(16, balanced=True), strict=True):
        assert torch.equal(a, b)
    assert _check_labels_aligned(copy) == list(range(20, 60))

    disk = TrajectoryPool(40, storage="disk", path=tmp_path / "p")
    disk.add(*_labelled(list(range(25))))
    disk.add(*_labelled(list(range(25, 55))))
    assert os.path.getsize(tmp_path / "p" / "y.bin") == disk._slots * 8
    reopened = TrajectoryPool.open(tmp_path / "p")
    assert reopened.labelled is True
    assert _check_labels_aligned(reopened) == list(range(15, 55))
    again = TrajectoryPool(40, storage="disk", path=tmp_path / "p")
    again.load_state_dict(disk.state_dict())
    assert _check_labels_aligned(again) == list(range(15, 55))


def test_balanced_batches_hold_equal_counts_per_class():
    pool = TrajectoryPool(1000, generator=torch.Generator().manual_seed(2))
    t, xt, ut, _ = _labelled(list(range(700)))
    y = torch.zeros(700, dtype=torch.long)  # 600 items of class 0, 70 of class 3, 30 of class 5
    y[600:670], y[670:] = 3, 5
    pool.add(t, xt, ut, y)
    *_, served = pool.sample(60, balanced=True)
    assert torch.bincount(served, minlength=6).tolist() == [20, 0, 0, 20, 0, 20]
    *_, served = pool.sample(61, balanced=True)
    counts = torch.bincount(served, minlength=6)[[0, 3, 5]]
    assert sorted(counts.tolist()) == [20, 20, 21]
    # class 5 holds only 30 items: it gives them all and the others fill in, without repeats
    t_served, *_, served = pool.sample(150, balanced=True)
    assert torch.bincount(served, minlength=6)[5] == 30
    assert len(set(t_served.tolist())) == 150
    *_, uniform = pool.sample(350)
    assert torch.bincount(uniform, minlength=6)[0] > 200  # uniform serving follows the frequencies


def test_labelled_and_unlabelled_adds_do_not_mix():
    pool = TrajectoryPool(10)
    pool.add(*_labelled([0, 1]))
    with pytest.raises(ValueError, match="y must be given"):
        pool.add(*_batch([2]))
    plain = TrajectoryPool(10)
    plain.add(*_batch([0]))
    with pytest.raises(ValueError, match="y must be None"):
        plain.add(*_labelled([1]))
    with pytest.raises(ValueError, match="balanced=True needs a labelled pool"):
        plain.sample(1, balanced=True)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        pool.add(*_batch([3, 4]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        pool.add(*_batch([3]), torch.zeros(1))
    with pytest.raises(ValueError, match="y must hold non-negative"):
        pool.add(*_batch([3]), torch.tensor([-1]))
