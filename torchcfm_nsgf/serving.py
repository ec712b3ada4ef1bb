"""How a call of :class:`~torchcfm_nsgf.SinkhornFlowMatcher` makes its regression pairs from the matcher's parts.

* :func:`from_pool`: a new flow when one is due (the cadence, the staging and the drift monitor of
  :class:`~torchcfm_nsgf.replay.Replay`; the device checks read at once or one call late), then a batch drawn
  from the pool: uniform points of uniform segments, or, for given times, a segment whose time range holds
  each time, placed at it (:mod:`torchcfm_nsgf.paths`).
* :func:`from_flow`: without a pool, a new flow of the call's batch, read at the given times or at uniform
  points of its segments.
* :func:`fill`: one flow added to the pool, the targets' moments computed once per call.

A new serving rule is a function here.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._transfer import to_device
from .flow import SinkhornTrajectory, check_pair, target_moments
from .matcher_parts import MatcherParts
from .replay import DeviceChecks, reads_late

__all__ = ["SLOW_CALL_S", "fill", "from_flow", "from_pool", "on_segments", "warn_if_slow"]

# Projected Sinkhorn seconds per call above which the matcher warns once that it will be slow.
SLOW_CALL_S = 1.0


def fill(
    m: MatcherParts, x0: Tensor, x1: Tensor, y0: Tensor | None, y1: Tensor | None, stats
) -> SinkhornTrajectory:
    """:meth:`fill_pool` with the moments of ``x1`` when the caller has them (computed once per call)."""
    m.replay.check_shape(x0)
    if stats is None:
        stats = target_moments(x1, distributed=m.sinkhorn.distributed)
    m.replay.drift.reference = stats
    scale = float(stats[1])
    pool = m.pool
    if y1 is None:
        if y0 is not None:
            raise ValueError("y0 needs y1: give the labels of x1 for a class-conditional flow")
        if pool.labelled:
            raise ValueError("y1 must be given: this matcher's pool holds class-labelled items")
        traj = m.flow.simulate(x0, x1, scale=scale)
        pool.add(*m.segments(traj))
        return traj
    if pool.labelled is False:
        raise ValueError("y1 must be None: this matcher's pool holds items without class labels")
    traj, labels = m.flow.simulate_guided(x0, x1, y1, y0, scale=scale)
    pool.add(*m.segments(traj), y=m.segment_labels(labels))
    return traj


def from_pool(
    m: MatcherParts,
    x0: Tensor,
    x1: Tensor,
    t: Tensor | None,
    y0: Tensor | None,
    y1: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """Refresh the pool when a flow is due (read the device checks when one may be), then draw."""
    replay, guided, bs = m.replay, y1 is not None, x0.shape[0]
    if m.flow_size is not None:  # refuse the arguments before the pending checks or the drift change anything
        if m.flow_size < bs:
            raise ValueError(
                f"flow_size={m.flow_size} is smaller than this call's batch of {bs}: a flow must "
                "hold at least one batch (use flow_size >= the batch size, or None for flows of one batch)"
            )
        if y0 is not None:
            raise ValueError("y0 cannot be given with flow_size: a large flow takes its classes from y1")
    replay.check_labelled(guided)
    replay.check_shape(x0)
    late = reads_late(x0.device) and not m.sinkhorn.distributed
    drifted = replay.take_pending(stacklevel=5)
    if drifted:
        replay.drop()
    due = drifted or len(m.pool) < bs or replay.refresh_due(m.n_calls, bs)
    stats = target_moments(x1, distributed=m.sinkhorn.distributed)
    if late and not due:  # no flow: decide on the device, read at the next call
        ok = [torch.isfinite(x).all().double().reshape(1) for x in (x0, x1)]
        ok.append((y1 >= 0).all().double().reshape(1) if guided else torch.ones_like(ok[0]))
        replay.pending = DeviceChecks(torch.cat([*ok, replay.drift.flags(stats, x1.shape[0])]))
    else:
        if late:  # read at once the checks a CPU call reads at once
            check_pair(x0, x1)
        if late and guided and int(y1.min()) < 0:
            raise ValueError(f"y1 must hold non-negative class labels, got {int(y1.min())}")
        if not drifted:
            flag, shift, ratio = replay.drift.flags(stats, x1.shape[0]).tolist()
            if flag:
                replay.drift.warn_once(shift, ratio, stacklevel=5)
                replay.drop()
                drifted = due = True
    if m.flow_size is not None:
        replay.stage(x0, x1, y1)
    if due:
        staged = replay.take_staged()
        if staged is None:
            fill(m, x0, x1, y0, y1, stats)
        else:
            fill(m, staged[0], staged[1], None, staged[2], None)
        replay.flowed(bs if staged is None else staged[0].shape[0])
        warn_if_slow(m, replay.calls_per_flow(bs))
    replay.since_flow += 1
    if t is not None:  # a segment whose time range holds t, placed at t
        path = m.geometry
        starts = path.start_at(t)  # as stored (float32), each start lies within 1/(2T) of its k/T
        drawn = m.pool.sample_at(starts, tol=0.5 / path.flow_steps, device=x0.device, dtype=dtype)
        xt, ut = path.place(drawn[0], drawn[1], drawn[2], t)
        return (t, xt, ut, *drawn[3:])
    drawn = m.pool.sample(bs, device=x0.device, dtype=dtype, balanced=guided and m.balanced)
    return (*on_segments(m, *drawn[:3]), *drawn[3:])


def on_segments(m: MatcherParts, t0: Tensor, xs: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A uniform point on each segment: ``t = t0 + s L``, ``xt = xs + s L u`` with ``s ~ U[0, 1)``."""
    s = to_device(torch.rand(t0.shape[0], generator=m.generator), u.device, u.dtype)
    return m.geometry.serve(t0, xs, u, s)


