r"""The matcher's replay: its pool, when a new flow is due, the rows staged for large flows, the drift monitor.

:class:`Replay` holds what :class:`~torchcfm_nsgf.SinkhornFlowMatcher` keeps between calls to serve from a
:class:`~torchcfm_nsgf.TrajectoryPool` (paper Algorithm 1, experience replay): the pool (``"auto"``: built at
the first call), the cadence of new flows (``refresh_every``; with ``flow_size``, scaled by the latest flow's
particles), the latest ``flow_size`` rows of the calls' data (the staging of large flows), and the
:class:`DriftMonitor`, which empties the pool when the targets move away from those of its latest flow.

**Decided on the device.** A call served from the pool without a new flow uses nothing of its data but the
targets' statistics (and, with ``flow_size``, its rows for later). Its checks are computed on the data's
device into one small tensor, :class:`DeviceChecks`: the finiteness of ``x0`` and ``x1``, the sign of the
labels and the drift of the targets. On the CPU the host reads it at once, as a plain check would. On an
accelerator (CUDA) it is copied to pinned host memory without blocking, behind an event, and read at the
start of the matcher's next call (waiting for that event only, not for the work queued since). The call's
random draws (the pool's item indices, the points on the segments, the noise) are made on the CPU from the
generators, as on every device, and copied to the device from pinned memory without blocking. So on CUDA
such a call (no flow, no given ``t``, not ``balanced``) neither blocks the host nor synchronises the stream,
and the training loop keeps running ahead of the device; the next call waits for the event of its checks
only. A ``balanced`` draw reads the pool's labels back to the host, and a given ``t`` scans the pool's times
there: those calls synchronise. What changes there:
a call whose targets drifted is still served from the pool, and the pool is emptied and refreshed at the next
call; bad data of such a call raises at the next call, naming the previous call. Calls that simulate a flow
read everything at once (they synchronise anyway). Sharded flows (``distributed``) always read at once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .pool import TrajectoryPool

__all__ = [
    "CHECKS",
    "DRIFT_SCALES",
    "DRIFT_SCALE_RATIO",
    "DeviceChecks",
    "DriftMonitor",
    "Replay",
    "reads_late",
]

# The pool built by pool="auto": bounded in items and in bytes (about 24 KiB per CIFAR-10 item).
AUTO_POOL_ITEMS = 1_000_000
AUTO_POOL_BYTES = 2**30
# A call's targets count as a new distribution when their mean lies more than this many of the pool's
# scales (plus a sampling allowance that shrinks with the batch) from the mean of the pool's latest flow,
# or when their scale differs from that flow's by more than this factor.
DRIFT_SCALES = 2.0
DRIFT_SCALE_RATIO = 3.0
# The entries of a DeviceChecks vector.
CHECKS = ("x0_finite", "x1_finite", "labels_ok", "drifted", "shift", "ratio")


def reads_late(device: torch.device) -> bool:
    """Whether the checks of a call on ``device`` are read one call late (every device but the CPU)."""
    return device.type != "cpu"


class DeviceChecks:
    """A call's checks as one float64 vector on its device, read by the host at once or one call late.

    Entries: ``x0_finite``, ``x1_finite``, ``labels_ok``, ``drifted`` (1.0 or 0.0), ``shift`` and ``ratio``
    (the drift's mean shift and scale ratio, in scales of the reference).
    """

    def __init__(self, flags: Tensor) -> None:
        self.event = None
        if flags.device.type == "cuda":
            self.host = flags.to("cpu", non_blocking=True)  # pinned memory: the copy does not block
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flags

    def read(self) -> dict[str, float]:
        """The checks as Python numbers (waits for the copy's event only)."""
        if self.event is not None:
            self.event.synchronize()
        host = self.host if self.host.device.type == "cpu" else self.host.cpu()
        return dict(zip(CHECKS, host.numpy().tolist(), strict=True))


class DriftMonitor:
    """Whether a call's targets lie far from those of the pool's latest flow (mean and scale; no solve).

    Attributes
    ----------
    reference : tuple of Tensor, or None
        Mean (d,) and scale (0-dim) of the latest flow's targets, float64 on the device of that flow.
    warned : bool
        Whether the drift warning was given (it is given once until :meth:`reset`).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reference: tuple[Tensor, Tensor] | None = None
        self.warned = False

    def flags(self, stats: tuple[Tensor, Tensor], m: int) -> Tensor:
        """``[drifted, shift, ratio]`` (float64, on the targets' device) of targets with moments ``stats``,
        ``m`` samples, against the reference (zeros without one); reads nothing back."""
        mean, scale = stats
        if self.reference is None:
            return torch.zeros(3, dtype=torch.float64, device=mean.device)
        ref_mean, ref_scale = self.reference
        if ref_mean.device != mean.device:
            ref_mean, ref_scale = ref_mean.to(mean.device), ref_scale.to(mean.device)
            self.reference = (ref_mean, ref_scale)
        shift = (mean - ref_mean).norm()
        allowance = (DRIFT_SCALES + 3.0 / m**0.5) * ref_scale
        ratio = torch.maximum(scale, ref_scale) / torch.clamp(torch.minimum(scale, ref_scale), min=1e-300)
        drifted = shift > allowance
        if m >= 16:
            drifted = drifted | (ratio > DRIFT_SCALE_RATIO)
        per_scale = ref_scale.clamp(min=1e-300)
        return torch.stack([drifted.double(), shift / per_scale, scale / per_scale])

    def warn_once(self, shift: float, ratio: float, stacklevel: int) -> None:
        """Warn that the targets drifted (``stacklevel`` counted from this method), once until :meth:`reset`."""
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"SinkhornFlowMatcher: this call's targets (mean {shift:.1f} scales "
            f"away, scale x{ratio:.2g}) differ from those of the flows in its "
            "pool: the pool's earlier flows were dropped and a flow of this call's batch simulated. "
            "Call reset() when the data changes (or use one matcher per dataset)",
            UserWarning,
            stacklevel=stacklevel,
        )

    def state_dict(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "targets": None if ref is None else {"mean": ref[0].cpu(), "scale": float(ref[1])},
            "warned_drift": self.warned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        targets = state.get("targets")
        if targets is not None:
            mean = targets["mean"].double().cpu()
            self.reference = (mean, torch.tensor(float(targets["scale"]), dtype=torch.float64))
        self.warned = bool(state.get("warned_drift", False))


class Replay:
    """The pool of a matcher, the cadence of its flows, the staged rows of large flows and the drift monitor.

    Parameters
    ----------
    pool : TrajectoryPool, "auto" or None
        As :class:`~torchcfm_nsgf.SinkhornFlowMatcher`'s ``pool``.
    refresh_every : int
        Calls between two flows (``flow_size``: samples served per particle).
    flow_size : int, optional
        Particles of each large flow (the latest rows of the calls are staged for it).
    generator : torch.Generator, optional
        The matcher's generator: an ``"auto"`` pool's generator is seeded from one draw of it.
    """

    def __init__(
        self,
        pool: TrajectoryPool | str | None,
        refresh_every: int,
        flow_size: int | None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.pool: TrajectoryPool | None = None if pool == "auto" else pool
        self.auto = pool == "auto"
        self.refresh_every = refresh_every
        self.flow_size = flow_size
        self.generator = generator
        self.drift = DriftMonitor()
        self.reset_state()

    def reset_state(self) -> None:
        """The cadence, the staged rows, the drift monitor and the pending checks as at construction."""
        # flow_size: the latest rows of the calls' x0, x1 (and y1), the calls since the latest pooled flow
        # and that flow's particles
        self.staged: dict[str, Tensor | None] | None = None
        self.since_flow = 0
        self.last_flow_n = 0
        self.drift.reset()
        self.pending: DeviceChecks | dict[str, float] | None = None

    def reset(self) -> None:
        """Drop the ``"auto"`` pool (empty a caller's pool, which keeps its item shape) and the rest."""
        if self.auto:
            self.pool = None
        elif self.pool is not None:
            self.pool.clear()
        self.reset_state()

    # ------------------------------------------------------------------ the pool
    def ensure_pool(self, device: torch.device) -> None:
        """Build the ``"auto"`` pool on ``device`` at the first call (seeded from the generator)."""
        if self.pool is None and self.auto:
            self.pool = self.new_auto_pool(device)

    def new_auto_pool(self, device: torch.device | str) -> TrajectoryPool:
        generator = None
        if self.generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            generator = torch.Generator().manual_seed(seed)
        return TrajectoryPool(AUTO_POOL_ITEMS, max_bytes=AUTO_POOL_BYTES, device=device, generator=generator)

    def check_shape(self, x0: Tensor) -> None:
        """Refuse a call whose samples have another shape than the pool's items (never serve wrong shapes)."""
        held = None if self.pool is None else self.pool.feature_shape
        if held is not None and tuple(x0.shape[1:]) != tuple(held):
            advice = (
                "call reset() to start afresh on the new data, or use one matcher per dataset"
                if self.auto
                else "pass a new TrajectoryPool (reset() empties this one but keeps its item shape), or "
                "use one matcher per dataset"
            )
            raise ValueError(
                f"x0 holds samples of shape {tuple(x0.shape[1:])}, but this matcher's pool holds items of "
                f"shape {tuple(held)} from earlier calls: {advice}"
            )

    def check_labelled(self, guided: bool) -> None:
        """Refuse a guided call on an unlabelled pool and an unconditional call on a labelled one."""
        labelled = None if self.pool is None else self.pool.labelled
        if labelled is not None and labelled != guided:
            raise ValueError(
                "y1 must be given: this matcher's pool holds class-labelled items (guided calls); "
                "call reset() to switch to unconditional calls"
                if labelled
                else "y1 must be None: this matcher's pool holds unlabelled items (unconditional calls); "
                "call reset() to switch to guided calls"
            )

    def drop(self) -> None:
        """Empty the pool and the staged rows: their flows went to other data."""
        self.pool.clear()
        self.staged = None

    # ------------------------------------------------------------------ checks read one call late
    def settle(self) -> None:
        """Turn pending device checks into host numbers (waits for their copy only)."""
        if isinstance(self.pending, DeviceChecks):
            self.pending = self.pending.read()

    def take_pending(self, stacklevel: int) -> bool:
        """Read the checks of the previous call, if pending: raise for its bad data, return its drift."""
        self.settle()
        checks, self.pending = self.pending, None
        if checks is None:
            return False
        for name, key in (("x0", "x0_finite"), ("x1", "x1_finite")):
            if not checks[key]:
                self.staged = None  # never flow the bad rows
                raise ValueError(
                    f"{name} of the previous call contained NaN or Inf entries (on an accelerator a call served "
                    "from the pool is checked on the device and read at the next call)"
                )
        if not checks["labels_ok"]:
            self.staged = None
            raise ValueError("y1 of the previous call held negative class labels (read at this call)")
        if checks["drifted"]:
            self.drift.warn_once(checks["shift"], checks["ratio"], stacklevel + 1)
            return True
        return False

    # ------------------------------------------------------------------ cadence and staging
    def stage(self, x0: Tensor, x1: Tensor, y1: Tensor | None) -> None:
        """Keep the latest ``flow_size`` rows of ``x0``, ``x1`` (and ``y1``) for the next large flow."""
        new = {"x0": x0.detach(), "x1": x1.detach(), "y1": None if y1 is None else y1.detach()}
        if self.staged is not None:
            new = {
                k: None if v is None else torch.cat([self.staged[k].to(v.device), v])[-self.flow_size :]
                for k, v in new.items()
            }
        else:
            new = {k: None if v is None else v[-self.flow_size :] for k, v in new.items()}
        self.staged = new

    def take_staged(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The staged ``(x0, x1, y1)`` when ``flow_size`` rows of each are kept (and forget them), else None."""
        st = self.staged
        if self.flow_size is None or st is None or min(st["x0"].shape[0], st["x1"].shape[0]) < self.flow_size:
            return None
        self.staged = None
        return st["x0"], st["x1"], st["y1"]

    def refresh_due(self, n_calls: int, bs: int) -> bool:
        if self.flow_size is None:
            return n_calls % self.refresh_every == 0
        return self.since_flow >= self.period(bs)

    def period(self, bs: int) -> int:
        """Calls between two flows with ``flow_size``: ``refresh_every`` samples served per particle."""
        return max(1, round(self.refresh_every * self.last_flow_n / bs))

    def calls_per_flow(self, bs: int) -> int:
        return self.refresh_every if self.flow_size is None else self.period(bs)

    def flowed(self, particles: int) -> None:
        """A flow of ``particles`` was just added to the pool."""
        self.since_flow = 0
        self.last_flow_n = particles
        self.pending = None  # its checks compared the call with the reference this flow replaced

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {
            **self.drift.state_dict(),
            "staged": self.staged,
            "since_flow": self.since_flow,
            "last_flow_n": self.last_flow_n,
            "pending": self.pending,
            "pool": None if self.pool is None else self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by the matcher before anything is changed)."""
        self.reset_state()
        if self.auto and state.get("pool") is None:
            self.pool = None
        self.drift.load_state_dict(state)
        self.staged = state.get("staged")
        self.since_flow = int(state.get("since_flow", 0))
        self.last_flow_n = int(state.get("last_flow_n", 0))
        self.pending = state.get("pending")
        if state.get("pool") is not None:
            if self.pool is None and self.auto:  # its generator state comes with the pool's state
                self.pool = self.new_auto_pool("cpu")
            self.pool.load_state_dict(state["pool"])

    def __getstate__(self) -> dict[str, Any]:
        self.settle()  # an event cannot be pickled: read the pending checks first
        return self.__dict__.copy()
