"""Which NSGF regime: flow steps T, step size η, blur, tol and the served path, on the paper's 2D tasks.

For every task and setting: (a) the simulated flow itself, ``--particles`` source points pulled towards as
many target samples, W2 to ``--n-eval`` fresh target samples after each Euler step (next to the W2 of the
``--particles`` target samples themselves, the floor a flow of that size can reach) and the seconds per flow;
(b) the field learned by torchcfm's loop with that ``SinkhornFlowMatcher`` (``harness.train_nsgf``, batch 256,
``--train-steps`` Adam steps, MLP ``--width``), its W2 at Euler NFE 1, 2, 5, 10, 100 and with dopri5, and its
training seconds (simulation included). Each (task, setting) is one run of the benchmark harness
(``harness.run_study`` with the run's own scoring): one resumable JSON record per run in the folder named
like ``--json`` without its suffix; ``--json`` gathers that folder's records.

    python benchmarks/nsgf_regime.py --shard 0/2 --json benchmarks/results/nsgf_regime_0.json &
    python benchmarks/nsgf_regime.py --shard 1/2 --json benchmarks/results/nsgf_regime_1.json
    python benchmarks/nsgf_regime.py --report benchmarks/results/nsgf_regime_0.json benchmarks/results/nsgf_regime_1.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings

import torch
from harness import BenchConfig, RunSpec, load_runs, register, run_study, train_nsgf

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf.datasets import TASKS
from torchcfm_nsgf.metrics import w2

NFES = (1, 2, 5, 10, 100)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name -> SinkhornFlowMatcher arguments ("sinkhorn" as SinkhornOptions fields) on top of BASE: the matcher's
# defaults with tol 1e-3, the tolerance this study started from (it chose the present default, 1e-2).
BASE = {"sinkhorn": {"tol": 1e-3}}
SETTINGS: dict[str, dict] = {
    "default": {},
    "T=1": {"flow_steps": 1},
    "T=3": {"flow_steps": 3},
    "blur 0.05": {"sinkhorn": {"blur": 0.05}},
    "blur 0.2": {"sinkhorn": {"blur": 0.2}},
    "tol 1e-2": {"sinkhorn": {"tol": 1e-2}},
    "polyline": {"path": "polyline"},
    "grid": {"path": "grid"},
    "polyline T=3 η=[1, .5, .5]": {"path": "polyline", "flow_steps": 3, "step_size": [1.0, 0.5, 0.5]},
    "polyline T=10 η=0.3": {"path": "polyline", "flow_steps": 10, "step_size": 0.3},
}


def build(setting: dict, seed: int) -> SinkhornFlowMatcher:
    kwargs = {**BASE, **setting}
    kwargs["sinkhorn"] = SinkhornOptions(**{**BASE["sinkhorn"], **setting.get("sinkhorn", {})})
    return SinkhornFlowMatcher(**kwargs, generator=torch.Generator().manual_seed(seed))


def slug(name: str) -> str:
    """A setting's name as a file-name part: ``"polyline T=3 η=[1, .5, .5]"`` -> ``"polyline_T=3_1_.5_.5"``."""
    return "_".join(filter(None, re.split(r"[^A-Za-z0-9.=+-]+", name.replace("η=", ""))))


def draws(task, args: argparse.Namespace) -> tuple[torch.Generator, dict]:
    """The study's draws from one generator of ``args.seed``, in order: ``n_eval`` source points and targets,
    a second target draw (the floor), ``particles`` source points and targets. The generator goes on to
    draw the training batches."""
    gen = torch.Generator().manual_seed(args.seed)
    x0e, ye = task.source(args.n_eval, gen), task.target(args.n_eval, gen)
    floor = w2(task.target(args.n_eval, gen), ye)
    xp, yp = task.source(args.particles, gen), task.target(args.particles, gen)
    return gen, dict(x0e=x0e, ye=ye, floor=floor, xp=xp, yp=yp)


class Learned:
    """The field learned with one setting's matcher (``harness.train_nsgf``) and that matcher."""

    def __init__(self, trained, matcher: SinkhornFlowMatcher) -> None:
        self.trained, self.matcher, self.train_time_s = trained, matcher, trained.train_time_s


def trainer(name: str, args: argparse.Namespace):
    """The harness method of setting ``name``: (b) the learned field, trained after the study's draws."""

    def train(task, config, seed: int) -> Learned:
        gen, _ = draws(task, args)
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matcher = build(SETTINGS[name], args.seed)
            trained = train_nsgf(
                task,
                matcher,
                train_steps=config.train_steps,
                generator=gen,
                width=config.width,
                batch_size=256,
            )
        return Learned(trained, matcher)

    return train