def from_flow(
    m: MatcherParts, x0: Tensor, x1: Tensor, t: Tensor | None, y0: Tensor | None, y1: Tensor | None
) -> tuple[Tensor, ...]:
    """Without a pool: a new flow of this call's batch, read at ``t`` or at uniform points of its segments."""
    bs, guided = x0.shape[0], y1 is not None
    if guided:
        traj, labels = m.simulate_guided(x0, x1, y1, y0)
    else:
        traj = m.simulate(x0, x1)
    warn_if_slow(m, 1)
    if t is not None:
        return (t, *m.path_at(traj, t), *((labels,) if guided else ()))
    segs = m.segments(traj)
    if m.path == "straight":  # every particle is served once, in its own row
        pick = torch.arange(bs, device=x0.device)
    else:
        pick = torch.randint(0, segs[0].shape[0], (bs,), generator=m.generator).to(x0.device)
    served = on_segments(m, *(s[pick] for s in segs))
    return (*served, *((m.segment_labels(labels)[pick],) if guided else ()))


def warn_if_slow(m: MatcherParts, calls_per_flow: int) -> None:
    """Warn once when the flows cost more than ``SLOW_CALL_S`` seconds per call at this cadence."""
    if m.flow.warned_slow or m.n_flows == 0:
        return
    per_call = m._sim_seconds / m.n_flows / calls_per_flow
    if per_call > SLOW_CALL_S:
        m.flow.warned_slow = True
        advice = (
            "serve from a pool (pool='auto') or raise refresh_every"
            if m.pool is None
            else f"raise refresh_every (now {m.refresh_every})"
        )
        warnings.warn(
            f"SinkhornFlowMatcher spends about {per_call:.1f} s of Sinkhorn iterations per call "
            f"({m._sim_seconds / m.n_flows:.1f} s per {m.flow_steps}-step flow at blur "
            f"{m.blur:.3g}): {advice}, use fewer flow_steps, or a larger blur",
            UserWarning,
            stacklevel=4,
        )
