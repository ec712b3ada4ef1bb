"""NSGF++ on the 2D tasks: its phase-2 variants and phase-1 lengths next to NSGF and torchcfm's baselines.

For each task and seed, trains with the same optimiser steps, batch and MLP width (``torchcfm_nsgf.datasets``):

* NSGF++ (``harness.train_nsgfpp``) for every ``--phase1`` setting ``T:eta`` in the ``"ot"`` variant, and the
  other ``--variants`` (``"ot-predictor"``, ``"paper"``) at the first ``--phase1`` setting;
* NSGF (``SinkhornFlowMatcher()`` with its defaults in torchcfm's loop), OT-CFM and I-CFM (torchcfm's matchers,
  σ = ``--sigma``): the harness's methods ``nsgf``, ``otcfm``, ``icfm`` (``benchmarks/harness/methods.py``).

Then reports the exact 2-Wasserstein distance (``torchcfm_nsgf.metrics.w2``) between generated points and fresh target points at
each total NFE of ``--totals`` (Euler everywhere; NSGF++'s NFE counted from network calls as NSGF + predictor +
straight flow), mean ± std over seeds, with two extra rows per task: the ``"paper"`` variant's straight flow
alone from noise (NSGF++'s "own straight flow") and the NSGF phase of the first ``"ot"`` model alone (NFE T).
A cell is "—" where the total is below a variant's phase-1 cost plus one straight-flow step.

Each (task, model, seed) is one run of the benchmark harness (``harness.run_study``; the NSGF++ models scored
by their own evaluation on the total-NFE grid, the baselines by the harness's W2 at NFEs, both on the same
``harness.EvalSet`` points): one resumable JSON record per run in ``--runs`` (default: ``--out`` without its
suffix).

    python benchmarks/nsgfpp_two_dim.py --seeds 3 --out benchmarks/results/nsgfpp_two_dim.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

import torch
from _report import command_line
from harness import BenchConfig, EvalSet, RunSpec, load_runs, register, run_study, train_nsgfpp

from torchcfm_nsgf import odeint_sample
from torchcfm_nsgf.datasets import TASKS, get_task
from torchcfm_nsgf.metrics import w2

BASELINES = {"NSGF (`SinkhornFlowMatcher()`)": "nsgf", "OT-CFM": "otcfm", "I-CFM": "icfm"}  # harness names


def parse_phase1(text: str) -> list[tuple[int, float]]:
    out = []
    for item in text.split(","):
        steps, _, eta = item.partition(":")
        out.append((int(steps), float(eta)))
    return out


class NSGFPlusPlusRun:
    """A trained NSGF++ model and its training seconds."""

    def __init__(self, model, train_time_s: float) -> None:
        self.model, self.train_time_s = model, train_time_s


def nsgfpp_runs(args, phase1: list[tuple[int, float]]) -> list[tuple[str, str, tuple[str, int, float]]]:
    """``(label, harness name, (variant, T, eta))`` of every NSGF++ model: the ``"ot"`` variant at every
    phase-1 setting, then the other variants at the first."""
    variants = [("ot", T, eta) for T, eta in phase1]
    variants += [(v, *phase1[0]) for v in args.variants.split(",") if v and v != "ot"]
    out = []
    for variant, T, eta in variants:
        label = f"NSGF++ `{variant}` (T={T}, η={eta:g})"
        name = f"nsgf++{variant}-T{T}-eta{eta:g}"
        if args.endpoints == "network" and variant != "paper":
            label += ", network X_T"
            name += "-network"
        out.append((label, name, (variant, T, eta)))
    return out


def nsgfpp_trainer(args, variant: str, T: int, eta: float):
    """The harness method of one NSGF++ model (``harness.train_nsgfpp`` with this script's settings)."""

    def train(task, config: BenchConfig, seed: int) -> NSGFPlusPlusRun:
        torch.manual_seed(seed)  # network initialisation
        start = time.perf_counter()
        model = train_nsgfpp(
            task,
            phase2=variant,
            train_steps=config.train_steps,
            generator=torch.Generator().manual_seed(seed),
            batch_size=config.batch_size,
            width=config.width,
            flow_steps=T,
            step_size=eta,
            refresh_every=args.refresh_every,
            endpoints=args.endpoints,
        )
        return NSGFPlusPlusRun(model, time.perf_counter() - start)

    return train


def nsgfpp_scorer(label: str, first_ot: bool, args, totals: list[int]):
    """The run's own scoring on the total-NFE grid (``harness.EvalSet`` points): its row (None where the total
    is too small), for ``paper`` also its straight flow alone, for the first ``ot`` model its NSGF phase."""

    def evaluate(run: NSGFPlusPlusRun, task, seed: int) -> dict:
        evals = EvalSet.draw(task.name, seed, args.n_eval)
        x0, ref, model = evals.x0, evals.target, run.model
        first_cost = model.flow_steps + int(model.objective.uses_predictor)
        cells: list[float | None] = []
        for total in totals:
            if total < first_cost + 1:
                cells.append(None)
                continue
            out = model.sample(x0, solver="euler", straight_steps=total - first_cost)
            assert out.total_nfe == total, (out.nfe, total)
            cells.append(w2(out.samples, ref))
        rows = {label: cells}
        if "`paper`" in label:
            straight = model.nets["straight"].eval()
            rows[STRAIGHT] = [w2(odeint_sample(straight, x0, n_steps=n).samples, ref) for n in totals]
        own = {
            "rows": rows,
            "w2": {str(n): v for n, v in zip(totals, cells, strict=True) if v is not None},
            "nfe_used": {str(n): n for n, v in zip(totals, cells, strict=True) if v is not None},
            "floor": evals.floor,
        }
        if first_ot:
            flow = odeint_sample(model.nets["nsgf"].eval(), x0, n_steps=model.flow_steps)
            own["nsgf_phase"] = w2(flow.samples, ref)
        return own

    return evaluate


STRAIGHT = "straight flow of `paper` alone, from noise"


def run_task(name: str, args, phase1: list[tuple[int, float]], totals: list[int], folder: str | None) -> list:
    """Every run of task ``name`` through the harness's runner (seeds outermost); per seed, the rows of every
    sampler at every total NFE, training seconds, the NSGF phase and the floor (the ``--out`` JSON's shape).
    With a runs folder, a finished run is read back rather than trained again (its settings must be these)."""
    config = BenchConfig(
        train_steps=args.train_steps, batch_size=args.batch_size, width=args.width, sigma=args.sigma
    )
    models = nsgfpp_runs(args, phase1)
    first_ot = next(label for label, _, (variant, _, _) in models if variant == "ot")
    labels = {}
    per_seed = []
    for seed in range(args.seeds):
        for label, method, (variant, T, eta) in models:
            register(method, label)(nsgfpp_trainer(args, variant, T, eta))
            evaluate = nsgfpp_scorer(label, label == first_ot, args, totals)
            per_seed.append(RunSpec(name, method, seed, tuple(totals), evaluate=evaluate))
            labels[method] = label
        for label, method in BASELINES.items() if args.baselines else ():
            per_seed.append(RunSpec(name, method, seed, tuple(totals)))
            labels[method] = label
    extra = {"n_eval": args.n_eval, "refresh_every": args.refresh_every}
    records = run_study(per_seed, config, folder, n_eval=args.n_eval, extra=extra)
    if folder is not None:
        wanted = {(j.method, j.seed) for j in per_seed}
        records = [r for r in load_runs([folder]) if r["task"] == name and (r["method"], r["seed"]) in wanted]
        settings = json.loads(json.dumps(dict(config=asdict(config), nfes=totals, **extra)))
        for r in records:
            if {k: r.get(k) for k in settings} != settings:
                raise ValueError(
                    f"runs folder {folder!r} holds {r['method']} seed {r['seed']} on {name} with other settings; "
                    "name another folder with --runs"
                )
    by = {(r["method"], r["seed"]): r for r in records}
    out = []
    for seed in range(args.seeds):
        rows: dict[str, list[float | None]] = {}
        for _, method, _ in models:
            rows.update({k: v for k, v in by[method, seed]["rows"].items() if k != STRAIGHT})
        for _, method, _ in models:
            if STRAIGHT in by[method, seed]["rows"]:
                rows[STRAIGHT] = by[method, seed]["rows"][STRAIGHT]
        for label, method in BASELINES.items() if args.baselines else ():
            rows[label] = [by[method, seed]["w2"][str(n)] for n in totals]
        methods = [m for _, m, _ in models] + [m for m in BASELINES.values() if args.baselines]
        first = next(m for label, m, _ in models if label == first_ot)
        out.append(
            {
                "rows": rows,
                "train_s": {labels[m]: by[m, seed]["train_time_s"] for m in methods},
                "nsgf_phase": by[first, seed]["nsgf_phase"],
                "floor": by[first, seed]["floor"],
            }
        )
    return out


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=1000, help="optimiser steps of every network")
    p.add_argument("--phase1", default="2:1.0,1:1.0,3:0.5", help="NSGF++ phase-1 settings T:eta")
    p.add_argument("--variants", default="ot,ot-predictor,paper", help="NSGF++ variants besides `ot`")
    p.add_argument("--baselines", type=int, default=1, help="1: also train NSGF, OT-CFM and I-CFM; 0: not")
    p.add_argument(
        "--refresh-every", type=int, default=50, help="NSGF++: a new Sinkhorn flow every this many"
    )
    p.add_argument(
        "--endpoints",
        default="simulated",
        choices=("simulated", "network"),
        help="where the ot variants' segments start: the simulated flow's X_T or the NSGF network's",
    )
    p.add_argument("--sigma", type=float, default=0.1, help="σ of OT-CFM and I-CFM")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--totals", default="3,4,6,10", help="total NFEs to compare at")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="markdown file to write (and a .json next to it)")
    p.add_argument(
        "--runs",
        default=None,
        help="folder of the per-run JSON records, resumable (default: --out without its suffix; none without --out)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    totals = [int(n) for n in args.totals.split(",")]
    phase1 = parse_phase1(args.phase1)

    cmd = command_line("nsgfpp_two_dim.py", argv)
    lines = [
        "# NSGF++ on 2D: phase-2 variants and phase-1 lengths, next to NSGF and the baselines",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, CPU, {args.threads} thread(s), torch {torch.__version__}. "
        f"{args.train_steps} optimiser steps of every network, batch {args.batch_size}, MLP width {args.width}, "
        f"Adam 1e-3; NSGF++ refreshes its pool and end points every {args.refresh_every} steps, default "
        f"Sinkhorn options; OT-CFM and I-CFM σ = {args.sigma:g}. W2: exact (POT `emd2`) between "
        f"{args.n_eval} generated and {args.n_eval} fresh target points, mean ± std over {args.seeds} seeds; "
        "Euler everywhere, NSGF++'s total NFE split as NSGF + predictor + straight.",
        "",
    ]
    results = {}
    folder = args.runs or (os.path.splitext(args.out)[0] if args.out else None)
    for name in args.tasks.split(","):
        task = get_task(name)
        start = time.perf_counter()
        runs = run_task(name, args, phase1, totals, folder)
        results[name] = runs
        labels = list(runs[0]["rows"])
        train_s = {k: statistics.mean(r["train_s"][k] for r in runs) for k in runs[0]["train_s"]}
        lines += [
            f"## {task.label}",
            "",
            f"Floor W2(target, target) = {fmt([r['floor'] for r in runs])}. NSGF phase of the first `ot` model "
            f"alone (NFE {phase1[0][0]}): {fmt([r['nsgf_phase'] for r in runs])}. Mean training seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in train_s.items())
            + f". Task wall time {time.perf_counter() - start:.0f} s.",
            "",
            "| sampler | " + " | ".join(f"NFE {n}" for n in totals) + " |",
            "|---|" + "---|" * len(totals),
        ]
        for label in labels:
            cells = [fmt([r["rows"][label][i] for r in runs]) for i in range(len(totals))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        sys.stdout.write("\n".join(lines[-(len(labels) + 6) :]) + "\n")
        sys.stdout.flush()
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
