"""Are NSGF's MNIST targets digits? The end points X_T of Sinkhorn flows against real MNIST batches.

For each relative blur, simulate ``--flows`` flows of ``SinkhornFlowMatcher(flow_steps=T, step_size=1)`` from
N(0, I) towards batches of ``--batch`` MNIST training images (in [-1, 1]), unconditional and guided (one flow
per class), and measure the distance of every end point to its nearest image of the batch. An end point
within a few hundredths of an image *is* that image (what the Sinkhorn tolerance leaves); one far from all
of them is a blend of several images, which a network trained on these targets learns to draw. Reported:
quantiles of that distance, the fraction farther than 1.0 (in pixel units of [-1, 1]; neighbouring images of
a batch are 12–15 apart, median), and the median CPU seconds per flow (one thread).

    python benchmarks/endpoint_blends.py --data-root ../shared/data --out benchmarks/results/endpoint_blends.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _report import emit  # benchmarks/, next to this script
from harness.images import mnist_unit

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(x: torch.Tensor, y: torch.Tensor, blur: float, steps: int, guided: bool, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    dists, seconds = [], []
    for _ in range(args.flows):
        idx = torch.randperm(x.shape[0], generator=g)[: args.batch]
        x1, y1 = x[idx], y[idx]
        x0 = torch.randn(x1.shape, generator=g)
        fm = SinkhornFlowMatcher(
            flow_steps=steps, step_size=1.0, pool=None, sinkhorn=SinkhornOptions(blur=blur)
        )
        start = time.process_time()
        traj = fm.simulate_guided(x0, x1, y1)[0] if guided else fm.simulate(x0, x1)
        seconds.append(time.process_time() - start)
        dists.append(torch.cdist(traj.xs[-1].flatten(1), x1.flatten(1)).min(1).values)
    d = torch.cat(dists)
    return {
        "q": [float(d.quantile(q)) for q in (0.5, 0.8, 0.9, 0.95)],
        "far": float((d > 1.0).float().mean()),
        "s": statistics.median(seconds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--blurs", default="0.1,0.05,0.03,0.02")
    p.add_argument("--steps", default="1,2", help="flow steps T to measure (η = 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--flows", type=int, default=10)
    p.add_argument("--images", type=int, default=8192, help="training images the batches are drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = mnist_unit(args.data_root, args.images)
    lines = [
        f"End points of Sinkhorn flows (η = 1) from N(0, I) to batches of {args.batch} MNIST images, "
        f"{args.flows} flows per row, one thread. Distance of each end point to its nearest image of the batch "
        "(quantiles), fraction farther than 1.0 (blends), median CPU seconds per flow.",
        "",
        "| flow | T | blur | median | q80 | q90 | q95 | farther than 1.0 | CPU s per flow |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for guided in (False, True):
        for steps in (int(s) for s in args.steps.split(",")):
            for blur in (float(b) for b in args.blurs.split(",")):
                r = measure(x, y, blur, steps, guided, args)
                q = " | ".join(f"{v:.2f}" for v in r["q"])
                lines.append(
                    f"| {'guided (per class)' if guided else 'unconditional'} | {steps} | {blur:g} | {q} | "
                    f"{100 * r['far']:.1f} % | {r['s']:.3f} |"
                )
                print(lines[-1], flush=True)
    emit("endpoint_blends.py", args, lines)


if __name__ == "__main__":
    main()
