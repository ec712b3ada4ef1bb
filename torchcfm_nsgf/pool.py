"""Trajectory pool: the experience replay of NSGF training (Algorithm 1 of Zhu et al., 2024).

The simulation phase stores the particles ``X_k``, their empirical Sinkhorn velocity ``v̂_k`` and time ``t_k``;
the matching phase draws minibatches ``(t, x_t, u_t)`` from the pool to regress ``v_θ(x_t, t) ≈ u_t``.
The paper's CIFAR-10 pool reportedly took about 45 GB, so storage precision, device and medium
(RAM or memory-mapped files) are chosen by the user, and the size can be bounded in bytes.

For class-conditional (guided) training each item can carry an integer class label ``y``, stored next to it
and served with it (optionally in class-balanced batches).

One class, with its memory and disk storage and its checkpoints: longer than 600 lines on purpose.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ._validation import check_cloud, check_labels, check_positive

__all__ = ["TrajectoryPool"]

_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in _STORAGE_DTYPES}
_FILES = {"t": "t.bin", "xt": "xt.bin", "ut": "ut.bin", "y": "y.bin"}
_LABEL_DTYPE = torch.int64  # labels are stored as int64, the dtype torch indexes embeddings with
_META = "pool.json"
_MIN_ALLOCATION_BYTES = 2**20  # the first allocation holds about 1 MiB of items, or the capacity


def _dtype_from_name(name: str) -> torch.dtype:
    for dtype, dtype_name in _DTYPE_NAMES.items():
        if dtype_name == name:
            return dtype
    raise ValueError(f"unknown storage dtype {name!r} in the pool metadata")


class TrajectoryPool:
    r"""Fixed-size replay buffer of ``(t, x_t, u_t)`` items for velocity-field matching.

    Each item is one particle of a simulated Sinkhorn flow: its time ``t ∈ [0, 1]``, position ``x_t`` and
    target velocity ``u_t``, both of a fixed feature shape ``(*dim)`` (vectors ``(d,)`` or images
    ``(C, H, W)``), fixed by the first :meth:`add`.

    **Eviction is FIFO**: the pool is a ring buffer; once it holds ``capacity`` items, each new item
    overwrites the oldest one.

    **Labels** (optional): a pool whose first :meth:`add` passes ``y`` stores one int64 class label per item
    (8 bytes, counted in :attr:`nbytes` and ``max_bytes``; a disk pool keeps them in ``y.bin``), keeps them
    aligned with their items through eviction, growth, :meth:`state_dict` and :meth:`open`, and
    :meth:`sample` returns them as a fourth tensor. A labelled pool refuses unlabelled adds and vice versa.

    **Memory follows the contents**: the buffers are allocated at the first :meth:`add`, with room for
    that add and at least about 1 MiB of items, and grow geometrically (doubling, capped at
    ``capacity``) when an add needs more room, keeping every item in its slot. Until :meth:`clear`, they
    hold at most ``min(capacity, max(2 * len(self), 2**20 // bytes_per_item))`` items, and
    :attr:`nbytes` is at most ``capacity * bytes_per_item``, reached once the pool is full. A growth of a
    memory pool copies the items, briefly holding the old and the new buffers; a disk pool extends its
    files in place.

    Parameters
    ----------
    capacity : int
        Maximum number of items, ``>= 1``.
    max_bytes : int, optional
        Upper bound on the bytes of the buffers. The effective capacity is
        ``min(capacity, max_bytes // bytes_per_item)`` with
        ``bytes_per_item = 4 + 2 * prod(dim) * dtype.itemsize`` (``t`` is stored as float32), plus 8 for a
        labelled pool. It is known
        at the first :meth:`add`, which raises ``ValueError`` if not even one item fits. The buffers only
        reach this size once the pool is full.
    dtype : torch.dtype, optional
        Storage dtype of ``x_t`` and ``u_t``: float16, bfloat16, float32 or float64 (float16 halves the
        memory of float32). Default: the dtype of the first added ``xt``. ``t`` is always stored as float32.
    device : torch.device or str
        Storage device (for example ``"cpu"`` while training on a GPU). Must be the CPU for a disk pool.
    storage : {"memory", "disk"}
        ``"disk"`` keeps the buffers in memory-mapped files ``t.bin``, ``xt.bin``, ``ut.bin`` (and ``y.bin``
        for labels) (raw,
        native byte order) under ``path`` plus a ``pool.json`` with the shape, dtype and counters, so that
        a large pool lives in the page cache rather than in process memory. The files grow with the
        buffers; their number of slots is read from their sizes when the pool is reopened. Items read
        back are bit-identical to what was stored (in the storage dtype). Reopen with :meth:`open` or
        :meth:`load_state_dict`. A fresh disk pool overwrites the files of an old one at its first
        :meth:`add`, with a warning.
    path : str, optional
        Directory of a disk pool (created if missing); required when ``storage="disk"``.
    generator : torch.Generator, optional
        Source of randomness of :meth:`sample`. The same seed and the same adds give identical samples.

    Notes
    -----
    :meth:`sample` draws uniformly **without replacement** within a batch and raises ``ValueError`` when
    asked for more items than the pool holds. Indices are drawn on the generator's device (the CPU when
    ``generator`` is None).

    Examples
    --------
    >>> pool = TrajectoryPool(10_000, dtype=torch.float16)
    >>> pool.add(torch.full((256,), 0.1), x, v)  # doctest: +SKIP
    >>> t, xt, ut = pool.sample(128, device="cuda")  # doctest: +SKIP
    """

    def __init__(
        self,
        capacity: int,
        *,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        storage: Literal["memory", "disk"] = "memory",
        path: str | os.PathLike[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_positive(capacity, "capacity", integer=True)
        if max_bytes is not None:
            check_positive(max_bytes, "max_bytes", integer=True)
        if dtype is not None and dtype not in _STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())} or None, got {dtype}")
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        device = torch.device(device)
        if storage == "disk":
            if path is None:
                raise ValueError(
                    "path is required when storage='disk': the directory of the memory-mapped files"
                )
            if device.type != "cpu":
                raise ValueError(
                    f"device must be the CPU for a disk pool (memory-mapped files), got {device}"
                )
        elif path is not None:
            raise ValueError("path is only used with storage='disk'; pass storage='disk' or drop path")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

        self._requested_capacity = capacity
        self._max_bytes = max_bytes
        self._dtype = dtype
        self._device = device
        self._storage = storage
        self._path = None if path is None else os.fspath(path)
        self.generator = generator

        self._feature_shape: tuple[int, ...] | None = None
        self._capacity = capacity
        self._t: Tensor | None = None
        self._xt: Tensor | None = None
        self._ut: Tensor | None = None
        self._y: Tensor | None = None
        self._labelled: bool | None = None  # fixed by the first add
        self._slots = 0  # allocated items of each buffer, <= capacity
        self._min_slots = 1  # slots of the first allocation, set with the feature shape
        self._head = 0  # next slot to write
        self._size = 0
        self._n_added = 0  # items ever added, evicted ones included

    # ------------------------------------------------------------------ properties

    @property
    def capacity(self) -> int:
        """Maximum number of items: the requested one until the first add, then the effective one."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the buffers, growing with the items held (0 before the first add).

        For a disk pool, the bytes of the files. At most ``capacity * bytes_per_item``.
        """
        if self._t is None:
            return 0
        return sum(buf.untyped_storage().nbytes() for buf in self._buffers().values())

    @property
    def dtype(self) -> torch.dtype | None:
        """Storage dtype of ``x_t`` and ``u_t`` (None until known)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Storage device."""
        return self._device

    @property
    def storage(self) -> str:
        """``"memory"`` or ``"disk"``."""
        return self._storage

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """Feature shape ``(*dim)`` of ``x_t`` and ``u_t`` (None until the first add)."""
        return self._feature_shape

    @property
    def labelled(self) -> bool | None:
        """Whether the items carry class labels (None until the first add)."""
        return self._labelled

    @property
    def n_added(self) -> int:
        """Number of items ever added (evicted ones included)."""
        return self._n_added

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"TrajectoryPool(len={self._size}, capacity={self._capacity}, feature_shape={self._feature_shape}, "
            f"dtype={self._dtype}, device={self._device}, storage={self._storage!r})"
        )

    # ------------------------------------------------------------------ allocation

    def _bytes_per_item(self, feature_shape: tuple[int, ...], dtype: torch.dtype, labelled: bool) -> int:
        label_bytes = _LABEL_DTYPE.itemsize if labelled else 0
        return 4 + 2 * math.prod(feature_shape) * dtype.itemsize + label_bytes

    def _buffers(self) -> dict[str, Tensor]:
        """The allocated buffers by name (``y`` only for a labelled pool)."""
        names = ("t", "xt", "ut", "y") if self._labelled else ("t", "xt", "ut")
        return {name: getattr(self, f"_{name}") for name in names}

    def _configure(self, feature_shape: tuple[int, ...], dtype: torch.dtype, labelled: bool) -> None:
        """Set the feature shape, dtype and labelling and compute the effective capacity (no allocation)."""
        capacity = self._requested_capacity
        per_item = self._bytes_per_item(feature_shape, dtype, labelled)
        if self._max_bytes is not None:
            fitting = self._max_bytes // per_item
            if fitting < 1:
                raise ValueError(
                    f"max_bytes={self._max_bytes} cannot hold a single item of feature shape {feature_shape} "
                    f"in {dtype} ({per_item} bytes per item)"
                )
            capacity = min(capacity, fitting)
        self._feature_shape = feature_shape
        self._dtype = dtype
        self._labelled = bool(labelled)
        self._capacity = capacity
        self._min_slots = min(capacity, max(1, _MIN_ALLOCATION_BYTES // per_item))

    def _slot_shapes(self, slots: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each buffer with ``slots`` slots."""
        shapes = {
            "t": ((slots,), torch.float32),
            "xt": ((slots, *self._feature_shape), self._dtype),
            "ut": ((slots, *self._feature_shape), self._dtype),
        }
        if self._labelled:
            shapes["y"] = ((slots,), _LABEL_DTYPE)
        return shapes

    def _resize(self, slots: int) -> None:
        """Give the buffers ``slots >= len(self)`` slots, keeping the items in slots ``[0, len(self))``.

        Only called while the pool is not full, when the stored items fill slots ``[0, len(self))``.
        A memory pool copies them into new buffers; a disk pool resizes its files and maps them again.
        """
        buffers = {}
        if self._storage == "memory":
            old = {"t": self._t, "xt": self._xt, "ut": self._ut, "y": self._y}
            for name, (shape, dtype) in self._slot_shapes(slots).items():
                buffers[name] = torch.empty(shape, dtype=dtype, device=self._device)
                if old[name] is not None:
                    buffers[name][: self._size] = old[name][: self._size]
        else:
            self._t = self._xt = self._ut = self._y = None  # unmap before resizing the files
            for name, (shape, dtype) in self._slot_shapes(slots).items():
                filename = os.path.join(self._path, _FILES[name])
                numel = math.prod(shape)
                os.truncate(filename, numel * dtype.itemsize)  # new bytes read as zeros
                buffers[name] = torch.from_file(filename, shared=True, size=numel, dtype=dtype).view(shape)
        self._t, self._xt, self._ut = buffers["t"], buffers["xt"], buffers["ut"]
        self._y = buffers.get("y")
        self._slots = slots

    def _create_files(self) -> None:
        """Start the empty files of a fresh disk pool, warning if they replace an old pool."""
        os.makedirs(self._path, exist_ok=True)
        if os.path.exists(os.path.join(self._path, _META)):
            warnings.warn(
                f"overwriting the trajectory pool stored under path={self._path!r}; "
                "use TrajectoryPool.open or load_state_dict to resume it",
                stacklevel=3,
            )
        used = self._slot_shapes(1)
        for name, filename in _FILES.items():
            filename = os.path.join(self._path, filename)
            if name in used:
                with open(filename, "wb"):  # truncate: a new pool starts empty
                    pass
            elif os.path.exists(filename):  # the labels of an old labelled pool
                os.unlink(filename)

    def _map_files(self, size: int) -> None:
        """Map the files of a reopened disk pool; their slots are read from their sizes.

        Files of different lengths (a growth interrupted between two files) are cut to the shortest.
        """
        slots = self._file_slots(size)
        if slots > 0:
            self._resize(slots)

    def _file_slots(self, size: int) -> int:
        """The slots the files of a disk pool hold (a ``ValueError`` when they cannot hold ``size`` items)."""
        slots = self._capacity
        for name, (shape, dtype) in self._slot_shapes(1).items():
            filename = os.path.join(self._path, _FILES[name])
            slot_bytes = math.prod(shape) * dtype.itemsize
            file_bytes = os.path.getsize(filename) if os.path.exists(filename) else 0
            if file_bytes % slot_bytes or file_bytes < size * slot_bytes:
                raise ValueError(
                    f"path={self._path!r}: {_FILES[name]} is missing or does not hold {size} slots of "
                    f"{slot_bytes} bytes; the files do not match the pool's state"
                )
            slots = min(slots, file_bytes // slot_bytes)
        return slots

    def _write_meta(self) -> None:
        if self._storage != "disk" or self._feature_shape is None:
            return
        meta = {
            "capacity": self._capacity,
            "dtype": _DTYPE_NAMES[self._dtype],
            "feature_shape": list(self._feature_shape),
            "labelled": self._labelled,
            "head": self._head,
            "size": self._size,
            "n_added": self._n_added,
        }
        tmp = os.path.join(self._path, _META + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(meta, handle)
        os.replace(tmp, os.path.join(self._path, _META))

    # ------------------------------------------------------------------ add / sample

    def add(self, t: Tensor | float, xt: Tensor, ut: Tensor, y: Tensor | None = None) -> None:
        """Store a batch of ``k`` items, evicting the oldest ones once the pool is full.

        Parameters
        ----------
        t : Tensor or float
            Times, shape ``(k,)``, or one time shared by the batch (0-d tensor or float), in ``[0, 1]``.
        xt : Tensor
            Particle positions, shape ``(k, *dim)``.
        ut : Tensor
            Target velocities, shape ``(k, *dim)``.
        y : Tensor, optional
            Integer class labels, shape ``(k,)``, non-negative. The first add decides whether the pool is
            labelled; later adds must agree.

        Notes
        -----
        Inputs may live on any device; they are copied (detached) into the storage dtype and device.
        If ``k > capacity`` only the last ``capacity`` items are kept, as if added one by one.
        """
        xt = check_cloud(xt, "xt")
        ut = check_cloud(ut, "ut")
        if ut.shape != xt.shape:
            raise ValueError(f"ut must have the shape of xt {tuple(xt.shape)}, got {tuple(ut.shape)}")
        k = xt.shape[0]
        t = self._check_times(t, k)
        labelled = y is not None
        if labelled:
            y = check_labels(y, k, "y", "xt")
        if self._labelled is not None and labelled != self._labelled:
            raise ValueError(
                "y must be given: this pool stores class labels with its items"
                if self._labelled
                else "y must be None: this pool stores no class labels (its first add had none)"
            )
        feature_shape = tuple(xt.shape[1:])
        if self._feature_shape is not None and feature_shape != self._feature_shape:
            raise ValueError(
                f"xt has feature shape {feature_shape} but the pool stores items of shape {self._feature_shape}"
            )
        if self._feature_shape is None:
            dtype = self._dtype if self._dtype is not None else xt.dtype
            if dtype not in _STORAGE_DTYPES:
                raise ValueError(f"xt has dtype {xt.dtype}, which the pool cannot store; pass dtype=...")
            self._configure(feature_shape, dtype, labelled)
            if self._storage == "disk":
                self._create_files()

        keep = min(k, self._capacity)
        with torch.no_grad():
            new = {
                "t": t[k - keep :].to(device=self._device, dtype=torch.float32),
                "xt": xt[k - keep :].detach().to(device=self._device, dtype=self._dtype),
                "ut": ut[k - keep :].detach().to(device=self._device, dtype=self._dtype),
            }
            if labelled:
                new["y"] = y[k - keep :].to(device=self._device, dtype=_LABEL_DTYPE)
            for name in ("xt", "ut"):
                if not bool(torch.isfinite(new[name]).all()):
                    raise ValueError(f"{name} overflows the storage dtype {self._dtype}: use a wider dtype")
            needed = min(self._size + keep, self._capacity)
            if needed > self._slots:  # not full yet: the items fill slots [0, size) and head == size
                self._resize(min(self._capacity, max(2 * self._slots, needed, self._min_slots)))
            first = min(keep, self._capacity - self._head)
            for name, buf in self._buffers().items():
                buf[self._head : self._head + first] = new[name][:first]
                buf[: keep - first] = new[name][first:]
        self._head = (self._head + keep) % self._capacity
        self._size = min(self._size + keep, self._capacity)
        self._n_added += k
        self._write_meta()

    @staticmethod
    def _check_times(t: Tensor | float, k: int) -> Tensor:
        if isinstance(t, bool) or not isinstance(t, (Tensor, int, float)):
            raise TypeError(f"t must be a torch.Tensor or a float, got {type(t).__name__}")
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t))
        if not t.is_floating_point():
            raise TypeError(f"t must have a floating dtype, got {t.dtype}")
        if t.dim() == 0:
            t = t.expand(k)
        if t.shape != (k,):
            raise ValueError(f"t must have shape ({k},) to match xt, or be a scalar, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("t contains NaN or Inf entries")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("t must lie in [0, 1]")
        return t

    def sample(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        balanced: bool = False,
    ) -> tuple[Tensor, ...]:
        """Draw ``batch_size`` distinct items uniformly at random (or class-balanced).

        Parameters
        ----------
        batch_size : int
            Number of items, at most ``len(self)``.
        device : torch.device or str, optional
            Device of the returned tensors. Default: the storage device.
        dtype : torch.dtype, optional
            Floating dtype of all three returned tensors (``t`` included, so that ``model(t, xt)`` works).
            Default: the storage dtype, except float32 for a float16/bfloat16 pool.
        balanced : bool
            Labelled pools only: draw equal numbers of items of every class the pool holds (the remainder
            of ``batch_size / n_classes`` going to classes drawn at random; a class with too few items gives
            all it has and the others fill in), uniformly without replacement within each class, returned in
            random order. Costs a pass over the labels.

        Returns
        -------
        t : Tensor
            Shape ``(batch_size,)``.
        xt, ut : Tensor
            Shape ``(batch_size, *dim)``.
        y : Tensor, only for a labelled pool
            int64 labels, shape ``(batch_size,)``, of the items in the rows of ``xt``.
        """
        check_positive(batch_size, "batch_size", integer=True)
        if batch_size > self._size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self._size} items in the pool "
                "(sampling is without replacement)"
            )
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype}")
        out_device = self._device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.float32 if self._dtype in (torch.float16, torch.bfloat16) else self._dtype
        if balanced and not self._labelled:
            raise ValueError("balanced=True needs a labelled pool (items added with y)")

        if balanced:
            idx = self._draw_balanced(batch_size).to(self._device)
        else:
            idx = self._draw_indices(batch_size).to(self._device)
        t, xt, ut = self._t[idx], self._xt[idx], self._ut[idx]
        out = (
            t.to(device=out_device, dtype=dtype),
            xt.to(device=out_device, dtype=dtype),
            ut.to(device=out_device, dtype=dtype),
        )
        if self._labelled:
            return (*out, self._y[idx].to(out_device))
        return out

    def sample_at(
        self,
        t0: Tensor,
        *,
        tol: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, ...]:
        """Draw, for each row ``i``, an item whose stored time lies within ``tol`` of ``t0[i]``.

        Items are drawn uniformly among those of each time, without replacement within a batch where they
        are enough, with replacement otherwise. The times are scanned at every call (a pass over the
        pool's times, with host reads): meant for calls that give their times, not for the training loop.

        Parameters
        ----------
        t0 : Tensor, shape (bs,)
            The start time each row's item must have.
        tol : float
            Tolerance on the stored (float32) times.
        device, dtype
            As in :meth:`sample`.

        Returns
        -------
        As :meth:`sample`: ``t`` (the stored times), ``xt``, ``ut`` and, for a labelled pool, ``y``.
        """
        if not isinstance(t0, Tensor) or t0.dim() != 1 or t0.numel() == 0:
            raise ValueError("t0 must be a non-empty tensor of shape (bs,)")
        out_device = self._device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.float32 if self._dtype in (torch.float16, torch.bfloat16) else self._dtype
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        times = self._t[: self._size].to(gen_device, torch.float64)
        want = t0.detach().to(gen_device, torch.float64)
        idx = torch.empty(t0.shape[0], dtype=torch.long, device=gen_device)
        for value in torch.unique(want).tolist():
            rows = torch.nonzero(want == value).flatten()
            members = torch.nonzero((times - value).abs() <= tol).flatten()
            if members.numel() == 0:
                raise ValueError(f"the pool holds no item at time {value:.6g} (tolerance {tol:g})")
            if members.numel() >= rows.numel():
                pick = torch.randperm(members.numel(), generator=self.generator, device=gen_device)[
                    : rows.numel()
                ]
            else:
                pick = torch.randint(
                    members.numel(), (rows.numel(),), generator=self.generator, device=gen_device
                )
            idx[rows] = members[pick]
        idx = idx.to(self._device)
        out = tuple(b[idx].to(device=out_device, dtype=dtype) for b in (self._t, self._xt, self._ut))
        if self._labelled:
            return (*out, self._y[idx].to(out_device))
        return out

    def _draw_balanced(self, batch_size: int) -> Tensor:
        """Indices of ``batch_size`` distinct items with equal counts per class (as far as the classes hold
        items), in random order; every draw goes through the generator."""
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        labels = self._y[: self._size].to(gen_device)
        classes, counts = torch.unique(labels, return_counts=True)
        k = len(classes)
        quota = torch.full((k,), batch_size // k, dtype=torch.long, device=gen_device)
        extra = torch.randperm(k, generator=self.generator, device=gen_device)[: batch_size % k]
        quota[extra] += 1
        # a class short of items gives what it has; the missing ones go to classes with room, one by one
        while bool((quota > counts).any()):
            missing = int((quota - counts).clamp(min=0).sum())
            quota = torch.minimum(quota, counts)
            room = (counts - quota).clamp(min=0)
            for _ in range(missing):
                has_room = torch.nonzero(room > 0).flatten()
                pick = has_room[
                    torch.randint(len(has_room), (1,), generator=self.generator, device=gen_device)
                ]
                quota[pick] += 1
                room[pick] -= 1
        parts = []
        for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
            members = torch.nonzero(labels == c).flatten()
            order = torch.randperm(len(members), generator=self.generator, device=gen_device)[:q]
            parts.append(members[order])
        idx = torch.cat(parts)
        return idx[torch.randperm(batch_size, generator=self.generator, device=gen_device)]

    def _draw_indices(self, batch_size: int) -> Tensor:
        """Uniform ``batch_size``-subset of ``range(len(self))``, in uniformly random order.

        ``randperm`` costs O(len) per batch, too slow for pools of millions of items; for small batches,
        draw with replacement and redraw the repeated positions until all are distinct. The procedure is
        invariant under relabelling the items, hence uniform over ordered tuples of distinct indices.
        """
        n = self._size
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        if 2 * batch_size > n:
            return torch.randperm(n, generator=self.generator, device=gen_device)[:batch_size]
        idx = torch.randint(n, (batch_size,), generator=self.generator, device=gen_device)
        while True:
            values, order = torch.sort(idx, stable=True)
            repeated = torch.zeros(batch_size, dtype=torch.bool, device=gen_device)
            repeated[order[1:]] = values[1:] == values[:-1]
            n_repeated = int(repeated.sum())
            if n_repeated == 0:
                return idx
            idx[repeated] = torch.randint(n, (n_repeated,), generator=self.generator, device=gen_device)

    def clear(self) -> None:
        """Remove all items. Buffers stay allocated, and the feature shape and dtype stay fixed."""
        self._head = 0
        self._size = 0
        self._write_meta()

    def flush(self) -> None:
        """Ask the OS to write a disk pool's files (a no-op for a memory pool); closing needs no flush."""
        if self._storage == "disk" and self._t is not None:
            for name in self._buffers():
                fd = os.open(os.path.join(self._path, _FILES[name]), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint of the pool.

        For a memory pool it holds the stored items (``t``, ``xt``, ``ut``, and ``y`` if labelled, in buffer order, on the storage
        device) and the counters, so that a loaded pool samples exactly as the saved one. For a disk pool it
        holds the path and the counters only: the items stay in the files, and later adds overwrite them.
        Both include the generator state when the pool has a generator.
        """
        state: dict[str, Any] = {
            "storage": self._storage,
            "capacity": self._capacity,
            "dtype": None if self._dtype is None else _DTYPE_NAMES[self._dtype],
            "feature_shape": None if self._feature_shape is None else list(self._feature_shape),
            "labelled": self._labelled,
            "head": self._head,
            "size": self._size,
            "n_added": self._n_added,
            "generator_state": None if self.generator is None else self.generator.get_state(),
        }
        if self._storage == "disk":
            state["path"] = self._path
        elif self._t is not None:
            state["t"] = self._t[: self._size].clone()
            state["xt"] = self._xt[: self._size].clone()
            state["ut"] = self._ut[: self._size].clone()
            if self._labelled:
                state["y"] = self._y[: self._size].clone()
        return state

    @staticmethod
    def check_state(state: object, storage: str | None = None) -> None:
        """Raise a ``TypeError`` or ``ValueError`` for what :meth:`load_state_dict` cannot load; change nothing.

        ``storage``: the storage kind of the pool that will load it (None: any).
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from TrajectoryPool.state_dict, got {type(state).__name__}"
            )
        if state.get("storage") not in ("memory", "disk") or (
            storage is not None and state["storage"] != storage
        ):
            raise ValueError(f"state holds a {state.get('storage')!r} pool but this pool is {storage!r}")
        missing = [
            k for k in ("capacity", "dtype", "feature_shape", "head", "size", "n_added") if k not in state
        ]
        if missing:
            raise ValueError(f"state is not a TrajectoryPool state_dict: missing keys {missing}")
        if state["feature_shape"] is None:
            return
        _dtype_from_name(state["dtype"])
        size, shape = state["size"], tuple(state["feature_shape"])
        if not 0 <= size <= state["capacity"] or not 0 <= state["head"] < max(state["capacity"], 1):
            raise ValueError(
                f"state has size={size} and head={state['head']} for a capacity of {state['capacity']}"
            )
        if state["storage"] == "memory":
            names = ("t", "xt", "ut", "y") if state.get("labelled") else ("t", "xt", "ut")
            for name in names:
                item = () if name in ("t", "y") else shape
                value = state.get(name)
                if not isinstance(value, Tensor) or tuple(value.shape) != (size, *item):
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"state[{name!r}] must be a tensor of shape {(size, *item)}, got {got}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint from :meth:`state_dict`.

        The storage kind must match. A disk pool reads the files under its own ``path`` (which may differ
        from the saved one, for a moved directory), whose files may hold fewer slots than the capacity.
        ``max_bytes`` and the requested capacity of this pool are ignored: the saved effective capacity is
        used. The state is checked first (:meth:`check_state`, and a disk pool's files): a state that cannot
        be loaded leaves the pool as it was.
        """
        self.check_state(state, self._storage)
        if state["feature_shape"] is not None and self._storage == "disk":
            probe = TrajectoryPool(1, storage="disk", path=self._path)
            probe._configure(
                tuple(state["feature_shape"]),
                _dtype_from_name(state["dtype"]),
                bool(state.get("labelled", False)),
            )
            probe._capacity = state["capacity"]
            probe._file_slots(state["size"])  # raises for files that do not hold the state's items
        self._head, self._size, self._n_added = 0, 0, 0
        self._t = self._xt = self._ut = self._y = None
        self._slots = 0
        self._feature_shape = None
        self._labelled = None
        if state["feature_shape"] is not None:
            self._requested_capacity, self._max_bytes = state["capacity"], None
            labelled = bool(state.get("labelled", False))  # states written before labels: unlabelled
            self._configure(tuple(state["feature_shape"]), _dtype_from_name(state["dtype"]), labelled)
            size = state["size"]
            if self._storage == "disk":
                self._map_files(size)
            else:
                self._resize(min(self._capacity, max(size, self._min_slots)))
                self._t[:size] = state["t"].to(self._device)
                self._xt[:size] = state["xt"].to(self._device)
                self._ut[:size] = state["ut"].to(self._device)
                if labelled:
                    self._y[:size] = state["y"].to(self._device)
            self._head, self._size, self._n_added = state["head"], state["size"], state["n_added"]
        if state.get("generator_state") is not None and self.generator is not None:
            self.generator.set_state(state["generator_state"])
        self._write_meta()

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> TrajectoryPool:
        """Reopen the disk pool stored under ``path`` (from its ``pool.json``), with its items and counters."""
        meta_file = os.path.join(os.fspath(path), _META)
        if not os.path.exists(meta_file):
            raise ValueError(f"path={os.fspath(path)!r} holds no trajectory pool ({_META} is missing)")
        with open(meta_file) as handle:
            meta = json.load(handle)
        pool = cls(meta["capacity"], storage="disk", path=path, generator=generator)
        pool.load_state_dict({"storage": "disk", "generator_state": None, **meta})
        return pool
