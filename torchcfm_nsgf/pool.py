"""Trajectory pool: the experience replay of NSGF training (Algorithm 1 of Zhu et al., 2024).

The simulation phase stores the particles ``X_k``, their empirical Sinkhorn velocity ``v̂_k`` and time ``t_k``;
the matching phase draws minibatches ``(t, x_t, u_t)`` from the pool to regress ``v_θ(x_t, t) ≈ u_t``.
The paper's CIFAR-10 pool reportedly took about 45 GB, so storage precision, device and medium
(RAM or memory-mapped files) are chosen by the user, and the size can be bounded in bytes.

For class-conditional (guided) training each item can carry an integer class label ``y``, stored next to it
and served with it (optionally in class-balanced batches).

The pool is one class built from two parts: its storage (:mod:`torchcfm_nsgf.pool_storage`, memory or
memory-mapped files) and its draws (:mod:`torchcfm_nsgf.pool_draws`); this module holds the ring of items,
its checks and its checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import torch
from torch import Tensor

from ._validation import check_cloud, check_labels, check_positive
from .pool_draws import PoolDraws
from .pool_storage import DTYPE_NAMES, LABEL_DTYPE, META, STORAGE_DTYPES, PoolStorage

__all__ = ["TrajectoryPool"]


class TrajectoryPool(PoolDraws, PoolStorage):
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
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())} or None, got {dtype}")
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
            if dtype not in STORAGE_DTYPES:
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
                new["y"] = y[k - keep :].to(device=self._device, dtype=LABEL_DTYPE)
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

    def clear(self) -> None:
        """Remove all items. Buffers stay allocated, and the feature shape and dtype stay fixed."""
        self._head = 0
        self._size = 0
        self._write_meta()

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> TrajectoryPool:
        """Reopen the disk pool stored under ``path`` (from its ``pool.json``), with its items and counters."""
        meta_file = os.path.join(os.fspath(path), META)
        if not os.path.exists(meta_file):
            raise ValueError(f"path={os.fspath(path)!r} holds no trajectory pool ({META} is missing)")
        with open(meta_file) as handle:
            meta = json.load(handle)
        pool = cls(meta["capacity"], storage="disk", path=path, generator=generator)
        pool.load_state_dict({"storage": "disk", "generator_state": None, **meta})
        return pool