def scorer(name: str, args: argparse.Namespace):
    """The run's own scoring: (a) the simulated flow, then the learned field at ``NFES`` and with dopri5."""

    def evaluate(learned: Learned, task, seed: int) -> dict:
        _, d = draws(task, args)
        matcher = build(SETTINGS[name], args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            traj = matcher.simulate(d["xp"], d["yp"])
            flow_s = time.perf_counter() - start
        field, trained_matcher = learned.trained.field, learned.matcher
        scores = {
            str(n): w2(trained_matcher.sample(field, d["x0e"], n_steps=n).samples, d["ye"]) for n in NFES
        }
        adaptive = trained_matcher.sample(field, d["x0e"], solver="dopri5")
        return {
            "setting": name,
            "w2": scores,
            "nfe_used": {str(n): n for n in NFES},
            "floor": d["floor"],
            "target_sample_w2": w2(d["yp"], d["ye"]),
            "particles": args.particles,
            "flow_w2": [w2(x, d["ye"]) for x in traj.xs],
            "flow_s": flow_s,
            "flow_iters": traj.n_iters,
            "learned_w2": scores,
            "dopri5": {"w2": w2(adaptive.samples, d["ye"]), "nfe": adaptive.total_nfe},
            "train_s": learned.train_time_s,
            "n_flows": trained_matcher.n_flows,
            "blur": trained_matcher.blur,
        }

    return evaluate


def run(args: argparse.Namespace) -> None:
    """Every (task, setting) job of the shard through the harness's runner: one resumable record per run in
    the folder named like ``--json`` without its suffix, and ``--json`` itself rewritten with every record of
    that folder after each run (the file ``--report`` reads)."""
    index, count = (int(v) for v in args.shard.split("/"))
    jobs = []
    for task in args.tasks:
        for name in args.settings:
            method = f"nsgf-regime-{slug(name)}"
            register(method, f"NSGF regime: {name}")(trainer(name, args))
            jobs.append(RunSpec(task, method, args.seed, NFES, evaluate=scorer(name, args)))
    folder = os.path.splitext(args.json)[0]
    meta = {"argv": [os.path.relpath(sys.argv[0])] + sys.argv[1:], "load_start": os.getloadavg()}
    config = BenchConfig(train_steps=args.train_steps, width=args.width, batch_size=256)

    def on_record(r: dict) -> None:
        learned = {k: round(v, 3) for k, v in r["learned_w2"].items()}
        print(
            f"{r['task']} | {r['setting']}: flow {[round(v, 3) for v in r['flow_w2']]} ({r['flow_s']:.2f} s) | "
            f"learned {learned} dopri5 {r['dopri5']['w2']:.3f} ({r['train_s']:.0f} s)",
            flush=True,
        )
        records = [x for x in load_runs([folder]) if "setting" in x]
        with open(args.json, "w") as handle:
            json.dump({"meta": {**meta, "load_end": os.getloadavg()}, "records": records}, handle, indent=1)

    run_study(jobs, config, folder, shard=(index, count), extra={"argv": meta["argv"]}, on_record=on_record)


def report(paths: list[str]) -> None:
    parts = [json.load(open(p)) for p in paths]
    records = [r for part in parts for r in part["records"]]
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in records)]
    by = {(r["task"], r["setting"]): r for r in records}
    lines = [
        "# NSGF regime study (2D): flow steps, step size, blur, tol, served path",
        "",
        "Commands:",
        "",
        "```bash",
        *[".venv/bin/python " + " ".join(p["meta"]["argv"]) for p in parts],
        "```",
        "",
        "Load average (1, 5, 15 min) at start / end of each process: "
        + "; ".join(
            f"{tuple(round(x, 2) for x in p['meta']['load_start'])} / "
            f"{tuple(round(x, 2) for x in p['meta']['load_end'])}"
            for p in parts
        )
        + ".",
        "",
        "Settings differ from `default` (2 steps of η = 1, blur 0.1 of the target's scale, tol 1e-3, straight "
        "path, refresh every 50 calls) only in what their name says; `tol 1e-2` is `SinkhornFlowMatcher()` "
        "as it now stands (this study chose it).",
        "",
        "## Learned field: W2 at Euler NFE (geometric mean over the tasks, and per task)",
        "",
        "| setting | " + " | ".join(f"NFE {n}" for n in NFES) + " | dopri5 | train s |",
        "|---|" + "---:|" * (len(NFES) + 2),
    ]

    def gmean(values):
        return statistics.geometric_mean(values) if values else float("nan")

    for s in settings:
        rs = [by[(t, s)] for t in tasks if (t, s) in by]
        cells = [f"{gmean([r['learned_w2'][str(n)] for r in rs]):.3f}" for n in NFES]
        cells.append(f"{gmean([r['dopri5']['w2'] for r in rs]):.3f}")
        cells.append(f"{statistics.fmean(r['train_s'] for r in rs):.0f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Simulated flow: W2 after each step (per task), seconds per flow", ""]
    for t in tasks:
        rs = [by[(t, s)] for s in settings if (t, s) in by]
        if not rs:
            continue
        lines += [
            f"### {TASKS[t].label} (floor {rs[0]['floor']:.3f}; W2 of the {rs[0]['particles']} target samples "
            f"the flow is pulled to: {rs[0]['target_sample_w2']:.3f})",
            "",
            "| setting | W2 after steps 0, 1, ... | s per flow | learned "
            + " | ".join(f"@{n}" for n in NFES)
            + " |",
            "|---|---|---:|" + "---:|" * len(NFES),
        ]
        for r in rs:
            flow = ", ".join(f"{v:.3f}" for v in r["flow_w2"][:4]) + (" ..." if len(r["flow_w2"]) > 4 else "")
            if len(r["flow_w2"]) > 4:
                flow += f" {r['flow_w2'][-1]:.3f}"
            lines.append(
                f"| {r['setting']} | {flow} | {r['flow_s']:.2f} | "
                + " | ".join(f"{r['learned_w2'][str(n)]:.3f}" for n in NFES)
                + " |"
            )
        lines.append("")
    out = os.path.join(RESULTS, "nsgf_regime.md")
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS), help="2D tasks")
    parser.add_argument(
        "--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings"
    )
    parser.add_argument("--train-steps", type=int, default=1000, help="Adam steps of the learned field")
    parser.add_argument("--width", type=int, default=64, help="width of torchcfm's MLP")
    parser.add_argument("--particles", type=int, default=256, help="particles of the simulated flow")
    parser.add_argument("--n-eval", type=int, default=2000, help="points for W2")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--shard", default="0/1", help="i/n: run every n-th (task, setting) job from the i-th"
    )
    parser.add_argument("--json", default=os.path.join(RESULTS, "nsgf_regime.json"), help="raw results")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="merge result files into nsgf_regime.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
