"""NSGF against torchcfm's flow-matching methods and rectified flow on the paper's five 2D tasks.

Same torchcfm MLP (``--width``, time input), Adam 1e-3, batch 256 and data samplers for every method; W2 by exact OT
(POT ``emd2``) between ``--n-eval`` generated points and as many fresh target samples, at Euler NFE 1, 2, 5,
10, 100 and with dopri5 (atol = rtol = 1e-5, its NFE counted), over ``--seeds`` seeds (mean ± std). Two
comparisons: every method at ``--steps`` optimiser steps, and the ``--wall-methods`` at NSGF's own total
wall time (simulation included) of the same task and seed.

    # two processes (1 thread each) share the (task, seed) jobs, then merge:
    python benchmarks/two_dim.py --shard 0/2 --json benchmarks/results/two_dim_0.json &
    python benchmarks/two_dim.py --shard 1/2 --json benchmarks/results/two_dim_1.json
    python benchmarks/two_dim.py --report benchmarks/results/two_dim_0.json benchmarks/results/two_dim_1.json

Methods live in the harness's registry (``benchmarks/harness/methods.py``, ``harness.METHODS``): ``name ->
fn(task, config, seed)`` returning an object with ``sample(x0, nfe, solver) -> (samples, nfe_used)`` and
``train_time_s`` (``harness.Sampler``); ``config.train_steps`` is None exactly when ``config.time_budget_s`` is
set (here on the wall clock). NSGF is torchcfm's loop with ``SinkhornFlowMatcher`` at its defaults, or as the
matcher flags (``--flow-steps``, ``--blur``, ...) say. NSGF++ (``nsgf++``: the default variant;
``nsgf++paper``: the paper's) is ``harness.train_nsgfpp``. Studies at equal CPU time, with EMA weights and
one resumable JSON per run, run on the same registry with ``benchmarks/study.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch
from harness import LABELS, METHODS, BenchConfig, NotApplicable, Sampler
from harness.methods import clear_caches
from harness.runner import evaluate as score_at
from tqdm.auto import tqdm

from torchcfm_nsgf._cli import add_matcher_flags, matcher_from_args
from torchcfm_nsgf.datasets import TASKS, get_task
from torchcfm_nsgf.metrics import w2

__all__ = ["METHODS", "BenchConfig", "NotApplicable", "evaluate", "main", "report"]

NFES = (1, 2, 5, 10, 100)
TARGET_NFES = (1, 2, 10)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(sampler: Sampler, x0: torch.Tensor, y: torch.Tensor) -> dict:
    out = {"w2": score_at(sampler, x0, y, NFES)[0], "train_time_s": sampler.train_time_s}
    samples, used = sampler.sample(x0, None, "dopri5")
    out["dopri5"] = {"w2": w2(samples, y), "nfe": used}
    out["n_opt_steps"] = getattr(sampler, "n_opt_steps", None)
    return out


def run(args: argparse.Namespace) -> None:
    matcher = matcher_from_args(args)  # validates the flags; the benchmark builds one per (task, seed)
    nsgf_kwargs = {
        "flow_steps": matcher.flow_steps,
        "step_size": list(matcher.step_sizes),
        "path": matcher.path,
        "refresh_every": matcher.refresh_every,
        "sinkhorn": asdict(matcher.sinkhorn),
    }
    config = BenchConfig(train_steps=args.train_steps, clock="wall", width=args.width, nsgf=nsgf_kwargs)
    records = []
    meta = {
        "argv": [os.path.relpath(sys.argv[0])] + sys.argv[1:],
        "load_start": os.getloadavg(),
        "config": asdict(config),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # Seed-major order, so that an interrupted run has every task; --shard i/n keeps every n-th job.
    jobs = [(t, s) for s in range(args.seeds) for t in args.tasks]
    index, count = (int(v) for v in args.shard.split("/"))
    jobs = jobs[index::count]
    for task_name, seed in tqdm(jobs, desc="task x seed", disable=True if args.no_progress else None):
        task = get_task(task_name)
        eval_gen = torch.Generator().manual_seed(10_000 + seed)
        x0 = task.source(args.n_eval, eval_gen)
        y = task.target(args.n_eval, eval_gen)
        floor = w2(task.target(args.n_eval, eval_gen), y)
        budget = None
        for name in args.methods:
            try:
                sampler = METHODS[name](task, config, seed)
            except NotApplicable:
                continue
            if name == "nsgf":
                budget = sampler.train_time_s
            rec = {"task": task_name, "method": name, "seed": seed, "comparison": "steps", "floor": floor}
            records.append({**rec, **evaluate(sampler, x0, y)})
            tqdm.write(
                f"{task_name} seed {seed} {name}: W2@10 {records[-1]['w2']['10']:.3f} "
                f"({sampler.train_time_s:.0f} s)"
            )
        if budget is not None:
            wall_config = replace(config, train_steps=None, time_budget_s=budget)
            for name in args.wall_methods:
                sampler = METHODS[name](task, wall_config, seed)
                rec = {"task": task_name, "method": name, "seed": seed, "comparison": "wall", "floor": floor}
                records.append({**rec, **evaluate(sampler, x0, y)})
        clear_caches()
        with open(args.json, "w") as handle:  # partial results survive an interrupted run
            json.dump({"meta": {**meta, "load_end": os.getloadavg()}, "records": records}, handle, indent=1)


# ---------------------------------------------------------------------------------------------- report
def _fmt(values: list[float], bold: bool = False) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{mean:.3f} ± {std:.3f}"
    return f"**{text}**" if bold else text


def _nsgf_args(kwargs: dict) -> str:
    """The matcher arguments of a run, as the constructor call would read (defaults if empty)."""
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def report(paths: list[str], name: str = "two_dim") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [json.load(open(p)) for p in paths]
    records = [r for part in parts for r in part["records"]]
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    cfg = parts[0]["meta"]["config"]
    argv = parts[0]["meta"]["argv"]
    n_eval = int(argv[argv.index("--n-eval") + 1]) if "--n-eval" in argv else 2000
    lines = [
        "# 2D benchmark: NSGF against torchcfm's flow matching and rectified flow",
        "",
        f"Machine: {_machine()}; each process on 1 torch thread, run in parallel on a machine shared with "
        "other jobs. Load average (1, 5, 15 min) at start / end of each process: "
        + "; ".join(
            f"{tuple(round(x, 2) for x in p['meta']['load_start'])} / {tuple(round(x, 2) for x in p['meta']['load_end'])}"
            for p in parts
        )
        + ".",
        "",
        "Commands (run from the repository root, then merged):",
        "",
        "```bash",
        *[".venv/bin/python " + " ".join(p["meta"]["argv"]) for p in parts],
        ".venv/bin/python benchmarks/two_dim.py --report " + " ".join(paths) + f" --report-name {name}",
        "```",
        "",
        f"Settings: torchcfm MLP (w={cfg['width']}, time input), Adam {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"{cfg['train_steps']} optimiser steps. NSGF: torchcfm's loop with SinkhornFlowMatcher({_nsgf_args(cfg['nsgf'])}) "
        "(every call draws a fresh batch; the matcher simulates a flow of it into its pool every refresh_every "
        f"calls and serves the pool). I-CFM, OT-CFM and FM σ = {cfg['sigma']:g}; SB-CFM σ = {cfg['sb_sigma']:g} with "
        "torchcfm's default exact OT plan (POT's plain Sinkhorn underflows at reg = 2σ² on this scale); 1-RF = I-CFM "
        f"σ = 0; 2-RF = 1-RF then {cfg['train_steps']} reflow steps on {cfg['reflow_pairs']} pairs (x0, 1-RF(x0)) from "
        "the 1-RF weights (so 2x the optimiser steps; its time includes 1-RF). FM only with the Gaussian source.",
        "",
        f"W2: exact (POT `emd2`, float64) between {n_eval} generated points and {n_eval} fresh target samples "
        f"(the two-sample floor uses the same {n_eval}), mean ± std "
        "over seeds; **bold** = lowest at that NFE among the equal-steps rows (NSGF++ excluded: its columns "
        "count 5 + 1 + n calls). `dopri5` gives W2 and its mean "
        "NFE (atol = rtol = 1e-5). Time: wall-clock training seconds (NSGF: simulation included). "
        "Equal wall-clock rows: the method trained from scratch for NSGF's own total time on that task and seed.",
        "",
    ]
    verdict = []
    for task in tasks:
        recs = [r for r in records if r["task"] == task]
        floors = sorted({r["floor"] for r in recs})
        seeds = sorted({r["seed"] for r in recs})
        lines += [
            f"## {TASKS[task].label}",
            "",
            f"Two-sample floor W2(target, target): {_fmt(floors)} ({len(seeds)} seeds).",
            "",
            "| method | comparison | "
            + " | ".join(f"NFE {n}" for n in NFES)
            + " | dopri5 (NFE) | time (s) | opt. steps |",
            "|---|---|" + "---:|" * (len(NFES) + 3),
        ]
        rows = []
        for comparison in ("steps", "wall"):
            for method in METHODS:
                rs = [r for r in recs if r["method"] == method and r["comparison"] == comparison]
                if rs:
                    rows.append((method, comparison, rs))
        best = {
            # NSGF++'s "NFE n" column means 5 (+ 1) + n network calls: not comparable, never bold
            n: min(
                statistics.fmean(r["w2"][str(n)] for r in rs)
                for m, c, rs in rows
                if c == "steps" and not m.startswith("nsgf++")
            )
            for n in NFES
        }
        curves = {}
        for method, comparison, rs in rows:
            means = {n: statistics.fmean(r["w2"][str(n)] for r in rs) for n in NFES}
            cells = [
                _fmt(
                    [r["w2"][str(n)] for r in rs],
                    comparison == "steps" and not method.startswith("nsgf++") and means[n] == best[n],
                )
                for n in NFES
            ]
            dop = _fmt([r["dopri5"]["w2"] for r in rs])
            dop_nfe = statistics.fmean(r["dopri5"]["nfe"] for r in rs)
            times = [r["train_time_s"] for r in rs]
            time_s = f"{statistics.fmean(times):.0f} ± {statistics.stdev(times) if len(times) > 1 else 0:.0f}"
            steps = f"{statistics.fmean(r['n_opt_steps'] or 0 for r in rs):.0f}"
            which = f"{cfg['train_steps']} steps" if comparison == "steps" else "NSGF's wall time"
            lines.append(
                f"| {LABELS.get(method, method)} | {which} | "
                + " | ".join(cells)
                + f" | {dop} ({dop_nfe:.0f}) | {time_s} | {steps} |"
            )
            curves[(method, comparison)] = (
                means,
                statistics.fmean(r["dopri5"]["w2"] for r in rs),
                dop_nfe,
                {n: statistics.stdev([r["w2"][str(n)] for r in rs]) if len(rs) > 1 else 0.0 for n in NFES},
            )
        lines.append("")
        floor = statistics.fmean(floors)
        # verdict inputs
        if ("nsgf", "steps") in curves:
            nsgf_m = curves[("nsgf", "steps")][0]
            wins = [n for n in TARGET_NFES if nsgf_m[n] == best[n]]
            walls = [c[0] for (m, c_kind), c in curves.items() if c_kind == "wall"]
            wall_wins = [n for n in TARGET_NFES if walls and all(nsgf_m[n] < w[n] for w in walls)]
            verdict.append(
                f"| {TASKS[task].label} | {', '.join(map(str, wins)) or 'none'} | "
                + (f"{', '.join(map(str, wall_wins)) or 'none'}" if walls else "–")
                + f" | {nsgf_m[2]:.3f} | {nsgf_m[2] / floor:.2f}x |"
            )
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for (method, comparison), (means, dop_w2, dop_nfe, stds) in curves.items():
            style = "-" if comparison == "steps" else ":"
            label = LABELS.get(method, method) + ("" if comparison == "steps" else " @ NSGF wall time")
            line = ax.errorbar(
                list(NFES),
                [means[n] for n in NFES],
                yerr=[stds[n] for n in NFES],
                fmt="o" + style,
                ms=4,
                capsize=2,
                label=label,
            )
            ax.plot([dop_nfe], [dop_w2], "*", ms=10, color=line[0].get_color())
        ax.axhline(floor, color="k", ls="--", lw=1, label="two-sample floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (Euler; ★ = dopri5)")
        ax.set_ylabel("W2 to target")
        ax.set_title(TASKS[task].label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{name}_{task}.png"), dpi=110)
        plt.close(fig)
        lines += [f"![W2 against NFE, {TASKS[task].label}]({name}_{task}.png)", ""]
    lines[2:2] = [
        "Summary against the target (NSGF lowest W2 of all methods at NFE 1, 2 and 10 on ≥ 4 of 5 tasks, at "
        "equal optimiser steps and at equal wall time; at 10000 steps within 2x of the floor at NFE 2):",
        "",
        "| task | NFE (1, 2, 10) where NSGF is lowest, equal steps | NFE where NSGF beats every equal-wall-time row "
        "| NSGF W2 @2 | / floor |",
        "|---|---|---|---:|---:|",
        *verdict,
        "",
    ]
    out = os.path.join(RESULTS, f"{name}.md")
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS))
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all of {list(METHODS)}")
    parser.add_argument(
        "--wall-methods", nargs="*", default=["otcfm"], help="methods also trained for NSGF's wall time"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1000, help="optimiser steps of every method")
    parser.add_argument("--width", type=int, default=64, help="width of torchcfm's MLP")
    add_matcher_flags(parser.add_argument_group("NSGF (defaults: SinkhornFlowMatcher's)"))
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th (task, seed) job from the i-th")
    parser.add_argument("--json", default=os.path.join(RESULTS, "two_dim_raw.json"))
    parser.add_argument(
        "--report", nargs="+", metavar="JSON", help="merge result files into a markdown report + plots"
    )
    parser.add_argument(
        "--report-name", default="two_dim", help="results/NAME.md and results/NAME_<task>.png of --report"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        report(args.report, args.report_name)
        return
    args.methods = args.methods or list(METHODS)
    if "nsgf" not in args.methods:
        args.wall_methods = []
    for name in args.methods + args.wall_methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; registered: {list(METHODS)}")
    run(args)


if __name__ == "__main__":
    main()
