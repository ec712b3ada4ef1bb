r"""The multiscale backend for low-dimensional clouds (d <= 3): clusters, a coarse annealing, kernel truncation.

In few dimensions the entropic plan of a row is concentrated on a small neighbourhood of its transport
target, so most of the n x m kernel is negligible. This backend (the scheme of Schmitzer 2019 and
GeomLoss's ``multiscale`` backend, written here in plain torch, without KeOps):

1. groups each cloud into clusters of about ``cluster_size`` points by recursive median splits along the
   widest coordinate (a k-d tree; clusters are compact and of equal size up to one point);
2. runs the ε-scaling levels above ``switch`` on the coarse problem between the cluster centroids,
   weighted by their clusters' mass (dense, small); ``switch`` is the squared cluster radius (times
   ``switch_factor**2``), below which the centroids no longer represent their clusters;
3. extrapolates the coarse potentials to the points (one soft-min of the points against the coarse
   clouds) and keeps the cluster pairs (I, J) that may hold a pair of points whose gap
   :math:`C(x_i, y_j) - f_i - g_j` is at most ``truncate``·ε (the plan is
   :math:`\pi_{ij} = a_i b_j \exp(-\mathrm{gap}_{ij}/\varepsilon)`). The test is a rigorous lower bound of the gap over the block: with
   :math:`\varphi_i = \tfrac12\|x_i\|^2 - f_i`, :math:`\psi_j = \tfrac12\|y_j\|^2 - g_j`, centroids
   :math:`X_I, Y_J` and radii :math:`r_I, r_J`,

   .. math::
       C_{ij} - f_i - g_j \;\ge\; \min_{i \in I}(\varphi_i - x_i\cdot Y_J) + \min_{j \in J}(\psi_j - X_I\cdot y_j)
       + X_I\cdot Y_J - r_I r_J,

   so every dropped entry carries at most :math:`e^{-\mathrm{truncate}}` times :math:`a_i b_j` under the
   potentials of the truncation; it is recomputed after every fine ε level, as the plan narrows;
4. runs the remaining levels and the final-ε iterations of the loop on the fine points, each soft-min
   over the kept cluster pairs only (dense tiles of ``rows of a cluster x columns of its kept clusters``,
   the exponent formed by one batched matrix product).

A warm start is not used: the coarse annealing (cheap) places the truncation anyway, and the potentials
extrapolated from it were a better start than the previous flow step's in the measurements (a step of size
1 moves the particles far), so ``n_anneal`` counts the coarse levels even then.

The result differs from the dense backend's by the truncated mass, which ``truncate`` bounds; the tests
compare both at equal tolerance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import DenseBackend, SinkhornBackend, exp_shifted_, tiled_softmin

__all__ = ["MultiscaleBackend", "kd_clusters"]

_TILE_ELEMS = 1 << 22
# Elements of one exponent tile inside a chunk: 2 MiB of float32, one core's share of L2 on common CPUs.
_SUB_ELEMS = 1 << 19


def kd_clusters(x: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Order of the points (n,) that makes ``2**levels`` k-d-tree clusters contiguous, and each ordered point's cluster.

    Each level splits every cluster at the median of its widest coordinate; cluster sizes differ by at most one.
    """
    n, d = x.shape
    order = torch.arange(n, device=x.device)
    gid = torch.zeros(n, dtype=torch.long, device=x.device)
    for lev in range(levels):
        n_groups = 1 << lev
        pts = x[order]
        idx = gid[:, None].expand(-1, d)
        lo = pts.new_full((n_groups, d), math.inf).scatter_reduce(0, idx, pts, "amin")
        hi = pts.new_full((n_groups, d), -math.inf).scatter_reduce(0, idx, pts, "amax")
        dim = (hi - lo).argmax(1)
        key = pts.gather(1, dim[gid][:, None]).squeeze(1)
        o1 = torch.argsort(key, stable=True)
        o2 = torch.argsort(gid[o1], stable=True)
        perm = o1[o2]
        order, gid = order[perm], gid[perm]
        counts = torch.bincount(gid, minlength=n_groups)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(n, device=x.device) - starts[gid]
        gid = 2 * gid + (rank >= (counts[gid] + 1) // 2).long()
    return order, gid


class _Clusters:
    """One cloud grouped into K clusters, in a padded layout (K + 1, S, d); cluster K is empty padding."""

    def __init__(self, x: Tensor, log_w: Tensor, size: int, max_clusters: int) -> None:
        n, d = x.shape
        levels = max(0, int(math.floor(math.log2(max(n / size, 1.0)))))
        levels = min(levels, int(math.log2(max_clusters)))
        order, gid = kd_clusters(x, levels)
        k = 1 << levels
        counts = torch.bincount(gid, minlength=k)
        starts = counts.cumsum(0) - counts
        s = int(counts.max())
        slot = torch.arange(n, device=x.device) - starts[gid]
        self.k, self.s, self.n = k, s, n
        self.points = x
        # Position of every original point in the flattened padded layout.
        self.pos = torch.empty(n, dtype=torch.long, device=x.device)
        self.pos[order] = gid * s + slot
        pts = x.new_zeros((k + 1) * s, d)
        pts[self.pos] = x
        self.pts = pts.view(k + 1, s, d)
        mask = torch.zeros((k + 1) * s, dtype=torch.bool, device=x.device)
        mask[self.pos] = True
        self.mask = mask.view(k + 1, s)
        w = log_w.exp()
        wc = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, gid, w[order])
        cnt = counts.to(x.dtype)
        # Centroids: weighted means (plain means for clusters without mass).
        num = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, gid, x[order] * w[order, None])
        mean = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, gid, x[order]) / cnt[:, None]
        self.centroids = torch.where(wc[:, None] > 0, num / wc.clamp_min(1e-300)[:, None], mean)
        self.log_w = wc.log()
        dist = (self.pts[:k] - self.centroids[:, None, :]).norm(dim=2).masked_fill(~self.mask[:k], 0.0)
        self.radius = dist.amax(1)

    def pad(self, v: Tensor, fill: float) -> Tensor:
        """A vector over the points (n,) in the padded layout (K + 1, S), ``fill`` in the padding."""
        out = v.new_full(((self.k + 1) * self.s,), fill)
        out[self.pos] = v
        return out.view(self.k + 1, self.s)

    def unpad(self, v: Tensor) -> Tensor:
        return v.reshape(-1)[self.pos]


