"""Class-conditional 2D generation: conditional NSGF against conditional OT-CFM, W2 per class.

Task ``gaussian-8gaussians-conditional`` (``torchcfm_nsgf.toy``): N(0, I) to torchcfm's 8gaussians, the label
being the mode index. Both methods train the same label-taking MLP (``toy.make_conditional_model``: torchcfm's
MLP with a 16-dimensional label embedding in its input) with torchcfm's loop (``toy.train_flow_matching``), the
same number of steps, batch and learning rate:

* NSGF: ``SinkhornFlowMatcher()`` (its defaults: 2 Sinkhorn steps of size 1, straight targets, pool) through
  ``guided_sample_location_and_conditional_flow`` (one Sinkhorn flow per class in the batch);
* OT-CFM: torchcfm's ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)`` through its own
  ``guided_sample_location_and_conditional_flow`` (one exact OT plan over the mixed batch; each pair keeps
  its data point's label).

Evaluation: for every class, ``--n-eval`` noise points sampled with that label (Euler, NFE 1, 2 and 10) against
``--n-eval`` fresh target points of that class; exact W2 (``toy.w2``), per class and averaged over the classes.

    OMP_NUM_THREADS=1 python benchmarks/two_dim_conditional.py --out benchmarks/results/two_dim_conditional.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

from torchcfm_nsgf import SinkhornFlowMatcher
from torchcfm_nsgf.toy import get_task, make_conditional_model, train_flow_matching, w2

TASK = "gaussian-8gaussians-conditional"


def class_samples(task, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` fresh target points of class ``c`` (drawn from the task's labelled sampler and filtered)."""
    chunks, have = [], 0
    while have < n:
        x, y = task.target(8 * n, generator)
        chunks.append(x[y == c])
        have += len(chunks[-1])
    return torch.cat(chunks)[:n]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=3000, help="optimiser steps of each method")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=500, help="generated and reference points per class")
    p.add_argument("--nfe", default="1,2,10", help="Euler steps to evaluate at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="a line on the machine's load, written under the table")
    p.add_argument("--out", default=None, help="markdown file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    task = get_task(TASK)

    fields, times = {}, {}
    for name in ("NSGF", "OT-CFM"):
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)  # noqa: NPY002 - torchcfm's OT pairing draws from NumPy's global generator
        g = torch.Generator().manual_seed(args.seed)
        if name == "NSGF":
            matcher = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(args.seed + 1))
        else:
            matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        trained = train_flow_matching(
            make_conditional_model(task.num_classes, args.width),
            matcher,
            lambda bs, g=g: (task.source(bs, g), *task.target(bs, g)),
            train_steps=args.train_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            desc=name,
        )
        fields[name], times[name] = trained, trained.train_time_s

    rows = []
    for name, trained in fields.items():
        for nfe in nfes:
            g = torch.Generator().manual_seed(args.seed + 100)
            per_class = []
            for c in range(task.num_classes):
                x0 = task.source(args.n_eval, g)
                y = torch.full((args.n_eval,), c, dtype=torch.long)
                samples, used = trained.sample(x0, nfe, y=y)
                assert used == nfe
                per_class.append(w2(samples, class_samples(task, c, args.n_eval, g)))
            rows.append((name, nfe, per_class))
    g = torch.Generator().manual_seed(args.seed + 200)
    floor = [
        w2(class_samples(task, c, args.n_eval, g), class_samples(task, c, args.n_eval, g)) for c in range(8)
    ]

    cmd = "python benchmarks/two_dim_conditional.py " + " ".join(argv if argv is not None else sys.argv[1:])
    k = task.num_classes
    lines = [
        "# Class-conditional 2D: conditional NSGF vs conditional OT-CFM, W2 per class",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, CPU, {args.threads} thread(s) (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}. Task {task.label}; "
        f"{args.train_steps} steps each, batch {args.batch_size}, MLP width {args.width} with a label embedding, "
        f"Adam {args.lr:g}, seed {args.seed}. W2: exact (POT `emd2`) between {args.n_eval} points generated "
        f"with the class's label (Euler) and {args.n_eval} fresh points of that class.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "| method | NFE | " + " | ".join(f"class {c}" for c in range(k)) + " | mean |",
        "|---|---|" + "---|" * (k + 1),
    ]
    for name, nfe, per_class in rows:
        cells = " | ".join(f"{v:.3f}" for v in per_class)
        lines.append(f"| {name} | {nfe} | {cells} | **{sum(per_class) / k:.3f}** |")
    lines.append(
        "| two-sample floor | – | " + " | ".join(f"{v:.3f}" for v in floor) + f" | {sum(floor) / k:.3f} |"
    )
    lines += [
        "",
        "Training time (s, simulation / OT pairing included): "
        + ", ".join(f"{name} {t:.1f}" for name, t in times.items())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
