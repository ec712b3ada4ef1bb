"""Class-conditional 2D generation: conditional NSGF, NSGF++, guided OT-CFM and I-CFM, W2 per class.

Task ``gaussian-8gaussians-conditional`` (``torchcfm_nsgf.datasets``): N(0, I) to torchcfm's 8gaussians, the label
being the mode index. Every method takes the same number of optimiser steps, batch, learning rate, MLP width
and seed; the label enters each network through a 16-dimensional embedding in its input
(``harness.make_conditional_model`` / ``VelocityMLP(num_classes=8)``):

* NSGF: ``SinkhornFlowMatcher()`` (its defaults: 2 Sinkhorn steps of size 1, straight targets, pool) through
  ``guided_sample_location_and_conditional_flow`` (one Sinkhorn flow per class in the batch), trained with
  torchcfm's loop (the harness's method ``nsgf``);
* NSGF++: ``harness.train_nsgfpp`` (``NSGFPlusPlus.fit`` on the labelled target; default variant ``phase2="ot"``)
  with phase 1 T = 2 Sinkhorn steps of η = 1.0; sampled with ``y`` at total NFE = T + straight steps, so
  only at NFE >= 3;
* OT-CFM (guided): torchcfm's ``ExactOptimalTransportConditionalFlowMatcher(sigma)`` through its own
  ``guided_sample_location_and_conditional_flow`` (one exact OT plan over the mixed batch; each pair keeps
  its data point's label);
* I-CFM: torchcfm's ``ConditionalFlowMatcher(sigma)`` on independent pairs, each row keeping the label of
  its data point (the natural conditional baseline).

Evaluation: for every class, ``--n-eval`` noise points sampled with that label (Euler) against ``--n-eval``
fresh target points of that class; exact W2 (``torchcfm_nsgf.metrics.w2``), per class and averaged over the classes, for
``--seeds`` seeds (``--seed``, ``--seed`` + 1, ...). The per-class table is the first seed's; the summary is
mean ± std over the seeds of the class-mean W2.

Each (method, seed) is one run of the benchmark harness (``harness.run_study``, scored by its own per-class
evaluation): one resumable JSON record per run in ``--runs`` (default: ``--out`` without its suffix), so an
interrupted study resumes and the tables can be rewritten from the records.

    OMP_NUM_THREADS=1 python benchmarks/two_dim_conditional.py --out benchmarks/results/two_dim_conditional.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict

import torch
from _report import command_line, publish, table_head  # benchmarks/, next to this script
from harness import BenchConfig, RunSpec, load_runs, register, run_study, train_nsgfpp
from harness.report import fmt

from torchcfm_nsgf.datasets import get_task
from torchcfm_nsgf.metrics import w2

TASK = "gaussian-8gaussians-conditional"
METHODS = ("NSGF", "NSGF++", "OT-CFM (guided)", "I-CFM")


def class_samples(task, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` fresh target points of class ``c`` (drawn from the task's labelled sampler and filtered)."""
    chunks, have = [], 0
    while have < n:
        x, y = task.target(8 * n, generator)
        chunks.append(x[y == c])
        have += len(chunks[-1])
    return torch.cat(chunks)[:n]


def registry_names(args: argparse.Namespace) -> dict[str, str]:
    """Each method of the tables by its name in the harness's registry (NSGF++ is registered by :func:`main`
    under a name that holds its phase-1 T and η)."""
    return {
        "NSGF": "nsgf",
        "NSGF++": f"nsgf++ot-T{args.nsgfpp_T}-eta{args.nsgfpp_eta:g}",
        "OT-CFM (guided)": "otcfm",
        "I-CFM": "icfm",
    }


class NSGFPlusPlusRun:
    """A trained NSGF++ model and its training seconds."""

    def __init__(self, model, train_time_s: float) -> None:
        self.model, self.train_time_s = model, train_time_s


