"""NSGF++ on 2D tasks: the paper's phase 2 against the ``"ot"`` variant, at matched total NFE.

For each task, trains NSGF++ twice with the same phase 1 (``torchcfm_nsgf.toy.train_nsgfpp``, one seed):
``phase2="paper"`` (straight flow on noise→data interpolations, time predictor) and ``phase2="ot"``
(straight flow on the phase-1 end points paired with the data by exact minibatch OT, no predictor). Then
reports the exact 2-Wasserstein distance (``torchcfm_nsgf.toy.w2``) between generated points and fresh target
points at each total NFE of ``--totals`` (Euler in both phases; NFE counted from network calls:
NSGF + predictor + straight), for: each variant, each variant's straight flow alone from noise, and the NSGF
phase alone (``T`` steps). Writes a markdown table.

    python benchmarks/nsgfpp_two_dim.py --out benchmarks/results/nsgfpp_two_dim.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from torchcfm_nsgf import odeint_sample
from torchcfm_nsgf.toy import get_task, train_nsgfpp, w2

VARIANTS = ("paper", "ot")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="8gaussians-moons,gaussian-moons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=1000, help="steps of every network (one loop)")
    p.add_argument("--phase1-steps", type=int, default=5, help="T, NSGF steps of phase 1")
    p.add_argument("--step-size", type=float, default=0.6, help="eta of phase 1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--totals", default="7,10,16", help="total NFEs to compare at (each > T + 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=None, help="markdown file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    totals = [int(n) for n in args.totals.split(",")]
    T = args.phase1_steps
    if min(totals) < T + 2:
        p.error(f"every total NFE must be at least T + 2 = {T + 2}")

    cmd = "python benchmarks/nsgfpp_two_dim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# NSGF++ on 2D: paper phase 2 against the `ot` variant at matched total NFE",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, CPU, {args.threads} thread(s), torch {torch.__version__}. "
        f"Phase 1: T = {T}, η = {args.step_size}, default Sinkhorn options; {args.train_steps} steps of every "
        f"network, batch {args.batch_size}, MLP width {args.width}, Adam 1e-3, seed {args.seed}. W2: exact "
        f"(POT `emd2`) between {args.n_eval} generated and {args.n_eval} fresh target points; Euler in both "
        "phases, the total NFE split as NSGF + predictor + straight.",
        "",
    ]
    for name in args.tasks.split(","):
        task = get_task(name)
        models, train_s = {}, {}
        for variant in VARIANTS:
            torch.manual_seed(args.seed)  # network initialisation
            start = time.perf_counter()
            models[variant] = train_nsgfpp(
                task,
                phase2=variant,
                train_steps=args.train_steps,
                generator=torch.Generator().manual_seed(args.seed),
                batch_size=args.batch_size,
                width=args.width,
                n_steps=T,
                step_size=args.step_size,
                progress=args.progress,
            )
            train_s[variant] = time.perf_counter() - start
        gen = torch.Generator().manual_seed(args.seed + 1)
        x0, ref = task.source(args.n_eval, gen), task.target(args.n_eval, gen)
        floor = w2(task.target(args.n_eval, gen), ref)
        rows: list[tuple[str, list[str]]] = []
        for variant, model in models.items():
            cells = []
            for total in totals:
                out = model.sample(x0, solver="euler", straight_steps=total - T - (variant == "paper"))
                nfe = out.nfe
                assert out.total_nfe == total, (out.nfe, total)
                cells.append(
                    f"{w2(out.samples, ref):.3f} ({nfe['nsgf']}+{nfe['predictor']}+{nfe['straight']})"
                )
            rows.append((f"NSGF++ `{variant}`", cells))
        for variant, model in models.items():
            straight = model.nets["straight"].eval()
            cells = [f"{w2(odeint_sample(straight, x0, n_steps=n).samples, ref):.3f}" for n in totals]
            rows.append((f"straight flow of `{variant}` alone, from noise", cells))
        nsgf = models["ot"].nets["nsgf"].eval()
        phase1 = w2(odeint_sample(nsgf, x0, n_steps=T).samples, ref)
        lines += [
            f"## {task.label}",
            "",
            f"Floor W2(target, target) = {floor:.3f}. NSGF phase alone (NFE {T}): {phase1:.3f}. Training: "
            + ", ".join(f"`{v}` {s:.0f} s" for v, s in train_s.items())
            + ".",
            "",
            "| sampler | " + " | ".join(f"NFE {n}" for n in totals) + " |",
            "|---|" + "---|" * len(totals),
        ]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