class _SparsePair:
    """Row clusters and, for each, the column clusters kept by the truncation; reductions over them."""

    def __init__(self, rows: _Clusters, cols: _Clusters, keep: Tensor) -> None:
        self.rows, self.cols = rows, cols
        n_kept = keep.sum(1)
        by_size = torch.argsort(n_kept)
        self.order = by_size
        lmax = max(1, int(n_kept.max()))
        # Kept column clusters of each row cluster, the dummy (empty) cluster in the padding.
        col_ids = torch.arange(cols.k, device=keep.device).expand(rows.k, -1)
        rank = keep.long().cumsum(1) - 1
        nbr = torch.full((rows.k, lmax), cols.k, dtype=torch.long, device=keep.device)
        r_idx = torch.arange(rows.k, device=keep.device)[:, None].expand(-1, cols.k)
        nbr[r_idx[keep], rank[keep]] = col_ids[keep]
        self.nbr = nbr[by_size]
        self.n_kept = n_kept[by_size]
        self.kept_pairs = int(n_kept.sum()) / (rows.k * cols.k)
        # Every row's last soft-min (padded layout), the shift of the next reduction's exponents.
        self._prev: Tensor | None = None
        #: Chunks whose folded shift was out of range and were redone with their maxima (diagnostic).
        self.redone_chunks = 0
        # Chunks of row clusters with similar numbers of kept clusters, each within the tile budget.
        self.chunks: list[tuple[int, int, int]] = []
        widths = [max(1, k) for k in self.n_kept.tolist()]
        r0 = 0
        while r0 < rows.k:
            r1 = r0 + 1
            while r1 < rows.k and (r1 + 1 - r0) * rows.s * widths[r1] * cols.s <= _TILE_ELEMS:
                r1 += 1
            self.chunks.append((r0, r1, widths[r1 - 1]))
            r0 = r1

    @staticmethod
    def _sums(
        hc: Tensor, r: Tensor, c: Tensor, cpts: Tensor | None, eps: float, *, shifted: bool
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Row sums of ``exp(hc + r c^T / eps)`` (B, R), shifted by the row maxima (returned) unless
        ``shifted``, and with ``cpts`` the weighted sums of the columns (B, R, d).

        On the CPU the rows go through in slices whose exponent tile fits in a core's cache
        (``_SUB_ELEMS``): the product, the clamp, the ``exp`` and the sums then read and write cache, not
        memory.
        """
        b, n_rows = r.shape[:2]
        width = c.shape[1]
        # Slices for the CPU's caches; an accelerator takes the chunk at once (fewer, larger kernels).
        step = max(1, _SUB_ELEMS // (b * width)) if hc.device.type == "cpu" else n_rows
        c_t = c.transpose(1, 2)
        top = None if shifted else hc.new_empty(b, n_rows)
        s = hc.new_empty(b, n_rows)
        pj = None if cpts is None else hc.new_empty(b, n_rows, cpts.shape[2])
        buf = hc.new_empty(b * min(step, n_rows) * width)
        for q0 in range(0, n_rows, step):
            q1 = min(n_rows, q0 + step)
            z = buf[: b * (q1 - q0) * width].view(b, q1 - q0, width)
            torch.baddbmm(hc, r[:, q0:q1], c_t, alpha=1.0 / eps, out=z)
            if top is not None:
                m = z.amax(2)
                top[:, q0:q1] = m
                z.sub_(m[..., None])
            exp_shifted_(z)
            s[:, q0:q1] = z.sum(2)
            if pj is not None:
                pj[:, q0:q1] = torch.bmm(z, cpts)
        return top, s, pj

    def reduce(self, h: Tensor, eps: float, project: bool) -> tuple[Tensor, Tensor | None]:
        r"""Soft-min (and projection) of every row over its kept columns.

        Per chunk, the points are centred at their row cluster's centroid c and the exponent is formed by
        one batched product: :math:`h_j - \tfrac12\|x_i - y_j\|^2/\varepsilon = (x'_i \cdot y'_j)/\varepsilon
        + (h_j - \tfrac12\|y'_j\|^2/\varepsilon) - \tfrac12\|x'_i\|^2/\varepsilon` with :math:`x' = x - c`,
        :math:`y' = y - c`; the last term is constant along a row and added back after the reduction.

        Each row's exponents are shifted before ``exp``. The first reduction over these pairs shifts by the
        row's maximum (a pass of its own); later ones shift by the row's previous log-sum-exp, folded into
        the product as one more coordinate (the iterations move it little). A row's sum s then satisfies
        :math:`\log s \ge \max - \text{shift} \ge \log s - \log W` (W: the row's columns), so
        :math:`-40 < \log s < 80` proves that no term overflowed and that the largest stayed 60 above the
        ``exp`` floor; a chunk with a row outside that range is redone with its maxima.
        """
        rows, cols = self.rows, self.cols
        hp = cols.pad(h, -math.inf)
        out = h.new_empty(rows.k + 1, rows.s)
        proj = h.new_empty(rows.k, rows.s, cols.pts.shape[2]) if project else None
        d = rows.pts.shape[2]
        prev = self._prev
        for r0, r1, width in self.chunks:
            ids = self.order[r0:r1]
            center = rows.centroids[ids][:, None, :]
            nb = self.nbr[r0:r1, :width]
            cpts = cols.pts[nb].reshape(r1 - r0, width * cols.s, d) - center
            hc = hp[nb].reshape(r1 - r0, 1, width * cols.s) - (0.5 / eps) * cpts.square().sum(2)[:, None, :]
            rpts = rows.pts[ids] - center
            half_sq = 0.5 * rpts.square().sum(2)
            if prev is not None:
                shift = (half_sq - prev[ids]) / eps
                r_aug = torch.cat((rpts, (-eps * shift)[..., None]), 2)
                c_aug = torch.cat((cpts, cpts.new_ones(cpts.shape[:2] + (1,))), 2)
                _, s, pj = self._sums(hc, r_aug, c_aug, cpts if project else None, eps, shifted=True)
                log_s = s.log()
                valid = rows.mask[ids]
                if bool(((log_s > -40.0) & (log_s < 80.0) | ~valid).all()):
                    top = shift
                else:
                    prev = None
                    self.redone_chunks += 1
            if prev is None:
                top, s, pj = self._sums(hc, rpts, cpts, cpts if project else None, eps, shifted=False)
                log_s = s.log()
                prev = self._prev
            out[ids] = -eps * (top + log_s) + half_sq
            if proj is not None:
                proj[ids] = pj.div_(s[..., None]).add_(center)
        out[rows.k] = 0.0
        self._prev = out
        res = rows.unpad(out)
        return res, (None if proj is None else proj.reshape(-1, proj.shape[2])[rows.pos])


class MultiscaleBackend(SinkhornBackend):
    """Clusters + coarse annealing + truncated fine kernel, for d <= 3 (see the module docstring).

    Parameters
    ----------
    cluster_size : int
        Points per cluster (about), while that gives at most ``max_clusters`` clusters.
    max_clusters : int
        Cap on the clusters of one cloud (the coarse problem is dense: ``max_clusters**2`` entries). Beyond
        ``cluster_size * max_clusters`` points the clusters grow instead: at n = 65 536 in 2D, clusters of 64
        points ran a 2-step flow in 18 s where clusters of 32 took 25 s (2 threads; BENCHMARKS §1): the
        looser truncation of larger clusters keeps a few more entries, but each batched product runs over
        twice the rows per gathered column block.
    truncate : float
        Kept cluster pairs: those whose lower bound of the gap is at most ``truncate``·ε.
    switch_factor : float
        Levels with ε above ``(switch_factor * r)**2`` (r: the median cluster radius) run on the coarse problem.
    """

    name = "multiscale"
    cluster_size = 8
    max_clusters = 1024
    early_checks = (1, 2, 3, 5)
    truncate = 10.0
    switch_factor = 2.0

    def __init__(self, x: Tensor, y: Tensor, log_a: Tensor, log_b: Tensor, *, eps: float) -> None:
        super().__init__(x, y, log_a, log_b)
        if x.shape[1] > 3:
            raise ValueError(f"the multiscale backend is for d <= 3 features, got d = {x.shape[1]}")
        self.cx = _Clusters(x, log_a, self.cluster_size, self.max_clusters)
        self.cy = _Clusters(y, log_b, self.cluster_size, self.max_clusters)
        self.eps = eps
        self.pairs: dict[str, _SparsePair] = {}

    def max_cost(self) -> float:
        cx, cy = self.cx, self.cy
        top = 0.0
        for (pa, ra), (pb, rb) in (
            ((cx.centroids, cx.radius), (cy.centroids, cy.radius)),
            ((cx.centroids, cx.radius), (cx.centroids, cx.radius)),
        ):
            dist = torch.cdist(pa, pb) + ra[:, None] + rb[None, :]
            top = max(top, 0.5 * float(dist.max()) ** 2)
        return top

    def start(self, schedule, anneal, warm):
        cx, cy = self.cx, self.cy
        coarse = DenseBackend(cx.centroids, cy.centroids, cx.log_w, cy.log_w)
        levels = schedule()
        r = float(torch.cat((cx.radius, cy.radius)).median())
        switch = (self.switch_factor * r) ** 2
        n_coarse = sum(1 for e in levels if e > switch)
        coarse_levels, fine_levels = levels[:n_coarse], levels[n_coarse:]
        e_c = coarse_levels[-1] if coarse_levels else (levels[0] if levels else self.eps)
        g_c, p_c = anneal(coarse, cy.log_w.new_zeros(cy.k), cx.log_w.new_zeros(cx.k), coarse_levels)
        f_c = coarse.softmin("xy", cy.log_w + g_c / e_c, e_c)
        # Extrapolate the coarse potentials to the points (a soft-min against the coarse clouds), then
        # keep the cluster pairs that can carry mass under them.
        f = tiled_softmin(self.x, cy.centroids, cy.log_w + g_c / e_c, e_c)
        g = tiled_softmin(self.y, cx.centroids, cx.log_w + f_c / e_c, e_c)
        p = tiled_softmin(self.x, cx.centroids, cx.log_w + p_c / e_c, e_c)
        self._truncate(f, g, p, e_c)
        g, p = anneal(self, g, p, fine_levels)
        return g, p, len(levels)

    def level_done(self, g: Tensor, p: Tensor, eps: float) -> None:
        # Re-truncate at every fine level: the plan narrows as ε falls. f: the last soft-min over the
        # targets, whose c-transform g is (the anneal step is f = T(g_old), g = T(f)).
        self._truncate(self._last_f, g, p, eps)

    def _min_linear(self, cl: _Clusters, val: Tensor, centers: Tensor) -> Tensor:
        r""":math:`\min_{i \in I} (\mathrm{val}_i - x_i \cdot c_J)` for every cluster I of ``cl`` and centre c_J; (K, K')."""
        vp = cl.pad(val, math.inf)[: cl.k]
        out = val.new_empty(cl.k, centers.shape[0])
        step = max(1, (1 << 22) // (cl.s * centers.shape[0]))
        for i0 in range(0, cl.k, step):
            i1 = min(cl.k, i0 + step)
            out[i0:i1] = torch.baddbmm(
                vp[i0:i1, :, None], cl.pts[i0:i1], centers.T.expand(i1 - i0, -1, -1), alpha=-1.0
            ).amin(1)
        return out

    def _keep(self, ca: _Clusters, fa: Tensor, cb: _Clusters, gb: Tensor, eps: float) -> Tensor:
        r"""Cluster pairs (I, J) whose smallest gap :math:`C_{ij} - f_i - g_j` may be below ``truncate``·ε.

        With :math:`\varphi_i = \tfrac12\|x_i\|^2 - f_i`, :math:`\psi_j = \tfrac12\|y_j\|^2 - g_j` and
        centroids X, Y, the gap is :math:`\varphi_i - x_i\cdot Y_J + \psi_j - X_I\cdot y_j + X_I\cdot Y_J
        - (x_i - X_I)\cdot(y_j - Y_J)`, bounded below blockwise by the two minima and :math:`-r_I r_J`.
        """
        phi = 0.5 * ca.points.square().sum(1) - fa
        psi = 0.5 * cb.points.square().sum(1) - gb
        lower = (
            self._min_linear(ca, phi, cb.centroids)
            + self._min_linear(cb, psi, ca.centroids).T
            + ca.centroids @ cb.centroids.T
            - ca.radius[:, None] * cb.radius[None, :]
        )
        # Every row and column keeps at least its best partner, whatever the marginals.
        best = (lower == lower.amin(1, keepdim=True)) | (lower == lower.amin(0, keepdim=True))
        return best | (lower <= self.truncate * eps)

    def _truncate(self, f: Tensor, g: Tensor, p: Tensor, eps: float) -> None:
        cx, cy = self.cx, self.cy
        k_xy = self._keep(cx, f, cy, g, eps)
        k_xx = self._keep(cx, p, cx, p, eps)
        k_xx = k_xx | k_xx.T
        self.pairs = {
            "xy": _SparsePair(cx, cy, k_xy),
            "yx": _SparsePair(cy, cx, k_xy.T.contiguous()),
            "xx": _SparsePair(cx, cx, k_xx),
        }

    def kept_fraction(self) -> dict[str, float]:
        """Share of the cluster pairs that the truncation keeps, per pair of clouds (diagnostic)."""
        return {k: v.kept_pairs for k, v in self.pairs.items()}

    def softmin(self, pair: str, h: Tensor, eps: float) -> Tensor:
        out = self.pairs[pair].reduce(h, eps, project=False)[0]
        if pair == "xy":
            self._last_f = out
        return out

    def project(self, pair: str, h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        out, proj = self.pairs[pair].reduce(h, eps, project=True)
        return proj, out
