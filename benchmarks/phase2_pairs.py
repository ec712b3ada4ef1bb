"""How far does NSGF++'s straight flow have to carry its MNIST training pairs?

The ``"ot"`` variants train the straight flow on segments from phase-1 end points X_T to data images paired
by exact minibatch OT (:meth:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective.phase2_pairs`). This script draws
those pairs through the library's own objective (simulated end points, T Sinkhorn steps of η = 1 at the
image blur) against real MNIST batches and reports the length of the segments, next to:

* the same end points paired with the batch their own flow went to (the buffer that amortises phase 1
  serves end points of earlier flows, so the library pairs them with a batch they never flowed to);
* the ``"ot-source"`` variant's pairs (each end point with the image that the exact OT plan between the
  noise and the batch gives its own noise), drawn through the library as well;
* end points paired with ``--big`` other images by one exact OT plan (what a larger OT batch would give);
* the distance of each end point to its nearest image among ``--others`` training images that no batch
  was drawn from (how far it is from a *new* digit: for T = 2 the end points are batch images);
* the segments torchcfm's OT-CFM trains on (N(0, I) noise to images, exact OT over the same batch size).

Pixels in [-1, 1]; neighbouring MNIST images are 12–15 apart. One thread.

    python benchmarks/phase2_pairs.py --data-root ../shared/data --out benchmarks/results/phase2_pairs.md
"""

from __future__ import annotations

import argparse
import os

import torch
from _report import emit  # benchmarks/, next to this script
from harness.images import mnist_unit
from torchcfm.optimal_transport import OTPlanSampler

from torchcfm_nsgf import SinkhornFlowMatcher
from torchcfm_nsgf.nsgfpp import NSGFPlusPlusObjective

HERE = os.path.dirname(os.path.abspath(__file__))


def ot_pair_lengths(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lengths ``|a_i - b_σ(i)|`` under the exact OT permutation σ of two equal-size batches."""
    plan = torch.from_numpy(OTPlanSampler(method="exact").get_map(a, b))
    return (a - b[plan.argmax(1)]).flatten(1).norm(dim=1)


def quantiles(d: torch.Tensor) -> str:
    return " | ".join(f"{float(d.quantile(q)):.2f}" for q in (0.1, 0.5, 0.9))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--steps", default="1,2", help="phase-1 Sinkhorn steps T to measure (η = 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--flows", type=int, default=16, help="flows per T (one batch of pairs each)")
    p.add_argument("--big", type=int, default=1024, help="size of the larger OT batch")
    p.add_argument("--images", type=int, default=8192, help="training images the batches are drawn from")
    p.add_argument("--others", type=int, default=8192, help="further training images, for the nearest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    if args.big % args.batch or args.big > args.flows * args.batch:
        p.error("--big must be a multiple of --batch and at most --flows * --batch")
    torch.set_num_threads(1)
    x, _ = mnist_unit(args.data_root, args.images)
    others = mnist_unit(args.data_root, args.images + args.others, start=args.images)[0].flatten(1)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the objective's pair draws use torch's global RNG

    def batch() -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=g)[: args.batch]]

    lines = [
        f"Length of the straight flow's training segments on MNIST (pixels in [-1, 1]), {args.flows} batches of "
        f"{args.batch} per row, quantiles q10 | median | q90. Phase-1 end points X_T simulated by "
        "`SinkhornFlowMatcher(flow_steps=T, step_size=1)` at its image blur; pairs from "
        "`NSGFPlusPlusObjective(phase2=...).phase2_pairs`.",
        "",
        "| segments | T | q10 | median | q90 |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, steps: object, d: torch.Tensor) -> None:
        lines.append(f"| {name} | {steps} | {quantiles(d)} |")
        print(lines[-1], flush=True)

    x0s = [torch.randn(x[: args.batch].shape, generator=g) for _ in range(args.flows)]
    x1s = [batch() for _ in range(args.flows)]
    row(
        f"OT-CFM: noise to images, exact OT over {args.batch}",
        "—",
        torch.cat([ot_pair_lengths(a, b) for a, b in zip(x0s, x1s, strict=True)]),
    )
    fresh = torch.cat([batch() for _ in range(args.big // args.batch)]).flatten(1)
    for steps in (int(s) for s in args.steps.split(",")):
        objective = NSGFPlusPlusObjective(
            SinkhornFlowMatcher(flow_steps=steps, step_size=1.0, pool=None), phase2="ot", refresh_every=1
        )
        pairs = [objective.phase2_pairs(a, b)[:2] for a, b in zip(x0s, x1s, strict=True)]
        row(
            f"NSGF++ `ot`: X_T from the buffer to the call's batch, exact OT over {args.batch}",
            steps,
            torch.cat([(a - b).flatten(1).norm(dim=1) for a, b in pairs]),
        )
        source = NSGFPlusPlusObjective(
            SinkhornFlowMatcher(flow_steps=steps, step_size=1.0, pool=None), phase2="ot-source"
        )
        pairs = [source.phase2_pairs(a, b)[:2] for a, b in zip(x0s, x1s, strict=True)]
        row(
            f"NSGF++ `ot-source`: X_T of the call's noise to the image OT pairs with that noise, over {args.batch}",
            steps,
            torch.cat([(a - b).flatten(1).norm(dim=1) for a, b in pairs]),
        )
        ends = [objective.simulate_endpoints(a, b) for a, b in zip(x0s, x1s, strict=True)]
        row(
            f"X_T to the batch its own flow went to, exact OT over {args.batch}",
            steps,
            torch.cat([ot_pair_lengths(e, b) for e, b in zip(ends, x1s, strict=True)]),
        )
        ends = torch.cat(ends).flatten(1)
        row(
            f"X_T to {args.big} other images, one exact OT plan",
            steps,
            ot_pair_lengths(ends[: args.big], fresh),
        )
        row(
            f"X_T to its nearest of {args.others} other training images",
            steps,
            torch.cdist(ends, others).min(1).values,
        )
    emit("phase2_pairs.py", args, lines)


if __name__ == "__main__":
    main()
