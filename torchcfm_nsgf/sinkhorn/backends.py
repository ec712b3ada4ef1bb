r"""The reductions of the Sinkhorn loop, on one problem's point clouds: the backend interface and its
dense and streaming implementations.

The loop (:mod:`torchcfm_nsgf.sinkhorn.solver`) needs three soft-min reductions and two barycentric
projections, over the pairs of clouds ``"xy"`` (rows: particles x, columns: targets y), ``"yx"`` and
``"xx"``:

.. math::
    \mathrm{softmin}(h)_i = -\varepsilon \log \sum_j \exp\big(h_j - C(r_i, c_j)/\varepsilon\big), \qquad
    \mathrm{proj}(h)_i = \sum_j \mathrm{softmax}_j\big(h_j - C(r_i, c_j)/\varepsilon\big)\, c_j,

with :math:`C(u, v) = \tfrac12\|u - v\|^2`, rows :math:`r` and columns :math:`c` of the pair, and
:math:`h_j = \log w_j + \mathrm{potential}_j/\varepsilon` (the column weights folded in). A backend is
anything that evaluates them; the loop never sees a cost matrix.

* :class:`DenseBackend`: the cost matrices are formed once (``n m + n n`` numbers), the reductions run over
  row tiles of them. Fastest while the matrices fit in memory, and the only choice that pays off when the
  cost is expensive to recompute (high dimension).
* :class:`StreamingBackend`: the cost of each row tile is recomputed at every reduction; memory
  :math:`O((n + m) d + \text{tile})`. The same numbers as :class:`DenseBackend` to rounding (bit for bit
  up to 8 features, where both form the cost coordinate by coordinate).

Both run on any device; the tile size adapts to it (larger on accelerators).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "DenseBackend",
    "SinkhornBackend",
    "StreamingBackend",
    "available_memory",
    "check_backend",
    "choose_backend",
    "exp_shifted_",
]

# Below this many features the cost is formed coordinate by coordinate (exact for nearby points);
# above it through one matrix product, after centring the clouds to limit cancellation.
DIRECT_COST_MAX_DIM = 8

# Elements of one reduction tile (rows x columns): 16 MiB of float32 on CPU, 256 MiB on accelerators.
_TILE_ELEMS_CPU = 1 << 22
_TILE_ELEMS_ACCEL = 1 << 26

PAIRS = ("xy", "yx", "xx")


def exp_shifted_(z: Tensor) -> Tensor:
    r"""``exp`` in place of exponents already shifted by their row maximum (all <= 0), clamped from below first.

    The vectorised CPU ``exp`` leaves its fast path for arguments whose result underflows (below about
    -87 in float32, -708 in float64) and is then 10-50x slower per entry; in a soft-min most entries are
    that far below the row's maximum. Clamping them to ``log(tiny) + 7`` keeps every result a normal number
    on the fast path and changes a row's sum (at least 1, from its maximum) by at most ``m * exp(log(tiny) + 7)``
    relative: 2e-35 m in float32, far below rounding for any m.
    """
    return z.clamp_(min=_exp_floor(z.dtype)).exp_()


def _exp_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 7.0


def half_sq_dist(x: Tensor, y: Tensor, *, out: Tensor | None = None, diag: int | None = None) -> Tensor:
    r""":math:`C_{ij} = \tfrac12\|x_i - y_j\|^2` for flattened clouds x (n, d), y (m, d), optionally into ``out``.

    ``diag``: when x is a block of rows of y (the symmetric problem), the column of x's first row in y;
    the entries :math:`C_{i, i + \mathrm{diag}}` are set to exactly 0 (the matrix product leaves rounding).
    """
    n, d = x.shape
    m = y.shape[0]
    if out is None:
        out = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if d <= DIRECT_COST_MAX_DIM:
        out.zero_()
        for k in range(d):
            out.add_((x[:, k, None] - y[None, :, k]).square_())
        return out.mul_(0.5)
    # In place (no n x m temporary): out = ½|x|² + ½|y|² - x·y.
    torch.add(0.5 * (x * x).sum(1, keepdim=True), 0.5 * (y * y).sum(1)[None, :], out=out)
    out.addmm_(x, y.T, alpha=-1.0).clamp_min_(0.0)
    if diag is not None:
        k = min(n, m - diag)
        if k > 0:
            out[:k, diag : diag + k].fill_diagonal_(0.0)
    return out


def available_memory(device: torch.device) -> int:
    """Bytes that one more allocation on ``device`` can take without failing (best effort).

    CUDA: the driver's free memory plus what PyTorch's allocator holds in reserve. CPU: the kernel's
    ``MemAvailable`` (Linux), else a conservative 4 GiB.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return 4 << 30


