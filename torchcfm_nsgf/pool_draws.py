"""How a trajectory pool serves batches: uniform, class-balanced, or at given times.

:class:`PoolDraws` is the part of :class:`~torchcfm_nsgf.TrajectoryPool` that draws items from its buffers
(:mod:`torchcfm_nsgf.pool_storage`), every draw through the pool's generator on that generator's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._transfer import to_device
from ._validation import check_positive

__all__ = ["PoolDraws"]


class PoolDraws:
    """Batches drawn from a pool's buffers (the attributes are the pool's own)."""

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
            idx = to_device(self._draw_balanced(batch_size), self._device)
        else:
            idx = to_device(self._draw_indices(batch_size), self._device)
        t, xt, ut = self._t[idx], self._xt[idx], self._ut[idx]
        out = (
            to_device(t, out_device, dtype),
            to_device(xt, out_device, dtype),
            to_device(ut, out_device, dtype),
        )
        if self._labelled:
            return (*out, to_device(self._y[idx], out_device))
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
