"""What flows larger than a batch buy: NSGF and the large-coupling matcher against flow size, with OT-CFM.

torchcfm's canonical loop (width-`--width` MLP, Adam 1e-3, batch 256) trains, at equal optimiser steps:

* `nsgf:N`: `SinkhornFlowMatcher(flow_size=N)` (N = 256 is the default matcher, flows of one batch);
* `coupling:N`: `SinkhornCouplingMatcher(flow_size=N)`, straight pairs drawn from the entropic plan of N
  points (the large-coupling peer);
* `otcfm`: torchcfm's `ExactOptimalTransportConditionalFlowMatcher` (exact OT of each batch).

Both Sinkhorn matchers keep the default cadence: `refresh_every` = 50 samples served per simulated particle,
whatever N. W2 (exact, POT) between 2000 Euler samples and 2000 fresh targets at NFE 1, 2 and 10, next to
the two-sample floor (W2 between two draws of 2000 targets).

    python benchmarks/flow_size.py --tasks 8gaussians-moons --sizes 256 2048 --seeds 1 --steps 4000 \
        --json benchmarks/results/flow_size/8gaussians-moons.json
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
from toy_harness import make_model, train_flow_matching

from torchcfm_nsgf import SinkhornCouplingMatcher, SinkhornFlowMatcher, odeint_sample
from torchcfm_nsgf.datasets import TASKS
from torchcfm_nsgf.metrics import w2

NFES = (1, 2, 10)


def make_matcher(method: str, seed: int):
    name, _, size = method.partition(":")
    g = torch.Generator().manual_seed(seed + 1000)
    if name == "otcfm":
        return ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    n = int(size)
    flow_size = None if n == 256 else n
    if name == "nsgf":
        return SinkhornFlowMatcher(flow_size=flow_size, generator=g)
    if name == "coupling":
        return SinkhornCouplingMatcher(flow_size=flow_size, generator=g)
    raise ValueError(f"unknown method {method!r}")


def run(task, method: str, seed: int, steps: int, width: int) -> dict:
    data = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm's exact OT pairing draws from NumPy's global generator  # noqa: NPY002
    model = make_model(width)
    FM = make_matcher(method, seed)
    trained = train_flow_matching(
        model, FM, lambda bs: (task.source(bs, data), task.target(bs, data)), train_steps=steps
    )
    seconds = trained.train_time_s
    evals = torch.Generator().manual_seed(seed + 3000)
    x0, target = task.source(2000, evals), task.target(2000, evals)
    with torch.no_grad():
        scores = {
            nfe: w2(odeint_sample(trained.field, x0, solver="euler", n_steps=nfe).samples, target)
            for nfe in NFES
        }
    sinkhorn_s = getattr(FM, "_sim_seconds", 0.0)
    return dict(w2=scores, seconds=seconds, sinkhorn_seconds=sinkhorn_s, flows=getattr(FM, "n_flows", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=["nsgf", "coupling"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = [f"{m}:{n}" for n in args.sizes for m in args.methods] + ["otcfm"]
    rows = []
    for name in args.tasks:
        task = TASKS[name]
        floor = w2(
            task.target(2000, torch.Generator().manual_seed(1)),
            task.target(2000, torch.Generator().manual_seed(2)),
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for method in methods:
                row = dict(
                    task=name,
                    seed=seed,
                    method=method,
                    floor=floor,
                    **run(task, method, seed, args.steps, args.width),
                )
                rows.append(row)
                scores = " / ".join(f"{row['w2'][k]:.3f}" for k in NFES)
                print(
                    f"{name} seed {seed} {method}: W2 at NFE 1/2/10 {scores} (floor {floor:.3f}); "
                    f"{row['seconds']:.0f} s, of which Sinkhorn {row['sinkhorn_seconds']:.0f} s in {row['flows']} flows",
                    flush=True,
                )
    if args.json:
        meta = dict(vars(args), machine=platform.processor() or platform.machine(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
