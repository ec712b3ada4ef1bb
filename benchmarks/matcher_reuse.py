"""Does a sanity call before training change what `SinkhornFlowMatcher()` trains? Paired runs on the 2D tasks.

For each task and seed, torchcfm's canonical loop trains the same MLP twice from the same initial weights,
on the same data and with the same matcher generator: once with a fresh `SinkhornFlowMatcher()`, once with a
matcher that first answered one "sanity" call on 64 points of N(3, I). W2 (exact, POT) between 2000 Euler
samples (torchdyn) and 2000 fresh target samples at NFE 1, 2 and 10; the two arms run interleaved in one
process, so machine load hits both alike.

    python benchmarks/matcher_reuse.py --steps 1000 --seeds 3 --json benchmarks/results/matcher_reuse.json

It imports `torchcfm_nsgf` from the path, so the same command measures another version of the library with
`PYTHONPATH=/path/to/that/checkout`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torchcfm.models import MLP
from torchcfm.utils import torch_wrapper

import torchcfm_nsgf
from torchcfm_nsgf import SinkhornFlowMatcher, odeint_sample
from torchcfm_nsgf.toy import TASKS, w2

NFES = (1, 2, 10)


def train(task, seed: int, steps: int, dummy: bool, width: int) -> tuple[dict[int, float], float, float]:
    data = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(dim=2, w=width, time_varying=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    FM = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(seed + 1000))
    if dummy:
        g = torch.Generator().manual_seed(seed + 2000)
        FM.sample_location_and_conditional_flow(
            torch.randn(64, 2, generator=g), 3 + torch.randn(64, 2, generator=g)
        )
    start = time.perf_counter()
    for _ in range(steps):
        x0, x1 = task.source(256, data), task.target(256, data)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    evals = torch.Generator().manual_seed(seed + 3000)
    x0, target = task.source(2000, evals), task.target(2000, evals)
    with torch.no_grad():
        scores = {
            nfe: w2(odeint_sample(torch_wrapper(model), x0, solver="euler", n_steps=nfe).samples, target)
            for nfe in NFES
        }
    return scores, seconds, float(FM.blur)


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
            for dummy in (False, True):
                scores, seconds, blur = train(TASKS[name], seed, args.steps, dummy, args.width)
                rows.append(dict(task=name, seed=seed, dummy=dummy, w2=scores, seconds=seconds, blur=blur))
                print(
                    name,
                    seed,
                    "dummy" if dummy else "fresh",
                    {k: round(v, 4) for k, v in scores.items()},
                    f"{seconds:.1f} s",
                    flush=True,
                )
    print("\n| task | NFE | fresh matcher (mean ± std) | after a sanity call | mean paired difference |")
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks:
        for nfe in NFES:
            fresh = [r["w2"][nfe] for r in rows if r["task"] == name and not r["dummy"]]
            dummy = [r["w2"][nfe] for r in rows if r["task"] == name and r["dummy"]]
            diff = [b - a for a, b in zip(fresh, dummy, strict=True)]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            print(
                f"| {name} | {nfe} | {statistics.mean(fresh):.3f} ± {sd(fresh):.3f} | "
                f"{statistics.mean(dummy):.3f} ± {sd(dummy):.3f} | {statistics.mean(diff):+.3f} |"
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
