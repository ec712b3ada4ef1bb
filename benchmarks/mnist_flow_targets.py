"""What flow size buys NSGF's MNIST targets, without training: the end points of flows of N images.

`SinkhornFlowMatcher()` with the image defaults (2 steps of η = 1, blur 0.05 of the data's scale) moves N
noise images towards N training images; the network regresses the straight segments to the end points X_T.
This script scores those end points as a generator would be scored, for flows of N ∈ `--sizes` images:

* classifier FID (the `benchmarks/mnist.py` classifier) of `--n-eval` end points against as many test images,
  next to the same score for the flows' own target images (what a flow with no blur would give);
* how far the end points sit from the images they were pulled to: the distance from each end point to its
  nearest target of the same flow, over the median nearest-neighbour distance between training images
  (near 0: a copy of a target; near 1 or above: a blend of several), and the share of the flow's targets
  that are the nearest target of some end point (1: every target is used once; lower: several noise images
  are sent to the same image, and the served pairs are less diverse than the data);
* the transport cost of the pairs the network regresses, the mean of ||X_T - X_0||^2 / d (the smaller, the
  closer each noise image is paired to its end point, the straighter and more consistent the field; flows of
  one batch pair almost at random in d = 784);
* the CPU seconds per flow (one torch thread).

`--matcher coupling` scores the pairs of `SinkhornCouplingMatcher()` instead (each noise image paired with a
training image drawn from the row of the flow's entropic plan; same blur): its end points are the targets
themselves, so what it can differ in is the transport cost of the pairs.

Every size sees the same number of end points (`--n-eval`; ceil(n_eval / N) flows of fresh images).

    python benchmarks/mnist_flow_targets.py --data-root ../shared/data --out benchmarks/results/mnist_flow_targets.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from _report import emit, machine, table_head, table_row
from harness.images import get_classifier

from torchcfm_nsgf import SinkhornCouplingMatcher, SinkhornFlowMatcher
from torchcfm_nsgf.images import feature_frechet_distance, load_images
from torchcfm_nsgf.images.data import to_unit_range

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--classifier", default=os.path.join(HERE, "results", "mnist_classifier.pt"))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 1024, 4096])
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matcher", choices=["nsgf", "coupling"], default="nsgf", help="whose pairs to score")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    classifier, _ = get_classifier(args.classifier, args.data_root)
    test = to_unit_range(load_images("mnist", args.data_root, train=False).images[: args.n_eval])
    train = to_unit_range(load_images("mnist", args.data_root).images)

    def fid(images: torch.Tensor) -> float:
        return feature_frechet_distance(
            classifier.features, test.split(500), images.split(500), num_features=128
        )

    g = torch.Generator().manual_seed(args.seed)
    probe = train[torch.randperm(len(train), generator=g)[:2000]].flatten(1)
    d = torch.cdist(probe, probe)
    d.fill_diagonal_(float("inf"))
    nn_scale = float(d.min(1).values.median())
    matcher_cls = {"nsgf": SinkhornFlowMatcher, "coupling": SinkhornCouplingMatcher}[args.matcher]
    rows = []
    for n in args.sizes:
        flows = math.ceil(args.n_eval / n)
        ends, targets, dist, seconds, cost, used = [], [], [], [], [], []
        for _ in range(flows):
            x1 = train[torch.randperm(len(train), generator=g)[:n]]
            x0 = torch.randn(x1.shape, generator=g)
            start = time.process_time()
            xT = matcher_cls(pool=None).simulate(x0, x1).xs[-1]
            seconds.append(time.process_time() - start)
            ends.append(xT)
            cost.append(((xT - x0) ** 2).flatten(1).mean(1))
            targets.append(x1)
            nearest = torch.cdist(xT.flatten(1), x1.flatten(1)).min(1)
            dist.append(nearest.values / nn_scale)
            used.append(nearest.indices.unique().numel() / n)
        ends_all = torch.cat(ends)[: args.n_eval]
        row = dict(
            n=n,
            flows=flows,
            fid_end_points=fid(ends_all),
            fid_targets=fid(torch.cat(targets)[: args.n_eval]),
            dist_to_target=float(torch.cat(dist).median()),
            transport_cost=float(torch.cat(cost).mean()),
            targets_used=sum(used) / flows,
            cpu_s_per_flow=sum(seconds) / flows,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        f"MNIST, `{matcher_cls.__name__}()` image defaults, {args.n_eval} end points per size, seed {args.seed}, "
        f"one torch thread, {machine()}. "
        f"Median nearest-neighbour distance between training images: {nn_scale:.2f}.",
        "",
        *table_head(
            [
                "flow of N images",
                "flows",
                "classifier FID of X_T",
                "of the flows' targets",
                "end point to nearest target / NN scale (median)",
                "targets used",
                "transport cost",
                "CPU s per flow",
            ],
            "---:",
        ),
    ]
    lines += [
        table_row(
            [
                r["n"],
                r["flows"],
                f"{r['fid_end_points']:.2f}",
                f"{r['fid_targets']:.2f}",
                f"{r['dist_to_target']:.3f}",
                f"{r['targets_used']:.3f}",
                f"{r['transport_cost']:.3f}",
                f"{r['cpu_s_per_flow']:.2f}",
            ]
        )
        for r in rows
    ]
    emit("mnist_flow_targets.py", args, lines, data=rows)


if __name__ == "__main__":
    main()