def nsgfpp_trainer(args: argparse.Namespace):
    """The harness method NSGF++ (variant ``"ot"``, phase 1 ``--nsgfpp-T`` steps of ``--nsgfpp-eta``)."""

    def train(task, config: BenchConfig, seed: int) -> NSGFPlusPlusRun:
        torch.manual_seed(seed)  # network initialisation
        start = time.perf_counter()
        model = train_nsgfpp(
            task,
            phase2="ot",
            train_steps=config.train_steps,
            generator=torch.Generator().manual_seed(seed),
            batch_size=config.batch_size,
            lr=config.lr,
            width=config.width,
            flow_steps=args.nsgfpp_T,
            step_size=args.nsgfpp_eta,
        )
        return NSGFPlusPlusRun(model, time.perf_counter() - start)

    return train


def generate(name: str, model, x0: torch.Tensor, nfe: int, y: torch.Tensor, T: int) -> torch.Tensor | None:
    """Samples of ``model`` from ``x0`` with labels ``y`` at ``nfe`` evaluations in all; None if impossible."""
    if name == "NSGF++":
        if nfe - T < 1:
            return None
        with torch.no_grad():
            out = model.model.sample(x0, straight_steps=nfe - T, y=y)
        assert out.total_nfe == nfe, out.nfe
        return out.samples
    with torch.no_grad():
        samples, used = model.sample(x0, nfe, y=y)
    assert used == nfe
    return samples


def scorer(name: str, args: argparse.Namespace, nfes: list[int]):
    """The run's own scoring: per-class W2 at each NFE (None where impossible) and the per-class floor."""

    def evaluate(model, task, seed: int) -> dict:
        k = task.num_classes
        per_class: dict[str, list[float] | None] = {}
        for nfe in nfes:
            g = torch.Generator().manual_seed(seed + 100)
            scores: list[float] | None = []
            for c in range(k):
                x0 = task.source(args.n_eval, g)
                y = torch.full((args.n_eval,), c, dtype=torch.long)
                ref = class_samples(task, c, args.n_eval, g)
                samples = generate(name, model, x0, nfe, y, args.nsgfpp_T)
                if samples is None:
                    scores = None
                    break
                scores.append(w2(samples, ref))
            per_class[str(nfe)] = scores
        g = torch.Generator().manual_seed(seed + 200)
        floor = [
            w2(class_samples(task, c, args.n_eval, g), class_samples(task, c, args.n_eval, g))
            for c in range(k)
        ]
        return {
            "name": name,
            "n_eval": args.n_eval,
            "per_class": per_class,
            "w2": {n: sum(v) / k for n, v in per_class.items() if v is not None},
            "nfe_used": {n: int(n) for n, v in per_class.items() if v is not None},
            "floor": sum(floor) / k,
            "floor_per_class": floor,
        }

    return evaluate


