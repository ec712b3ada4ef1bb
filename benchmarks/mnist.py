"""MNIST on CPU: NSGF++ against OT-CFM and I-CFM at an equal training wall-time budget.

Every method is trained by the shared loop (``torchcfm_nsgf.images.training.train``) with the same UNet,
batch, optimiser and data, for the same wall-clock budget (``--budget-s`` per method; NSGF++'s budget
includes its Sinkhorn-flow simulation and pool). Samples are scored by **classifier FID**: the Fréchet
distance between Gaussians fitted to the penultimate-layer features (128-d) of a small CNN classifier trained
here on MNIST (cached in ``--classifier``), generated images against the MNIST test set. It is *not* FID
(no Inception network) and its values are not comparable with published FIDs.

Writes a markdown table (``--out``), a JSON file next to it, and one sample grid per method.

    python benchmarks/mnist.py --data-root ../shared/data --budget-s 600
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch
from torch import nn

from torchcfm_nsgf.images import (
    TrainConfig,
    available_methods,
    feature_frechet_distance,
    generate,
    load_images,
)
from torchcfm_nsgf.images.data import to_unit_range
from torchcfm_nsgf.images.generation import save_grid

HERE = os.path.dirname(os.path.abspath(__file__))


class Classifier(nn.Module):
    """Two conv blocks and two linear layers; :meth:`features` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def get_classifier(path: str, root: str, epochs: int = 2) -> tuple[Classifier, float]:
    """Load the cached classifier, or train it on the MNIST training set (inputs in [-1, 1])."""
    net = Classifier()
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        return net.eval(), float(state["test_accuracy"])
    train_set, test_set = load_images("mnist", root), load_images("mnist", root, train=False)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_set), generator=gen).split(128):
            x, y = to_unit_range(train_set.images[idx]), train_set.labels[idx]
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(to_unit_range(b)).argmax(1) for b in test_set.images.split(1000)])
    acc = float((pred == test_set.labels).float().mean())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"net": net.state_dict(), "test_accuracy": acc}, path)
    return net, acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--methods", default="nsgf++,otcfm,icfm")
    p.add_argument("--budget-s", type=float, default=600.0, help="training wall time per method")
    p.add_argument("--nfe", default="10,20,60")
    p.add_argument("--n-eval", type=int, default=2000, help="generated and test images per score")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.99, help="short runs: a short EMA window")
    p.add_argument("--nsgf-steps", type=int, default=20, help="T of plain NSGF")
    p.add_argument("--nsgf-step-size", type=float, default=0.15, help="eta of plain NSGF")
    p.add_argument("--phase1-steps", type=int, default=5)
    p.add_argument("--phase1-step-size", type=float, default=0.2)
    p.add_argument("--blur", type=float, default=2.0)
    p.add_argument("--scaling", type=float, default=0.8)
    p.add_argument("--pool-capacity", type=int, default=50_000)
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=os.path.join(HERE, "results", "mnist_classifier.pt"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "mnist.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from torchcfm_nsgf.images.methods import NSGFSettings
    from torchcfm_nsgf.images.training import train

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise SystemExit(f"methods {unknown} are not available here (available: {available_methods()})")
    nfes = [int(n) for n in args.nfe.split(",")]

    t0 = time.perf_counter()
    classifier, acc = get_classifier(args.classifier, args.data_root)
    print(f"classifier test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    test = load_images("mnist", args.data_root, train=False)
    real = to_unit_range(test.images[: args.n_eval])
    train_imgs = load_images("mnist", args.data_root)

    def score(fake: torch.Tensor) -> float:
        return feature_frechet_distance(
            classifier.features, real.split(500), fake.split(500), num_features=128
        )

    floor = score(to_unit_range(train_imgs.images[: args.n_eval]))
    print(f"floor (train vs test images): classifier FID {floor:.3f}")

    rows = []
    for method in methods:
        config = TrainConfig(
            dataset="mnist",
            data_root=args.data_root,
            method=method,
            total_steps=10**9,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            ema_decay=args.ema_decay,
            preset=args.preset,
            seed=args.seed,
            time_budget_s=args.budget_s,
            progress=False,
            log_every=100,
            nsgf=NSGFSettings(
                blur=args.blur,
                scaling=args.scaling,
                n_steps=args.nsgf_steps,
                step_size=args.nsgf_step_size,
                phase1_steps=args.phase1_steps,
                phase1_step_size=args.phase1_step_size,
                pool_capacity=args.pool_capacity,
                refresh_every=args.refresh_every,
            ),
        )
        result = train(config, data=train_imgs)
        row = {"method": method, "steps": result.step, "train_s": result.wall_time_s, "scores": {}}
        for nfe in nfes:
            t1 = time.perf_counter()
            gen = generate(
                result.method,
                result.ema,
                args.n_eval,
                result.shape,
                nfe=nfe,
                batch_size=500,
                seed=args.seed + 1,
            )
            fid = score(gen.samples)
            row["scores"][nfe] = {
                "classifier_fid": fid,
                "nfe": gen.total_nfe,
                "breakdown": gen.nfe,
                "sample_s": time.perf_counter() - t1,
            }
            print(f"{method}: NFE {gen.total_nfe} {gen.nfe} classifier FID {fid:.3f}")
            if nfe == max(nfes):
                save_grid(
                    gen.samples[:64], os.path.join(os.path.dirname(args.out), f"mnist_{method}_nfe{nfe}.png")
                )
        rows.append(row)

    name = {"nsgf++": "NSGF++", "otcfm": "OT-CFM", "icfm": "I-CFM", "nsgf": "NSGF", "fm": "FM", "rf": "RF"}
    lines = [
        f"MNIST, classifier FID (penultimate 128-d features of a CNN with test accuracy {acc:.4f}; not FID) "
        f"between {args.n_eval} generated and {args.n_eval} test images; lower is better. Floor (train vs "
        f"test images): {floor:.2f}.",
        "",
        f"Equal training wall time: {args.budget_s:.0f} s per method on {platform.processor() or 'CPU'} "
        f"({torch.get_num_threads()} threads), UNet preset `{args.preset}`, batch {args.batch_size}, Adam "
        f"{args.lr:g}, warm-up {args.warmup}, EMA {args.ema_decay}; EMA weights, Euler sampling.",
        "",
        "| method | steps in budget | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    for row in rows:
        cells = []
        for n in nfes:
            s = row["scores"][n]
            detail = (
                ""
                if len(s["breakdown"]) == 1
                else " (" + "+".join(str(v) for v in s["breakdown"].values()) + ")"
            )
            cells.append(f"{s['classifier_fid']:.2f}{detail}")
        lines.append(
            f"| {name.get(row['method'], row['method'])} | {row['steps']} | " + " | ".join(cells) + " |"
        )
    command = "python benchmarks/mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `{command}`"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "classifier_accuracy": acc, "floor": floor, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
