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

import torch
from _report import command_line
from harness import BenchConfig, method_fn, train_nsgfpp
from harness.runner import evaluate

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


def run_seed(task, seed: int, args, phase1: list[tuple[int, float]], totals: list[int]) -> dict:
    """W2 of every row at every total NFE (None where the total is too small), and training seconds."""
    models, train_s = {}, {}
    variants = [("ot", T, eta) for T, eta in phase1]
    variants += [(v, *phase1[0]) for v in args.variants.split(",") if v and v != "ot"]
    for variant, T, eta in variants:
        label = f"NSGF++ `{variant}` (T={T}, η={eta:g})"
        if args.endpoints == "network" and variant != "paper":
            label += ", network X_T"
        torch.manual_seed(seed)  # network initialisation
        start = time.perf_counter()
        models[label] = train_nsgfpp(
            task,
            phase2=variant,
            train_steps=args.train_steps,
            generator=torch.Generator().manual_seed(seed),
            batch_size=args.batch_size,
            width=args.width,
            flow_steps=T,
            step_size=eta,
            refresh_every=args.refresh_every,
            endpoints=args.endpoints,
        )
        train_s[label] = time.perf_counter() - start
    fields = {}
    config = BenchConfig(
        train_steps=args.train_steps, batch_size=args.batch_size, width=args.width, sigma=args.sigma
    )
    for label, method in BASELINES.items() if args.baselines else ():
        fields[label] = method_fn(method)(task, config, seed)
        train_s[label] = fields[label].train_time_s

    gen = torch.Generator().manual_seed(10_000 + seed)
    x0, ref = task.source(args.n_eval, gen), task.target(args.n_eval, gen)
    rows: dict[str, list[float | None]] = {}
    for label, model in models.items():
        first_cost = model.flow_steps + int(model.objective.uses_predictor)
        cells = []
        for total in totals:
            if total < first_cost + 1:
                cells.append(None)
                continue
            out = model.sample(x0, solver="euler", straight_steps=total - first_cost)
            assert out.total_nfe == total, (out.nfe, total)
            cells.append(w2(out.samples, ref))
        rows[label] = cells
    for label, model in models.items():
        if "`paper`" in label:
            straight = model.nets["straight"].eval()
            rows["straight flow of `paper` alone, from noise"] = [
                w2(odeint_sample(straight, x0, n_steps=n).samples, ref) for n in totals
            ]
    for label, sampler in fields.items():
        rows[label] = list(evaluate(sampler, x0, ref, totals)[0].values())
    first = next(m for label, m in models.items() if label.startswith("NSGF++ `ot` "))
    nsgf_phase = w2(odeint_sample(first.nets["nsgf"].eval(), x0, n_steps=first.flow_steps).samples, ref)
    floor = w2(task.target(args.n_eval, gen), ref)
    return {"rows": rows, "train_s": train_s, "nsgf_phase": nsgf_phase, "floor": floor}


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
    for name in args.tasks.split(","):
        task = get_task(name)
        start = time.perf_counter()
        runs = [run_seed(task, seed, args, phase1, totals) for seed in range(args.seeds)]
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