class SinkhornBackend:
    r"""The interface between the Sinkhorn loop and the data: soft-min reductions and projections.

    Attributes
    ----------
    name : str
        Recorded in :attr:`SinkhornSolution.backend`.
    x : Tensor, shape (n, d)
        This process's particles (flattened, centred, in the working dtype).
    y : Tensor, shape (m, d)
        All target samples.
    log_a, log_b : Tensor, shape (n,) and (m,)
        Log-weights of ``x`` and ``y``.

    Subclasses implement :meth:`softmin`, :meth:`project` and :meth:`max_cost`. A backend that solves
    part of the annealing elsewhere (a coarse problem) overrides :meth:`start`; one whose particles are
    spread over processes overrides :meth:`total`.
    """

    name = "base"
    #: Iterations at which convergence is tested besides every ``check_every``-th (for backends whose
    #: start is nearly converged and whose iterations are costly).
    early_checks: tuple[int, ...] = ()

    def __init__(self, x: Tensor, y: Tensor, log_a: Tensor, log_b: Tensor) -> None:
        self.x, self.y, self.log_a, self.log_b = x, y, log_a, log_b
        self.a, self.b = log_a.exp(), log_b.exp()

    # -- the reductions ------------------------------------------------------------------------------
    def softmin(self, pair: str, h: Tensor, eps: float) -> Tensor:
        r""":math:`-\varepsilon\log\sum_j \exp(h_j - C_{ij}/\varepsilon)` over the columns of ``pair``; (rows,)."""
        raise NotImplementedError

    def project(self, pair: str, h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """Barycentric projection (rows, d) onto the columns of ``pair`` ("xy" or "xx") and the softmin (rows,)."""
        raise NotImplementedError

    def max_cost(self) -> float:
        """The largest cost of the cross and symmetric problems: the start of the ε-scaling schedule."""
        raise NotImplementedError

    # -- hooks with defaults -------------------------------------------------------------------------
    def total(self, t: Tensor) -> Tensor:
        """Sum over processes of a per-process partial sum over particles (identity in one process)."""
        return t

    def level_done(self, g: Tensor, p: Tensor, eps: float) -> None:
        """Called by the annealing after each ε level with the current potentials (for backends whose
        kernel depends on them, such as a truncated one). Does nothing by default."""

    def start(self, schedule, anneal, warm: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, int]:
        r"""Potentials ``(g, p)`` to begin the final-ε iterations with, and the annealing levels run.

        ``schedule()`` returns the ε-scaling levels (from :meth:`max_cost` down to the final ε);
        ``anneal(backend, g, p, levels)`` runs one Sinkhorn update per level; ``warm`` is a previous
        solution's ``(g, p)`` (then no level is run here).
        """
        if warm is not None:
            return warm[0], warm[1], 0
        levels = schedule()
        g, p = anneal(self, self.y.new_zeros(self.y.shape[0]), self.x.new_zeros(self.x.shape[0]), levels)
        return g, p, len(levels)


class _TiledBackend(SinkhornBackend):
    """Reductions over row tiles of a cost that is either stored (:class:`DenseBackend`) or recomputed."""

    store = False

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        log_a: Tensor,
        log_b: Tensor,
        *,
        x_cols: Tensor | None = None,
        col_offset: int = 0,
        tile_elems: int | None = None,
    ) -> None:
        super().__init__(x, y, log_a, log_b)
        # The symmetric problem's columns: all particles (this process's own, or gathered from all).
        self.x_cols = x if x_cols is None else x_cols
        self.col_offset = col_offset
        self.clouds = {"xy": (x, y), "yx": (y, x), "xx": (x, self.x_cols)}
        if tile_elems is None:
            tile_elems = _TILE_ELEMS_CPU if x.device.type == "cpu" else _TILE_ELEMS_ACCEL
        widest = max(y.shape[0], x.shape[0], self.x_cols.shape[0])
        rows = max(x.shape[0], y.shape[0])
        self._buf = torch.empty(min(max(tile_elems, widest), rows * widest), dtype=x.dtype, device=x.device)
        self._costs: dict[str, Tensor] = {}
        if self.store:
            self._costs = {"xy": half_sq_dist(x, y), "xx": half_sq_dist(x, self.x_cols, diag=col_offset)}

    def _tiles(self, pair: str):
        rows, cols = self.clouds[pair]
        n, m = rows.shape[0], cols.shape[0]
        step = max(1, self._buf.numel() // m)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z = self._buf[: (r1 - r0) * m].view(r1 - r0, m)
            if self.store:
                # "yx" reads column tiles of C_xy (a transposed view: the same numbers, no copy).
                c = self._costs["xy"][:, r0:r1].T if pair == "yx" else self._costs[pair][r0:r1]
            else:
                diag = self.col_offset + r0 if pair == "xx" else None
                c = half_sq_dist(rows[r0:r1], cols, out=z, diag=diag)
            yield r0, r1, c, z

    @staticmethod
    def _exp_tile(c: Tensor, h: Tensor, eps: float, z: Tensor) -> tuple[Tensor, Tensor]:
        torch.add(h[None, :], c, alpha=-1.0 / eps, out=z)
        zmax = z.amax(dim=1)
        exp_shifted_(z.sub_(zmax[:, None]))
        return zmax, z.sum(1)

    def softmin(self, pair: str, h: Tensor, eps: float) -> Tensor:
        if self.store and pair == "yx":
            return self._softmin_columns(h, eps)
        rows = self.clouds[pair][0]
        out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
        for r0, r1, c, z in self._tiles(pair):
            zmax, s = self._exp_tile(c, h, eps, z)
            out[r0:r1] = -eps * (zmax + s.log())
        return out

    def _softmin_columns(self, h: Tensor, eps: float) -> Tensor:
        r"""The "yx" soft-min over the stored :math:`C_{xy}`, reduced along its columns tile by tile.

        Reading row tiles of :math:`C_{yx} = C_{xy}^T` would stride through memory (several times slower
        than the other reductions); instead each contiguous row tile of :math:`C_{xy}` updates a running
        column-wise log-sum-exp (running maximum and rescaled sum).
        """
        c_xy = self._costs["xy"]
        n, m = c_xy.shape
        top = torch.full((m,), -torch.inf, dtype=h.dtype, device=h.device)
        total = torch.zeros(m, dtype=h.dtype, device=h.device)
        step = max(1, self._buf.numel() // m)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z = self._buf[: (r1 - r0) * m].view(r1 - r0, m)
            torch.add(h[r0:r1, None], c_xy[r0:r1], alpha=-1.0 / eps, out=z)
            new_top = torch.maximum(top, z.amax(dim=0))
            total.mul_(exp_shifted_(top - new_top)).nan_to_num_(nan=0.0)
            total.add_(exp_shifted_(z.sub_(new_top)).sum(0))
            top = new_top
        return -eps * (top + total.log())

    def project(self, pair: str, h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        rows, cols = self.clouds[pair]
        out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
        proj = torch.empty(rows.shape[0], cols.shape[1], dtype=rows.dtype, device=rows.device)
        for r0, r1, c, z in self._tiles(pair):
            zmax, s = self._exp_tile(c, h, eps, z)
            proj[r0:r1] = (z @ cols).div_(s[:, None])
            out[r0:r1] = -eps * (zmax + s.log())
        return proj, out

    def max_cost(self) -> float:
        if self.store:
            return float(torch.maximum(self._costs["xy"].max(), self._costs["xx"].max()))
        top = self.x.new_zeros(())
        for pair in ("xy", "xx"):
            for _, _, c, _ in self._tiles(pair):
                top = torch.maximum(top, c.max())
        return float(top)


class DenseBackend(_TiledBackend):
    """Cost matrices formed once: ``C_xy`` (n, m) and ``C_xx`` (n, n), plus one row tile."""

    name = "dense"
    store = True

    @staticmethod
    def memory(n: int, m: int, d: int, itemsize: int, n_cols: int | None = None) -> int:
        """Bytes this backend allocates for n particles, m targets, d features."""
        n_cols = n if n_cols is None else n_cols
        return itemsize * (n * m + n * n_cols + _TILE_ELEMS_CPU + (n + m + n_cols) * d)


class StreamingBackend(_TiledBackend):
    """Cost recomputed tile by tile at every reduction; memory linear in n and m (plus one tile)."""

    name = "streaming"
    store = False


#: The backends :func:`~torchcfm_nsgf.sinkhorn_solve` accepts by name (plus ``"auto"``).
BACKENDS = ("dense", "streaming", "multiscale", "keops")

# "auto" picks the multiscale backend in d <= MULTISCALE_MAX_DIM from this many cost entries (n * m) on.
MULTISCALE_MAX_DIM = 3
MULTISCALE_MIN_ENTRIES = 1 << 20
# "auto" lets the dense backend take at most this share of the memory available.
DENSE_MEMORY_SHARE = 0.5


def check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def choose_backend(
    n: int, m: int, d: int, device: torch.device | str, dtype: torch.dtype, *, free_bytes: int | None = None
) -> str:
    """The backend ``"auto"`` runs for n particles, m targets and d features on ``device``.

    * ``"multiscale"`` in d <= 3 from ``n * m >= MULTISCALE_MIN_ENTRIES`` on: its truncated kernel grows
      about linearly with the number of points, where the others grow as n * m;
    * else ``"dense"`` while its matrices take at most half of ``free_bytes`` (default: what
      :func:`available_memory` reports for ``device``);
    * else ``"streaming"``.

    ``"keops"`` is never chosen automatically (it needs an optional dependency and compiles on first use).
    """
    device = torch.device(device)
    if d <= MULTISCALE_MAX_DIM and n * m >= MULTISCALE_MIN_ENTRIES:
        return "multiscale"
    if free_bytes is None:
        free_bytes = available_memory(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if DenseBackend.memory(n, m, d, itemsize) <= DENSE_MEMORY_SHARE * free_bytes:
        return "dense"
    return "streaming"


def tiled_softmin(rows: Tensor, cols: Tensor, h: Tensor, eps: float) -> Tensor:
    r""":math:`-\varepsilon\log\sum_j \exp(h_j - \tfrac12\|r_i - c_j\|^2/\varepsilon)` for rows (n, d), cols (m, d), h (m,), in row tiles."""
    m = cols.shape[0]
    tile = _TILE_ELEMS_CPU if rows.device.type == "cpu" else _TILE_ELEMS_ACCEL
    step = max(1, tile // m)
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    for r0 in range(0, rows.shape[0], step):
        z = half_sq_dist(rows[r0 : r0 + step], cols)
        zmax, s = _TiledBackend._exp_tile(z, h, eps, z)
        out[r0 : r0 + step] = -eps * (zmax + s.log())
    return out
