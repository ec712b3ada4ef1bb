r"""One Sinkhorn problem whose particles are split over the processes of ``torch.distributed``.

Each process holds its own particles :math:`x^{(r)}` (rows) and passes its own target samples; the targets
of all processes are gathered, so that every process solves for the same target
:math:`\nu = \frac1m \sum_j \delta_{y_j}` and the particles of all processes form one source
:math:`\mu = \frac1n \sum_i \delta_{x_i}`. The reductions then split as follows:

* ``"xy"`` (particles over targets): local rows, no communication;
* ``"yx"`` (targets over particles): each process reduces over its own particles, and the partial
  log-sum-exps are combined across processes (an all-reduce of the maxima, then of the rescaled sums);
* ``"xx"`` (the symmetric problem): local rows over all particles, whose positions are gathered once and
  whose potentials are gathered at each reduction (n numbers).

The potential :math:`g` on the targets is identical on every process, the particles' potentials stay
local, and the marginal errors are summed over processes (:meth:`ShardedBackend.total`), so that every
process takes the same stopping decision. The collectives work with any backend of ``torch.distributed``
(gloo on CPU, NCCL on GPU); the per-process reductions are the dense or streaming backend's.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import DenseBackend, SinkhornBackend, StreamingBackend, available_memory

__all__ = [
    "ShardedBackend",
    "gather_targets",
    "global_mean",
    "global_moments",
    "global_rms",
    "shared_classes",
    "sharded_log_weights",
]


def _check_initialised() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs torch.distributed initialised (torch.distributed.init_process_group)"
        )


def _sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(s) for s in out]


def _gather(t: Tensor, sizes: list[int]) -> Tensor:
    """Concatenation, in rank order, of every process's ``t`` (sizes[r], ...) along dim 0."""
    top = max(sizes)
    pad = t.new_zeros((top, *t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


def gather_targets(y: Tensor) -> Tensor:
    """All processes' target samples (m_total, d), in rank order."""
    _check_initialised()
    return _gather(y, _sizes(y.shape[0], y.device))


def global_mean(x: Tensor) -> Tensor:
    """Mean (d,) of all processes' particles."""
    s = torch.cat((x.sum(0), x.new_tensor([x.shape[0]])))
    dist.all_reduce(s)
    return s[:-1] / s[-1]


def global_moments(y: Tensor) -> tuple[Tensor, float]:
    """Mean (d,) and root-mean-square radius of all processes' samples ``y`` (m_r, d), in float64.

    Two all-reduces (the sums, then the squared distances to the common mean), so every process gets
    bit-identical numbers and takes the same decisions from them.
    """
    _check_initialised()
    yf = y.detach().reshape(y.shape[0], -1).double()
    s = torch.cat((yf.sum(0), yf.new_tensor([yf.shape[0]])))
    dist.all_reduce(s)
    mean = s[:-1] / s[-1]
    sq = (yf - mean).square().sum().reshape(1)
    dist.all_reduce(sq)
    return mean, float((sq / s[-1]).sqrt())


def global_rms(t: Tensor) -> float:
    """Root mean square over all processes' rows of ``t`` (n_r, ...): the square root of the mean of ``|row|^2``."""
    _check_initialised()
    s = torch.stack((t.detach().double().square().sum(), t.new_tensor(t.shape[0], dtype=torch.float64)))
    dist.all_reduce(s)
    return float((s[0] / s[1]).sqrt())


def shared_classes(labels: Tensor) -> Tensor:
    """The sorted classes of this process's ``labels`` (k,), when every process holds the same classes.

    A class-conditional sharded flow solves one problem per class, each a collective of all processes, so
    every process must take part in every class's solve. A class that some processes hold and others do not
    raises a ``ValueError`` on every process (all of them see the same reduced counts), where the solves
    would otherwise wait on each other forever.
    """
    _check_initialised()
    local = labels.unique()
    k = torch.tensor([int(local.max()) + 1 if local.numel() else 0], dtype=torch.long, device=labels.device)
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    present = torch.zeros(int(k), dtype=torch.long, device=labels.device)
    present[local.long()] = 1
    everywhere, anywhere = present.clone(), present
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    partial = torch.nonzero(anywhere > everywhere).flatten().tolist()
    if partial:
        raise ValueError(
            f"distributed=True: the classes {partial} occur among the particles of some processes and not "
            "of others; a sharded class-conditional flow needs every class on every process (pass more "
            "rows per process, or distributed=False for one flow per process)"
        )
    return local


def sharded_log_weights(n: int, m: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform log-weights of this process's n particles (over all processes' particles) and of the m targets."""
    n_total = sum(_sizes(n, like.device))
    return (
        torch.full((n,), -math.log(n_total), dtype=like.dtype, device=like.device),
        torch.full((m,), -math.log(m), dtype=like.dtype, device=like.device),
    )


class ShardedBackend(SinkhornBackend):
    """This process's share of one problem, over a dense or streaming backend (see the module docstring)."""

    def __init__(self, inner: DenseBackend | StreamingBackend, sizes: list[int]) -> None:
        super().__init__(inner.x, inner.y, inner.log_a, inner.log_b)
        self.inner = inner
        self.sizes = sizes
        self.name = "sharded-" + inner.name

    @classmethod
    def build(
        cls, name: str, x: Tensor, y: Tensor, log_a: Tensor, log_b: Tensor, *, eps: float
    ) -> ShardedBackend:
        _check_initialised()
        if name not in ("auto", "dense", "streaming"):
            raise ValueError(f"distributed solves run the dense or streaming backend, got backend={name!r}")
        sizes = _sizes(x.shape[0], x.device)
        rank = dist.get_rank()
        x_all = _gather(x, sizes)
        if name == "auto":
            itemsize = x.element_size()
            need = DenseBackend.memory(x.shape[0], y.shape[0], x.shape[1], itemsize, n_cols=x_all.shape[0])
            name = "dense" if need <= 0.5 * available_memory(x.device) else "streaming"
        kind = DenseBackend if name == "dense" else StreamingBackend
        inner = kind(x, y, log_a, log_b, x_cols=x_all, col_offset=sum(sizes[:rank]))
        return cls(inner, sizes)

    def softmin(self, pair: str, h: Tensor, eps: float) -> Tensor:
        if pair == "xy":
            return self.inner.softmin("xy", h, eps)
        if pair == "xx":
            return self.inner.softmin("xx", _gather(h, self.sizes), eps)
        # "yx": combine the per-process log-sum-exps over their own particles.
        u = self.inner.softmin("yx", h, eps).div_(-eps)
        top = u.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        s = (u - top).exp_()
        dist.all_reduce(s)
        return -eps * (top + s.log())

    def project(self, pair: str, h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        if pair == "xx":
            h = _gather(h, self.sizes)
        return self.inner.project(pair, h, eps)

    def max_cost(self) -> float:
        t = torch.tensor(self.inner.max_cost(), dtype=self.x.dtype, device=self.x.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def total(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t
