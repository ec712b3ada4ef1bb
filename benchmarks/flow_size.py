"""What flows larger than a batch buy: NSGF and the large-coupling matcher against flow size, with OT-CFM.

torchcfm's canonical loop (width-`--width` MLP, Adam 1e-3, batch 256) trains, at equal optimiser steps:

* `nsgf:N`: `SinkhornFlowMatcher(flow_size=N)` (N = 256 is the default matcher, flows of one batch);
* `coupling:N`: `SinkhornCouplingMatcher(flow_size=N)`, straight pairs drawn from the entropic plan of N
  points (the large-coupling peer);
* `otcfm`: torchcfm's `ExactOptimalTransportConditionalFlowMatcher` (exact OT of each batch).

Both Sinkhorn matchers keep the default cadence: `refresh_every` = 50 samples served per simulated particle,
whatever N. W2 (exact, POT) between 2000 Euler samples and 2000 fresh targets (the same ones at every
evaluation) at NFE 1, 2 and 10, next to the two-sample floor (W2 between two draws of 2000 targets).

One training run answers both comparisons: W2 is evaluated every `--eval-every` steps, and each evaluation
records the steps done and the process CPU time spent training so far (`time.process_time()`, one torch
thread, evaluation excluded). Equal steps is the evaluation at the last step; equal time is, per (task,
seed, N), the last evaluation of each of `nsgf:N`, `coupling:N` and `otcfm` within the smallest CPU time
that any of the three took for all its steps. CPU time rather than wall time: the runs share two cores with
other jobs, which may also stop and resume them, and the CPU time of a one-thread process counts neither.

With `--out-dir`, every (task, method, seed) run writes one JSON there as it finishes and a run whose JSON
exists is skipped, so several processes can share one job list (each claims a run with a `.claim` file
holding its pid) and an interrupted study resumes. The 2D study of BENCHMARKS.md §3d (two processes):

    python benchmarks/flow_size.py --sizes 256 1024 4096 16384 --seeds 3 --steps 10000 \
        --out-dir benchmarks/results/flow_size_2d
    python benchmarks/flow_size.py --report benchmarks/results/flow_size_2d \
        --out benchmarks/results/flow_size_2d.md

The first, one-task measurement (one JSON for all runs, no intermediate evaluations):

    python benchmarks/flow_size.py --tasks 8gaussians-moons --sizes 256 2048 --seeds 1 --steps 4000 \
        --eval-every 4000 --json benchmarks/results/flow_size/8gaussians-moons.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from harness import BenchConfig, method_fn
from harness.runner import claim, evaluate_snapshots, release, run_file, write_json

from torchcfm_nsgf.datasets import TASKS
from torchcfm_nsgf.metrics import w2

NFES = (1, 2, 10)
NAMES = {"nsgf": "NSGF", "coupling": "large coupling", "otcfm": "OT-CFM"}


def floor_of(task, first: int = 1) -> float:
    """W2 between two draws of 2000 targets (generator seeds `first`, `first + 1`): what a perfect sampler
    scores."""
    return w2(
        task.target(2000, torch.Generator().manual_seed(first)),
        task.target(2000, torch.Generator().manual_seed(first + 1)),
    )


FLOOR_PAIRS = 10  # the report's floor: the median over this many pairs of draws (one pair is noisy)


def iid_floor_of(task, i: int = 0) -> float:
    """W2 between 2000 i.i.d. draws of the target distribution and a draw of 2000 targets (seed 2 i + 2).

    `floor_of` compares two outputs of the task's sampler; the moons sampler (torchdyn's `generate_moons`)
    puts exactly half of every draw on each moon, which no generator of i.i.d. samples does (its split is
    binomial), and W2 charges that imbalance. The i.i.d. draws here are a uniformly random subset of 100 000
    targets, so their split between the moons (or modes) is random, as a perfect sampler's is. On tasks whose
    sampler draws the mode of each point independently the two floors agree."""
    pool = task.target(100_000, torch.Generator().manual_seed(500 + i))
    subset = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(900 + i))[:2000]]
    return w2(subset, task.target(2000, torch.Generator().manual_seed(2 * i + 2)))


def run(task, method: str, seed: int, steps: int, width: int, eval_every: int, batch_size: int = 256) -> dict:
    """The harness's torchcfm loop (Adam 1e-3) for `steps` steps of `method` (`nsgf:N`, `coupling:N`, or
    `otcfm` with σ = 0), W2 at NFE 1/2/10 of the snapshots taken every `eval_every` steps and at the end."""
    config = BenchConfig(
        train_steps=steps,
        clock="cpu",
        snapshot_every=eval_every,
        batch_size=batch_size,
        width=width,
        sigma=0.0,
    )
    trained = method_fn(method)(task, config, seed)
    evals_g = torch.Generator().manual_seed(seed + 3000)
    x0_eval, target = task.source(2000, evals_g), task.target(2000, evals_g)
    evaluations = evaluate_snapshots(trained, x0_eval, target, NFES)
    for e in evaluations:
        e["w2"] = {int(k): v for k, v in e["w2"].items()}
    last = evaluations[-1]
    return dict(
        w2=last["w2"],
        seconds=last["wall_s"],
        cpu_seconds=last["cpu_s"],
        sinkhorn_seconds=last["sinkhorn_s"],
        flows=last["flows"],
        evaluations=evaluations,
    )


# ------------------------------------------------------------------------------------------------- report
def _load(out_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    for r in rows:
        r["w2"] = {int(k): v for k, v in r["w2"].items()}
        for e in r["evaluations"]:
            e["w2"] = {int(k): v for k, v in e["w2"].items()}
    return rows


def _size(method: str) -> int:
    return int(method.partition(":")[2] or 256)


def _label(method: str) -> tuple[str, str]:
    name = method.partition(":")[0]
    return NAMES[name], str(_size(method))


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def equal_time(rows: list[dict]) -> dict:
    """{(task, seed, N, method): (evaluation, budget)} for the three methods at each N (all three present)."""
    by = {(r["task"], r["seed"], r["method"]): r for r in rows}
    out = {}
    for task, seed, method in by:
        if not method.startswith("nsgf:"):
            continue
        n = _size(method)
        trio = [f"nsgf:{n}", f"coupling:{n}", "otcfm"]
        if not all((task, seed, m) in by for m in trio):
            continue
        budget = min(by[task, seed, m]["evaluations"][-1]["cpu_s"] for m in trio)
        for m in trio:
            within = [e for e in by[task, seed, m]["evaluations"] if e["cpu_s"] <= budget * (1 + 1e-9)]
            out[task, seed, n, m] = (within[-1] if within else None, budget)
    return out


def report(out_dir: Path) -> list[str]:
    rows = _load(out_dir)
    steps = max(r["steps"] for r in rows)
    rows = [r for r in rows if r["steps"] == steps]
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    sizes = sorted({_size(r["method"]) for r in rows if r["method"] != "otcfm"})
    methods = [f"{m}:{n}" for n in sizes for m in ("nsgf", "coupling")] + ["otcfm"]
    by = {(r["task"], r["seed"], r["method"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    eqt = equal_time(rows)
    lines = [f"# 2D flow size: W2 at NFE 1 / 2 / 10, {steps} steps (mean ± std over the seeds present)", ""]
    lines += ["## Runs present", "", "| task | method | seeds |", "|---|---|---|"]
    for task in tasks:
        for m in methods:
            have = [s for s in seeds if (task, s, m) in by]
            lines.append(f"| {task} | {m} | {', '.join(map(str, have)) or '–'} |")
    lines.append("")
    floors = {t: next(r["floor"] for r in rows if r["task"] == t) for t in tasks}
    for task in tasks:
        lines += [
            f"## {TASKS[task].label} (two-sample floor {floors[task]:.3f})",
            "",
            "Equal steps:",
            "",
            "| method | N | seeds | NFE 1 | NFE 2 | NFE 10 | CPU s (Sinkhorn wall s) | flows |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in methods:
            got = [by[task, s, m] for s in seeds if (task, s, m) in by]
            if not got:
                continue
            cells = [_ms([r["w2"][k] for r in got]) for k in NFES]
            cpu = np.mean([r["cpu_seconds"] for r in got])
            sk = np.mean([r["sinkhorn_seconds"] for r in got])
            flows = np.mean([r["flows"] for r in got])
            lines.append(
                f"| {' | '.join(_label(m))} | {len(got)} | {' | '.join(cells)} | {cpu:.0f} ({sk:.0f}) | {flows:.0f} |"
            )
        lines += [
            "",
            "Equal CPU time (per seed and N: the smallest full-run CPU time of the three methods at that N; "
            "each method's last evaluation within it):",
            "",
            "| N | method | seeds | budget CPU s | steps reached | NFE 1 | NFE 2 | NFE 10 |",
            "|---:|---|---:|---:|---|---:|---:|---:|",
        ]
        for n in sizes:
            for m in (f"nsgf:{n}", f"coupling:{n}", "otcfm"):
                got = [eqt[task, s, n, m] for s in seeds if (task, s, n, m) in eqt]
                if not got:
                    continue
                evs = [e for e, _ in got if e is not None]
                budget = np.mean([b for _, b in got])
                reached = "/".join(str(e["steps"]) if e else "0" for e, _ in got)
                cells = [_ms([e["w2"][k] for e in evs]) if evs else "–" for k in NFES]
                lines.append(
                    f"| {n} | {NAMES[m.partition(':')[0]]} | {len(got)} | {budget:.0f} | {reached} | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
    lines += _summary(tasks, sizes, seeds, by, eqt, floors)
    return lines


def _summary(tasks, sizes, seeds, by, eqt, floors) -> list[str]:
    def mean_at(task, m, k, among=seeds):
        got = [by[task, s, m]["w2"][k] for s in among if (task, s, m) in by]
        return np.mean(got) if got else None

    lines = [
        "## NFE 2 at a glance (equal steps, mean over the seeds present)",
        "",
        "| task | "
        + " | ".join(f"NSGF {n}" for n in sizes)
        + " | "
        + " | ".join(f"coupling {n}" for n in sizes)
        + " | OT-CFM |",
        "|---|" + "---:|" * (2 * len(sizes) + 1),
    ]
    for task in tasks:
        cells = [mean_at(task, f"{m}:{n}", 2) for m in ("nsgf", "coupling") for n in sizes]
        cells.append(mean_at(task, "otcfm", 2))
        lines.append(f"| {task} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += [
        "",
        "## Done-when 1: W2 at NFE 2 over the two-sample floor (equal steps, mean over seeds)",
        "",
        f"Floor: the runs' (one pair of draws) and the median [range] over {FLOOR_PAIRS} pairs; ratios to the median. "
        "The i.i.d. floor (`iid_floor_of`): 2000 i.i.d. targets against a draw of 2000, median over "
        f"{FLOOR_PAIRS}; ratios to it in the last two columns.",
        "",
        "| task | floor (one pair) | floor (median) | NSGF 256 | ratio | best NSGF N | its W2 | ratio | "
        "i.i.d. floor (median) | NSGF 256 / it | best / it |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        cand = {n: mean_at(task, f"nsgf:{n}", 2) for n in sizes}
        cand = {n: v for n, v in cand.items() if v is not None}
        if not cand:
            continue
        best = min(cand, key=cand.get)
        d = cand.get(256)
        pairs = [floor_of(TASKS[task], 2 * i + 1) for i in range(FLOOR_PAIRS)]
        f = float(np.median(pairs))
        iid = [iid_floor_of(TASKS[task], i) for i in range(FLOOR_PAIRS)]
        fi = float(np.median(iid))
        lines.append(
            f"| {task} | {floors[task]:.3f} | {f:.3f} [{min(pairs):.3f}–{max(pairs):.3f}] | "
            f"{'–' if d is None else f'{d:.3f}'} | {'–' if d is None else f'{d / f:.2f}x'} | "
            f"{best} | {cand[best]:.3f} | {cand[best] / f:.2f}x | {fi:.3f} [{min(iid):.3f}–{max(iid):.3f}] | "
            f"{'–' if d is None else f'{d / fi:.2f}x'} | {cand[best] / fi:.2f}x |"
        )
    lines += [
        "",
        "## Done-when 2: tasks where NSGF:N has a lower mean W2 than coupling:N (over the seeds both ran)",
        "",
        "| N | comparison | NFE 1 | NFE 2 | NFE 10 | all three NFE |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for kind in ("equal steps", "equal CPU time"):
            wins = {k: 0 for k in NFES}
            both = all3 = 0
            for task in tasks:
                if kind == "equal steps":  # over the seeds that both methods ran
                    common = [
                        s for s in seeds if (task, s, f"nsgf:{n}") in by and (task, s, f"coupling:{n}") in by
                    ]
                    if not common:
                        continue
                    a = {k: mean_at(task, f"nsgf:{n}", k, common) for k in NFES}
                    b = {k: mean_at(task, f"coupling:{n}", k, common) for k in NFES}
                else:
                    pa = [eqt[task, s, n, f"nsgf:{n}"][0] for s in seeds if (task, s, n, f"nsgf:{n}") in eqt]
                    pb = [
                        eqt[task, s, n, f"coupling:{n}"][0]
                        for s in seeds
                        if (task, s, n, f"coupling:{n}") in eqt
                    ]
                    if not pa or not pb or None in pa or None in pb:
                        continue
                    a = {k: np.mean([e["w2"][k] for e in pa]) for k in NFES}
                    b = {k: np.mean([e["w2"][k] for e in pb]) for k in NFES}
                both += 1
                won = [a[k] < b[k] for k in NFES]
                for k, w in zip(NFES, won, strict=True):
                    wins[k] += w
                all3 += all(won)
            if both:
                cells = " | ".join(f"{wins[k]}/{both}" for k in NFES)
                lines.append(f"| {n} | {kind} | {cells} | {all3}/{both} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=["nsgf", "coupling"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--out-dir", default=None, help="one JSON per (task, method, seed), resumable")
    parser.add_argument("--json", default=None, help="all rows in one JSON at the end")
    parser.add_argument("--report", default=None, metavar="DIR", help="write the tables of DIR's JSONs")
    parser.add_argument("--out", default=None, help="with --report: also write the tables to this file")
    args = parser.parse_args()
    if args.report:
        text = "\n".join(report(Path(args.report)))
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return
    torch.set_num_threads(1)
    out_dir = None if args.out_dir is None else Path(args.out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    # Order of the runs, so that a study cut short has whole comparisons: seeds outermost, then the flow
    # sizes from the smallest (OT-CFM, the equal-time reference, with the first), then the tasks.
    groups = [[f"{m}:{n}" for m in args.methods] for n in args.sizes]
    groups[0].insert(0, "otcfm")
    jobs = [
        (seed, name, method)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for group in groups
        for name in args.tasks
        for method in group
    ]
    floors: dict[str, float] = {}
    rows = []
    for seed, name, method in jobs:
        task = TASKS[name]
        path = held = None
        if out_dir is not None:
            path = run_file(out_dir, name, method, seed)
            held = path.with_suffix(".claim")
            if path.exists() or not claim(held):
                continue
        if name not in floors:
            floors[name] = floor_of(task)
        row = dict(
            task=name,
            seed=seed,
            method=method,
            steps=args.steps,
            width=args.width,
            floor=floors[name],
            **run(task, method, seed, args.steps, args.width, args.eval_every),
            machine=platform.processor() or platform.machine(),
            torch=torch.__version__,
        )
        rows.append(row)
        if path is not None:
            write_json(path, row)
            release(held)
        scores = " / ".join(f"{row['w2'][k]:.3f}" for k in NFES)
        print(
            f"{name} seed {seed} {method}: W2 at NFE 1/2/10 {scores} (floor {floors[name]:.3f}); "
            f"{row['cpu_seconds']:.0f} CPU s ({row['seconds']:.0f} wall s), of which Sinkhorn "
            f"{row['sinkhorn_seconds']:.0f} s in {row['flows']} flows",
            flush=True,
        )
    if args.json:
        meta = dict(vars(args), machine=platform.processor() or platform.machine(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
