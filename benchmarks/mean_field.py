"""The paper's mean-field limit: how fast the n-particle Sinkhorn velocity approaches the large-n one.

NSGF's Theorem 2 says the empirical velocity converges to the mean-field velocity as the number of particles
grows. Here: particles and targets are nested samples of one 2D task (the first n of `--n-ref` draws of
each); the velocity of the first `--n-eval` particles computed in the n-particle problem is compared with
the same particles' velocity in the `--n-ref`-particle problem (relative L2 error), at the matcher's
default options (relative blur 0.1, tol 1e-2, backend "auto"). A power law err ~ C n^(-rate) is fitted by
least squares on log-log axes.

    python benchmarks/mean_field.py --task 8gaussians-moons --sizes 256 1024 4096 16384 --n-ref 65536
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from torchcfm_nsgf import SinkhornOptions
from torchcfm_nsgf.datasets import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="8gaussians-moons")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--n-ref", type=int, default=65536)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    g = torch.Generator().manual_seed(args.seed)
    x, y = task.source(args.n_ref, g), task.target(args.n_ref, g)
    options = SinkhornOptions()

    def velocity(n: int) -> tuple[torch.Tensor, float, str]:
        blur = options.absolute_blur(y[:n])
        start = time.perf_counter()
        sol = options.solve(x[:n], y[:n], blur=blur)
        return sol.velocity[: args.n_eval], time.perf_counter() - start, sol.backend

    reference, seconds, backend = velocity(args.n_ref)
    print(f"reference: n = {args.n_ref}, {seconds:.1f} s ({backend})")
    print("\n| n | relative error of the velocity | time | backend |\n|---:|---:|---:|---|")
    rows = []
    for n in args.sizes:
        v, seconds, backend = velocity(n)
        err = float((v - reference).norm() / reference.norm())
        rows.append((n, err))
        print(f"| {n} | {err:.4f} | {seconds:.2f} s | {backend} |")
    logs = [(math.log(n), math.log(e)) for n, e in rows]
    mx = sum(a for a, _ in logs) / len(logs)
    my = sum(b for _, b in logs) / len(logs)
    slope = sum((a - mx) * (b - my) for a, b in logs) / sum((a - mx) ** 2 for a, _ in logs)
    print(f"\nfitted rate: error ~ n^({slope:.2f}) over n = {args.sizes[0]}..{args.sizes[-1]}")


if __name__ == "__main__":
    main()