def study(args: argparse.Namespace, seeds: list[int], nfes: list[int]) -> dict[tuple[str, int], dict]:
    """Every (method, seed) run through the harness's runner; the records by (method name, seed). With a
    runs folder, a finished run is read back rather than trained again (its settings must be these)."""
    config = BenchConfig(
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        sigma=args.sigma,
    )
    names = registry_names(args)
    register(names["NSGF++"], f"NSGF++ (ot, T={args.nsgfpp_T}, η={args.nsgfpp_eta:g})")(nsgfpp_trainer(args))
    jobs = [
        RunSpec(TASK, names[name], s, tuple(nfes), evaluate=scorer(name, args, nfes))
        for s in seeds
        for name in METHODS
    ]
    folder = args.runs or (os.path.splitext(args.out)[0] if args.out else None)
    records = run_study(jobs, config, folder)
    if folder is not None:
        wanted = {(j.method, j.seed) for j in jobs}
        records = [r for r in load_runs([folder]) if (r["method"], r["seed"]) in wanted]
        settings = json.loads(json.dumps(dict(config=asdict(config), nfes=nfes, n_eval=args.n_eval)))
        for r in records:
            if {k: r[k] for k in settings} != settings:
                raise ValueError(
                    f"runs folder {folder!r} holds {r['method']} seed {r['seed']} run with other settings "
                    f"({ {k: r[k] for k in settings} }); name another folder with --runs"
                )
    return {(r["name"], r["seed"]): r for r in records}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=3000, help="optimiser steps of each method")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--sigma", type=float, default=0.0, help="σ of OT-CFM and I-CFM (torchcfm's default is 0.1)"
    )
    p.add_argument("--nsgfpp-T", type=int, default=2, help="NSGF++ phase-1 Sinkhorn steps T")
    p.add_argument("--nsgfpp-eta", type=float, default=1.0, help="NSGF++ phase-1 step size η")
    p.add_argument("--n-eval", type=int, default=500, help="generated and reference points per class")
    p.add_argument(
        "--nfe", default="1,2,3,10", help="Euler steps (NSGF++: T + straight steps) to evaluate at"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (--seed, --seed + 1, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="a line on the machine's load, written under the setup")
    p.add_argument("--out", default=None, help="markdown file to write")
    p.add_argument(
        "--runs",
        default=None,
        help="folder of the per-run JSON records, resumable (default: --out without its suffix; none without --out)",
    )
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    task = get_task(TASK)
    k = task.num_classes

    start = time.perf_counter()
    seeds = [args.seed + i for i in range(args.seeds)]
    by = study(args, seeds, nfes)
    wall = time.perf_counter() - start

    cmd = command_line("two_dim_conditional.py", argv)
    lines = [
        "# Class-conditional 2D: conditional NSGF, NSGF++, guided OT-CFM and I-CFM, W2 per class",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, CPU, {args.threads} thread(s) (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}. Task {task.label}; "
        f"{args.train_steps} optimiser steps each, batch {args.batch_size}, MLP width {args.width} with a label "
        f"embedding, Adam {args.lr:g}, seeds {', '.join(map(str, seeds))}. NSGF: `SinkhornFlowMatcher()` "
        f"defaults (T = 2, η = 1). NSGF++: variant `ot`, phase 1 T = {args.nsgfpp_T}, η = {args.nsgfpp_eta:g}; "
        f"total NFE = {args.nsgfpp_T} + straight steps (— where that leaves no straight step). OT-CFM (torchcfm "
        f"guided) and I-CFM (torchcfm `ConditionalFlowMatcher`, label kept on its row): σ = {args.sigma:g}. "
        f"W2: exact (POT `emd2`) between {args.n_eval} points generated with the class's label (Euler) and "
        f"{args.n_eval} fresh points of that class. Total wall time {wall:.0f} s.",
    ]
    if args.note:
        lines += ["", args.note]

    lines += [
        "",
        f"## Summary: class-mean W2, mean ± std over {len(seeds)} seed(s)",
        "",
        *table_head(["method", *(f"NFE {n}" for n in nfes)]),
    ]
    for name in METHODS:
        cells = []
        for nfe in nfes:
            vals = [by[name, s]["per_class"][str(nfe)] for s in seeds]
            cells.append("—" if vals[0] is None else fmt([sum(v) / k for v in vals]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floor_means = [sum(by[METHODS[0], s]["floor_per_class"]) / k for s in seeds]
    lines.append("| two-sample floor | " + " | ".join(fmt(floor_means) for _ in nfes) + " |")

    lines += [
        "",
        f"## Per class, seed {seeds[0]}",
        "",
        "| method | NFE | " + " | ".join(f"class {c}" for c in range(k)) + " | mean |",
        "|---|---|" + "---|" * (k + 1),
    ]
    for name in METHODS:
        for nfe in nfes:
            per_class = by[name, seeds[0]]["per_class"][str(nfe)]
            if per_class is None:
                lines.append(f"| {name} | {nfe} | " + " | ".join("—" for _ in range(k)) + " | — |")
                continue
            cells = " | ".join(f"{v:.3f}" for v in per_class)
            lines.append(f"| {name} | {nfe} | {cells} | **{sum(per_class) / k:.3f}** |")
    floor = by[METHODS[0], seeds[0]]["floor_per_class"]
    lines.append(
        "| two-sample floor | – | " + " | ".join(f"{v:.3f}" for v in floor) + f" | {sum(floor) / k:.3f} |"
    )
    lines += [
        "",
        "Training time (s, mean over seeds; simulation / OT pairing included): "
        + ", ".join(
            f"{name} {statistics.mean(by[name, s]['train_time_s'] for s in seeds):.1f}" for name in METHODS
        )
        + ".",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
