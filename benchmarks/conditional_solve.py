"""Class-conditional Sinkhorn flows: one flow per class against one flow with a cost that forbids cross-class
transport, on the same batches, in one process.

* per class: ``SinkhornFlowMatcher.simulate_guided`` (one Sinkhorn flow per class present in the batch);
* masked: one ``SinkhornFlowMatcher.simulate`` of the whole batch on features augmented with
  ``L * onehot(label)``: the cost ½‖x − y‖² gains ``L²`` between classes and nothing within a class, so with
  ``L²`` = (squared diameter of the clouds) + 100 ε every cross-class coupling weighs at most ``exp(-100)``
  times any within-class one and the block-diagonal problem is the per-class one (the class proportions of source and target agree here, as the guided matcher makes them).

Both at the same absolute blur (the matcher's default: 0.1 of the target's RMS radius), two steps of size 1.
Reports the median wall time of one flow and the largest relative difference between the two flows' end
points (the check that both solve the same problem).

    OMP_NUM_THREADS=1 python benchmarks/conditional_solve.py --out benchmarks/results/conditional_solve.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from _report import publish  # benchmarks/, next to this script

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run_case(name: str, n: int, dim: tuple[int, ...], n_classes: int, repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *dim, generator=gen)
    y1 = torch.randint(0, n_classes, (n,), generator=gen)
    centres = 3.0 * torch.randn(n_classes, *dim, generator=gen)
    x1 = centres[y1] + 0.5 * torch.randn(n, *dim, generator=gen)
    blur = SinkhornOptions().absolute_blur(x1)
    options = SinkhornOptions(blur=blur, relative_blur=False)
    per_class = SinkhornFlowMatcher(sinkhorn=options, pool=None)
    masked = SinkhornFlowMatcher(sinkhorn=options, pool=None)
    flat = torch.cat([x0.reshape(n, -1), x1.reshape(n, -1)])
    diameter2 = float((flat.max(0).values - flat.min(0).values).square().sum())
    big = (diameter2 + 100 * blur**2) ** 0.5  # L**2 exceeds every within-class cost by 100 eps
    onehot = torch.nn.functional.one_hot(y1, n_classes).float() * big
    a0 = torch.cat([x0.reshape(n, -1), onehot], 1)  # particle i takes class y1[i], as the guided matcher does
    a1 = torch.cat([x1.reshape(n, -1), onehot], 1)
    t_class, (traj, _) = _time(lambda: per_class.simulate_guided(x0, x1, y1), repeats)
    t_mask, traj_mask = _time(lambda: masked.simulate(a0, a1), repeats)
    end = traj.xs[-1].reshape(n, -1)
    end_mask = traj_mask.xs[-1][:, : end.shape[1]]
    diff = float((end - end_mask).norm() / (end - x0.reshape(n, -1)).norm())
    return dict(
        name=name,
        n=n,
        dim="x".join(map(str, dim)),
        classes=n_classes,
        per_class_s=t_class,
        masked_s=t_mask,
        rel_diff=diff,
        iters_class=sum(traj.n_iters),
        iters_mask=sum(traj_mask.n_iters),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    cases = [
        ("MNIST-sized", 128, (1, 28, 28), 10),
        ("CIFAR-sized", 128, (3, 32, 32), 10),
        ("2D, 8 classes", 256, (2,), 8),
        ("2D, 8 classes, 1024", 1024, (2,), 8),
    ]
    rows = [run_case(*case, repeats=args.repeats, seed=args.seed) for case in cases]
    lines = [
        "# Class-conditional Sinkhorn flow: per-class flows vs one masked flow",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"median of {args.repeats} flows (T = 2, eta = 1, blur 0.1 of the target's RMS radius).",
        "",
        "| case | n | dim | classes | per-class flow (s) | masked flow (s) | ratio | Sinkhorn iterations "
        "(per class / masked) | rel. difference of end points |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['n']} | {r['dim']} | {r['classes']} | {r['per_class_s']:.4f} | "
            f"{r['masked_s']:.4f} | {r['masked_s'] / r['per_class_s']:.2f} | {r['iters_class']} / "
            f"{r['iters_mask']} | {r['rel_diff']:.1e} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
