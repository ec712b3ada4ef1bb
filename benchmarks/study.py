"""A 2D study in one command: methods x tasks x seeds at one budget, W2 at each method's NFEs, resumable.

Every run trains one registered method (``harness.METHODS``: nsgf, icfm, otcfm, sbcfm, fm, 1rf, 2rf, nsgf++,
nsgf++paper, the families ``nsgf:N`` and ``coupling:N``, and any method registered since) from scratch within
the same budget: ``--train-steps`` optimiser steps, or ``--budget-s`` seconds of training on ``--clock``
(``cpu``: ``time.process_time`` of the training alone, the fair clock on a shared machine). ``--ema`` scores
every method's EMA weights. A method is written ``name@NFE,NFE`` (its NFEs; without ``@`` its registered
default, else ``--nfes``). One JSON record per run goes to ``--out-dir`` as the run finishes; a finished run is
skipped and a running one (claimed by another process) is left to it, so the same command in two processes
shares the work and an interrupted study resumes. ``--report`` writes the tables of one or more folders.

The 2D one-step comparison at equal CPU time (5 tasks x 3 seeds, EMA weights for every method):

    python benchmarks/study.py --methods drift@1 meanflow@1 2rf@1 nsgf@1,2 otcfm@1,2 --seeds 3 \\
        --budget-s 90 --clock cpu --ema 0.999 --width 256 --out-dir benchmarks/results/one_step_2d
    python benchmarks/study.py --report benchmarks/results/one_step_2d --out benchmarks/results/one_step_2d.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

import torch
from harness import BenchConfig, load_runs, parse_methods, run_study, study_jobs, study_tables
from harness.methods import known
from harness.report import curve_table

from torchcfm_nsgf.datasets import TASKS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=["nsgf@1,2", "otcfm@1,2"], help="name[@NFE,...] each")
    p.add_argument("--nfes", default="1,2,10", help="NFEs of a method given without @")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--train-steps", type=int, default=None, help="optimiser steps of every run")
    budget.add_argument(
        "--budget-s", dest="time_budget_s", type=float, default=None, help="training seconds of every run"
    )
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the clock of --budget-s")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the scored weights")
    p.add_argument(
        "--eval-every",
        dest="snapshot_every",
        type=int,
        default=None,
        help="also score every k steps (curves)",
    )
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=0.1, help="σ of I-CFM, OT-CFM and FM")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY.FIELD=VALUE",
        help="settings of methods registered elsewhere, read as config.KEY (e.g. drift.self_term=independent; "
        "values as JSON, else as text)",
    )
    p.add_argument("--n-eval", type=int, default=2000, help="generated and target points of each W2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: every n-th run from the i-th")
    p.add_argument("--out-dir", default=os.path.join(RESULTS, "study"), help="one JSON per run")
    p.add_argument("--report", nargs="+", metavar="DIR", help="tables of these folders' runs")
    p.add_argument("--out", default=None, help="with --report: also write the tables here")
    return p


def config_of(args: argparse.Namespace) -> BenchConfig:
    """The study's :class:`BenchConfig`: every field the command line names (1000 steps if no budget)."""
    given = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    given["extra"] = extra_settings(args.set)
    if given["time_budget_s"] is None and given["train_steps"] is None:
        given["train_steps"] = 1000
    elif given["time_budget_s"] is not None:
        given["train_steps"] = None
    return BenchConfig(**given)


def extra_settings(items: list[str]) -> dict:
    """``["drift.step_size=0.5", ...]`` -> ``{"drift": {"step_size": 0.5}}`` (values as JSON, else text)."""
    extra: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        owner, dot, name = key.partition(".")
        if not (sep and dot and owner and name):
            raise ValueError(f"--set takes KEY.FIELD=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        extra.setdefault(owner, {})[name] = parsed
    return extra


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        runs = load_runs(args.report)
        lines = study_tables(runs, title="2D study")
        if any(len(r["evaluations"]) > 1 for r in runs):
            nfe = min(int(n) for r in runs for n in r["w2"])
            lines += ["", "## Along training", "", *curve_table(runs, nfe)]
        commands = dict.fromkeys(r.get("command", "") for r in runs if r.get("command"))
        lines += ["", "Runs made by:", "", *[f"    {c}" for c in commands]]
        text = "\n".join(
            [*lines, "", f"Tables: `python benchmarks/study.py --report {' '.join(args.report)}`", ""]
        )
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text)
        return
    try:
        methods = parse_methods(args.methods, tuple(int(n) for n in args.nfes.split(",")))
        shard = tuple(int(v) for v in args.shard.split("/"))
        config = config_of(args)
    except ValueError as err:
        p.error(f"{err} (methods: {known()})")
    jobs = study_jobs(args.tasks, methods, range(args.first_seed, args.first_seed + args.seeds))
    command = "python benchmarks/study.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def show(r: dict) -> None:
        scores = ", ".join(f"NFE {n}: {v:.3f}" for n, v in r["w2"].items())
        print(
            f"{r['task']} seed {r['seed']} {r['method']}: W2 {scores} (floor {r['floor']:.3f}); "
            f"{r['steps']} steps, {r['train_time_s']:.1f} s {r['clock']}",
            flush=True,
        )

    run_study(
        jobs,
        config,
        args.out_dir,
        shard=shard,
        n_eval=args.n_eval,
        extra={"command": command},
        on_record=show,
    )


if __name__ == "__main__":
    main()
