"""The storage of a trajectory pool: its buffers in memory or in memory-mapped files, allocated as it fills.

:class:`PoolStorage` is the part of :class:`~torchcfm_nsgf.TrajectoryPool` that allocates, grows and maps the
buffers ``t``, ``xt``, ``ut`` (and ``y``) on the storage device or in the files ``t.bin``, ``xt.bin``,
``ut.bin`` (and ``y.bin``) with a ``pool.json`` of the shape, dtype and counters; the pool's ring (head,
size) and its draws (:mod:`torchcfm_nsgf.pool_draws`) work on these buffers. Its checkpoints hold the items
of a memory pool, and the path and counters of a disk pool.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["DTYPE_NAMES", "FILES", "LABEL_DTYPE", "META", "STORAGE_DTYPES", "PoolStorage", "dtype_from_name"]

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in STORAGE_DTYPES}
FILES = {"t": "t.bin", "xt": "xt.bin", "ut": "ut.bin", "y": "y.bin"}
LABEL_DTYPE = torch.int64  # labels are stored as int64, the dtype torch indexes embeddings with
META = "pool.json"
MIN_ALLOCATION_BYTES = 2**20  # the first allocation holds about 1 MiB of items, or the capacity


def dtype_from_name(name: str) -> torch.dtype:
    for dtype, dtype_name in DTYPE_NAMES.items():
        if dtype_name == name:
            return dtype
    raise ValueError(f"unknown storage dtype {name!r} in the pool metadata")


class PoolStorage:
    """Allocation, growth, files, size and checkpoints of a pool's buffers (the attributes are the pool's own)."""

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the buffers, growing with the items held (0 before the first add).

        For a disk pool, the bytes of the files. At most ``capacity * bytes_per_item``.
        """
        if self._t is None:
            return 0
        return sum(buf.untyped_storage().nbytes() for buf in self._buffers().values())

    def _bytes_per_item(self, feature_shape: tuple[int, ...], dtype: torch.dtype, labelled: bool) -> int:
        label_bytes = LABEL_DTYPE.itemsize if labelled else 0
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
        self._min_slots = min(capacity, max(1, MIN_ALLOCATION_BYTES // per_item))

    def _slot_shapes(self, slots: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each buffer with ``slots`` slots."""
        shapes = {
            "t": ((slots,), torch.float32),
            "xt": ((slots, *self._feature_shape), self._dtype),
            "ut": ((slots, *self._feature_shape), self._dtype),
        }
        if self._labelled:
            shapes["y"] = ((slots,), LABEL_DTYPE)
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
                filename = os.path.join(self._path, FILES[name])
                numel = math.prod(shape)
                os.truncate(filename, numel * dtype.itemsize)  # new bytes read as zeros
                buffers[name] = torch.from_file(filename, shared=True, size=numel, dtype=dtype).view(shape)
        self._t, self._xt, self._ut = buffers["t"], buffers["xt"], buffers["ut"]
        self._y = buffers.get("y")
        self._slots = slots

    def _create_files(self) -> None:
        """Start the empty files of a fresh disk pool, warning if they replace an old pool."""
        os.makedirs(self._path, exist_ok=True)
        if os.path.exists(os.path.join(self._path, META)):
            warnings.warn(
                f"overwriting the trajectory pool stored under path={self._path!r}; "
                "use TrajectoryPool.open or load_state_dict to resume it",
                stacklevel=3,
            )
        used = self._slot_shapes(1)
        for name, filename in FILES.items():
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
            filename = os.path.join(self._path, FILES[name])
            slot_bytes = math.prod(shape) * dtype.itemsize
            file_bytes = os.path.getsize(filename) if os.path.exists(filename) else 0
            if file_bytes % slot_bytes or file_bytes < size * slot_bytes:
                raise ValueError(
                    f"path={self._path!r}: {FILES[name]} is missing or does not hold {size} slots of "
                    f"{slot_bytes} bytes; the files do not match the pool's state"
                )
            slots = min(slots, file_bytes // slot_bytes)
        return slots

    def _write_meta(self) -> None:
        if self._storage != "disk" or self._feature_shape is None:
            return
        meta = {
            "capacity": self._capacity,
            "dtype": DTYPE_NAMES[self._dtype],
            "feature_shape": list(self._feature_shape),
            "labelled": self._labelled,
            "head": self._head,
            "size": self._size,
            "n_added": self._n_added,
        }
        tmp = os.path.join(self._path, META + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(meta, handle)
        os.replace(tmp, os.path.join(self._path, META))

    def flush(self) -> None:
        """Ask the OS to write a disk pool's files (a no-op for a memory pool); closing needs no flush."""
        if self._storage == "disk" and self._t is not None:
            for name in self._buffers():
                fd = os.open(os.path.join(self._path, FILES[name]), os.O_RDONLY)
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
            "dtype": None if self._dtype is None else DTYPE_NAMES[self._dtype],
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
        dtype_from_name(state["dtype"])
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
            probe = type(self)(1, storage="disk", path=self._path)
            probe._configure(
                tuple(state["feature_shape"]),
                dtype_from_name(state["dtype"]),
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
            self._configure(tuple(state["feature_shape"]), dtype_from_name(state["dtype"]), labelled)
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
