"""Does a sanity call before training change what `SinkhornFlowMatcher()` trains? Paired runs on the 2D tasks.

For each task and seed, torchcfm's canonical loop (the harness's) trains the same MLP three times from the same initial
weights and on the same data: with a fresh `SinkhornFlowMatcher()` ("fresh"), with a matcher that first
answered one "sanity" call on 64 points of N(3, I) ("dummy"), and with a fresh matcher whose generator has
another seed ("reseeded": the sanity call also shifts the matcher's random draws, so this arm measures the
noise that shift alone causes). W2 (exact, POT) between 2000 Euler samples (torchdyn) and 2000 fresh target
samples at NFE 1, 2 and 10; the arms run interleaved in one process, so machine load hits them alike.

    python benchmarks/matcher_reuse.py --steps 1000 --seeds 3 --json benchmarks/results/matcher_reuse.json

It imports `torchcfm_nsgf` from the path, so the same command measures another version of the library with
`PYTHONPATH=/path/to/that/checkout`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
from harness import BenchConfig
from harness.methods import train_torchcfm
from harness.runner import evaluate

import torchcfm_nsgf
from torchcfm_nsgf import SinkhornFlowMatcher
from torchcfm_nsgf.datasets import TASKS

NFES = (1, 2, 10)
ARMS = ("fresh", "dummy", "reseeded")


def train(task, seed: int, steps: int, arm: str, width: int) -> tuple[dict[int, float], float, float]:
    FM = SinkhornFlowMatcher(
        generator=torch.Generator().manual_seed(seed + (5000 if arm == "reseeded" else 1000))
    )
    if arm == "dummy":
        g = torch.Generator().manual_seed(seed + 2000)
        FM.sample_location_and_conditional_flow(
            torch.randn(64, 2, generator=g), 3 + torch.randn(64, 2, generator=g)
        )
    trained = train_torchcfm(FM, task, BenchConfig(train_steps=steps, width=width), seed)
    evals = torch.Generator().manual_seed(seed + 3000)
    x0, target = task.source(2000, evals), task.target(2000, evals)
    scores = {int(k): v for k, v in evaluate(trained, x0, target, NFES)[0].items()}
    return scores, trained.train_time_s, float(FM.blur)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        for seed in range(args.seeds):
            for arm in ARMS:
                scores, seconds, blur = train(TASKS[name], seed, args.steps, arm, args.width)
                rows.append(dict(task=name, seed=seed, arm=arm, w2=scores, seconds=seconds, blur=blur))
                rounded = {k: round(v, 4) for k, v in scores.items()}
                print(name, seed, arm, rounded, f"{seconds:.1f} s", flush=True)
    print(
        "\n| task | NFE | fresh (mean ± std over seeds) | dummy − fresh (mean over seeds) "
        "| reseeded − fresh (the noise) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks:
        for nfe in NFES:
            w = {arm: [r["w2"][nfe] for r in rows if r["task"] == name and r["arm"] == arm] for arm in ARMS}
            sd = statistics.stdev(w["fresh"]) if len(w["fresh"]) > 1 else 0.0
            diff = {
                arm: statistics.mean(b - a for a, b in zip(w["fresh"], w[arm], strict=True)) for arm in ARMS
            }
            print(
                f"| {name} | {nfe} | {statistics.mean(w['fresh']):.3f} ± {sd:.3f} | {diff['dummy']:+.3f} "
                f"| {diff['reseeded']:+.3f} |"
            )
    if args.json:
        meta = dict(
            vars(args),
            library=torchcfm_nsgf.__file__,
            machine=platform.processor() or platform.machine(),
            torch=torch.__version__,
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
