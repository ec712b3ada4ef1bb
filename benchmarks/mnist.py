"""MNIST on CPU: NSGF, NSGF++ variants, OT-CFM and I-CFM at equal training time and at equal steps.

Every method is trained by the shared loop (``torchcfm_nsgf.images.training.train``) with the same UNet,
batch, optimiser and data. Each run is scored twice: at ``--equal-steps`` optimiser steps, and at the end of
its time budget (``--budget-s``, pool warm-up and Sinkhorn simulation included; ``--budget-clock cpu``
counts this process's CPU time, so that runs sharing a machine one thread each get equal budgets). The run
continues from its own checkpoint between the two scores (resuming is exact), so both come from one run.

Samples are scored by **classifier FID**: the Fréchet distance between Gaussians fitted to the
penultimate-layer features (128-d) of a small CNN classifier trained here on MNIST (cached in
``--classifier``), generated images against the first ``--n-eval`` MNIST test images. It is *not* FID (no
Inception network) and its values are not comparable with published FIDs. The floor is the same distance
for ``--n-eval`` training images.

A method is a name with optional :class:`~torchcfm_nsgf.images.NSGFSettings` fields and ``blur`` (the
relative Sinkhorn blur; NSGF++'s options as ``nsgfpp.FIELD``), e.g. ``nsgf++:nsgfpp.phase2=paper:nsgfpp.flow_steps=3`` or
``nsgf:blur=0.1``. ``--conditional`` trains class-conditional models and scores label accuracy and the
classifier FID per class; with ``--cfg-dropout`` and ``--guidance-scale 1,2`` every guidance scale is scored
from the same run, and ``--nfe`` counts network calls (two per guided step). One JSON file per method goes to
``--out-dir`` (run methods in separate processes to use both cores), with sample grids; ``--report``
merges a folder's JSON files into a markdown table.

    python benchmarks/mnist.py --methods otcfm --budget-s 1200 --budget-clock cpu --threads 1 \
        --equal-steps 3000 --out-dir benchmarks/results/mnist
    python benchmarks/mnist.py --report benchmarks/results/mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import platform
import shutil
import sys
import time

import torch
from torch import nn

from torchcfm_nsgf._io import atomic_save
from torchcfm_nsgf.images import (
    NSGFSettings,
    TrainConfig,
    available_methods,
    feature_frechet_distance,
    generate,
    load_images,
    train,
)
from torchcfm_nsgf.images.data import to_unit_range
from torchcfm_nsgf.images.generation import save_grid
from torchcfm_nsgf.images.training import checkpoint_step

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
    """Load the cached classifier, or train it on the MNIST training set (inputs in [-1, 1]).

    Training is seeded (initial weights and batch order) and runs on one thread whatever ``--threads``
    says, so a fresh clone on the same machine and torch rebuilds the same classifier, and the classifier
    FIDs of BENCHMARKS.md do not depend on an ignored cache file. The global RNG is left as it was."""
    if os.path.isfile(path):
        net = Classifier()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        return net.eval(), float(state["test_accuracy"])
    train_set, test_set = load_images("mnist", root), load_images("mnist", root, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Classifier()
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(train_set), generator=gen).split(128):
                x, y = to_unit_range(train_set.images[idx]), train_set.labels[idx]
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(to_unit_range(b)).argmax(1) for b in test_set.images.split(1000)])
    acc = float((pred == test_set.labels).float().mean())
    atomic_save({"net": net.state_dict(), "test_accuracy": acc}, path)  # never half a classifier
    return net, acc


class ClassScores:
    """Scores of class-conditional samples: the classifier's accuracy against the requested labels, and the
    classifier FID of each class's ``k`` images against ``k`` test images of that class, averaged."""

    def __init__(self, classifier: Classifier, test, train_imgs, k: int) -> None:
        self.classifier, self.k = classifier, k
        self.real = [self._first(test, c) for c in range(10)]
        self.floor = sum(self._fid(self._first(train_imgs, c), c) for c in range(10)) / 10

    def _first(self, data, c: int) -> torch.Tensor:
        return to_unit_range(data.images[torch.nonzero(data.labels == c).flatten()[: self.k]])

    def _fid(self, fake: torch.Tensor, c: int) -> float:
        return feature_frechet_distance(self.classifier.features, [self.real[c]], [fake], num_features=128)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        pred = torch.cat([self.classifier(b).argmax(1) for b in samples.split(500)])
        fids = [self._fid(samples[labels == c], c) for c in range(10)]
        return {
            "accuracy": float((pred == labels).float().mean()),
            "per_class_fid": sum(fids) / 10,
            "class_fids": fids,
        }


NAMES = {
    "nsgf++": "NSGF++",
    "otcfm": "OT-CFM",
    "icfm": "I-CFM",
    "nsgf": "NSGF",
    "fm": "FM",
    "rf": "RF",
    "coupling": "large coupling",
}
# NSGFSettings fields whose default is None, and the type of their values
OPTIONAL_FIELDS = {"flow_size": int, "pool_max_bytes": int, "pool_path": str}


# the spec keys of NSGF++'s options before they became one object (NSGFSettings.nsgfpp)
OLD_NSGFPP_KEYS = {
    "phase1_steps": "nsgfpp.flow_steps",
    "phase1_step_size": "nsgfpp.step_size",
    "phase2": "nsgfpp.phase2",
    "phase1_batch_fraction": "nsgfpp.phase1_batch_fraction",
    "endpoints": "nsgfpp.endpoints",
}


def parse_method(spec: str, base: NSGFSettings) -> tuple[str, NSGFSettings, str]:
    """``name[:field=value...]`` -> (method name, settings, label)."""
    name, *pairs = spec.split(":")
    if name not in available_methods():
        raise SystemExit(f"method {name!r} is not available here (available: {available_methods()})")
    changes = {}
    nsgfpp = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "blur":  # the Sinkhorn blur, relative to the data's RMS radius
            changes["sinkhorn"] = dataclasses.replace(base.sinkhorn, blur=float(value))
            continue
        key = OLD_NSGFPP_KEYS.get(key, key)
        if key.startswith("nsgfpp."):  # a field of NSGF++'s options
            field_name = key.removeprefix("nsgfpp.")
            current = getattr(base.nsgfpp, field_name)
            nsgfpp[field_name] = value if isinstance(current, str) else type(current)(value)
            continue
        if key not in {f.name for f in dataclasses.fields(NSGFSettings)} or key in ("sinkhorn", "nsgfpp"):
            raise SystemExit(f"{spec!r}: {key!r} is not an NSGFSettings field (or blur, or nsgfpp.FIELD)")
        current = getattr(base, key)
        kind = OPTIONAL_FIELDS.get(key, str) if current is None else type(current)
        changes[key] = kind(value)
    if nsgfpp:
        changes["nsgfpp"] = base.nsgfpp.replace(**nsgfpp)
    settings = dataclasses.replace(base, **changes)
    label = NAMES.get(name, name)
    if name == "nsgf++":
        s = settings.nsgfpp
        label += f" `{s.phase2}` (T={s.flow_steps}, η={s.step_size:g})"
        if s.phase1_batch_fraction != 1:
            label += f", NSGF field on {s.phase1_batch_fraction:g} of each batch"
        if s.phase2 != "paper":
            label += f", {s.endpoints} X_T"
    elif name == "nsgf":
        label += f" (T={settings.flow_steps}, η={settings.step_size:g}, {settings.path})"
    if name in ("nsgf", "nsgf++", "coupling"):
        label += f", blur {settings.sinkhorn.blur:g}"
        if settings.flow_size is not None:
            label += f", flows of {settings.flow_size}"
    return name, settings, label


def slug(spec: str) -> str:
    return spec.replace("+", "p").replace(":", "_").replace("=", "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--methods", default="nsgf++,nsgf,otcfm,icfm", help="comma-separated method specs")
    p.add_argument("--budget-s", type=float, default=1200.0, help="training time per method")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--equal-steps", type=int, default=None, help="also score every method at this step")
    p.add_argument("--nfe", default="5,10,20,60")
    p.add_argument("--equal-steps-nfe", default="10,20", help="the NFEs scored at --equal-steps")
    p.add_argument(
        "--equal-steps-only",
        action="store_true",
        help="stop at --equal-steps (no equal-time score; --budget-s is then only a cap)",
    )
    p.add_argument("--n-eval", type=int, default=2000, help="generated and test images per score")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.99, help="short runs: a short EMA window")
    p.add_argument("--pool-capacity", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="training and sampling"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=os.path.join(HERE, "results", "mnist_classifier.pt"))
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "mnist"))
    p.add_argument(
        "--run-dir",
        default=os.path.join(HERE, "..", "runs", "mnist_benchmark"),
        help="checkpoints (deleted after each method unless --keep-checkpoints)",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each method's last checkpoint under --run-dir (benchmarks/endpoint_spread.py reads it)",
    )
    p.add_argument(
        "--score-kept",
        action="store_true",
        help="train nothing: score (at --nfe) the checkpoint each method's earlier run left in --run-dir "
        "with --keep-checkpoints",
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional runs: generate n-eval/10 images per class, score label accuracy and the "
        "classifier FID per class",
    )
    p.add_argument("--cfg-dropout", type=float, default=0.0, help="label dropout (conditional runs)")
    p.add_argument(
        "--guidance-scale",
        default=None,
        help="CFG scales at sampling, comma-separated (runs with --cfg-dropout); every scale is scored at "
        "every --nfe, which counts network calls: a guided step (scale other than 1) costs two, so it gets "
        "half the steps",
    )
    p.add_argument("--report", default=None, metavar="DIR", help="merge DIR's JSON files into a table")
    args = p.parse_args(argv)
    if args.equal_steps_only and not args.equal_steps:
        p.error("--equal-steps-only needs --equal-steps")
    if args.report:
        return report(args.report)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    base = NSGFSettings(pool_capacity=args.pool_capacity)
    methods = [parse_method(spec, base) + (spec,) for spec in args.methods.split(",")]
    nfes = [int(n) for n in args.nfe.split(",")]
    scales = guidance_scales(args.guidance_scale)
    if scales != [None] and not (args.conditional and args.cfg_dropout > 0):
        p.error("--guidance-scale needs --conditional and --cfg-dropout > 0")
    if any(w != 1.0 for w in scales if w is not None) and any(n % 2 for n in nfes):
        p.error("--nfe counts network calls, two per guided step: give even values with --guidance-scale")

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
    per_class = None
    if args.conditional:
        if args.n_eval % 10:
            raise SystemExit("--conditional needs --n-eval divisible by the 10 classes")
        k = args.n_eval // 10
        per_class = ClassScores(classifier, test, train_imgs, k)
        floor = {"all": floor, "per_class": per_class.floor}
        print(f"floor per class (train vs test, {k} images each): mean classifier FID {per_class.floor:.3f}")
    os.makedirs(args.out_dir, exist_ok=True)

    for name, settings, label, spec in methods:
        row = run_method(args, name, settings, label, spec, train_imgs, score, nfes, scales, per_class)
        out = {
            "args": vars(args),
            "command": "python benchmarks/mnist.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": (
                torch.cuda.get_device_name(args.device)
                if args.device.startswith("cuda")
                else f"{platform.machine()} {platform.processor()}".strip()
            ),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "classifier_accuracy": acc,
            "floor": floor,
            "row": row,
        }
        with open(os.path.join(args.out_dir, slug(spec) + ".json"), "w") as f:
            json.dump(out, f, indent=1)


def guidance_scales(given: object) -> list[float | None]:
    """``--guidance-scale`` as a list (``[None]``: no guidance); older result files hold one float."""
    return [None] if given is None else [float(w) for w in str(given).split(",")]


def run_method(args, name, settings, label, spec, train_imgs, score, nfes, scales, per_class=None) -> dict:
    """Train one method (to ``--equal-steps``, scored, then on to the budget, scored) and return its row."""
    run_dir = os.path.join(args.run_dir, slug(spec))
    if not args.score_kept:
        shutil.rmtree(run_dir, ignore_errors=True)

    def config(train_steps: int, budget: float, resume: bool) -> TrainConfig:
        return TrainConfig(
            dataset="mnist",
            data_root=args.data_root,
            method=name,
            train_steps=train_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            ema_decay=args.ema_decay,
            preset=args.preset,
            seed=args.seed,
            ckpt_dir=run_dir,
            ckpt_every=10**9,
            resume=resume,
            time_budget_s=budget,
            budget_clock=args.budget_clock,
            progress=False,
            log_every=500,
            conditional=args.conditional,
            cfg_dropout=args.cfg_dropout,
            nsgf=settings,
            device=args.device,
        )

    def evaluate(result, tag: str, nfes: list[int] = nfes) -> dict:
        """Scores keyed by NFE (``"10"``), or by NFE and guidance scale (``"10@w2"``) for guided runs."""
        scores = {}
        for w, nfe in [(w, n) for w in scales for n in nfes]:
            t1 = time.perf_counter()
            labels = torch.arange(args.n_eval) % 10 if args.conditional else None
            steps = nfe // 2 if w not in (None, 1.0) else nfe  # --nfe counts network calls
            key = str(nfe) if w is None else f"{nfe}@w{w:g}"
            stem = f"{slug(spec)}_{tag}_nfe{nfe}" + ("" if w is None else f"_w{w:g}")
            try:
                gen = generate(
                    result.method,
                    result.ema,
                    args.n_eval,
                    result.shape,
                    nfe=steps,
                    batch_size=500,
                    seed=args.seed + 1,
                    labels=labels,
                    guidance_scale=w,
                    device=args.device,
                )
            except ValueError as err:  # a budget below the method's minimum (NSGF++ phase 1)
                print(f"{label} {tag}: NFE {nfe} skipped: {err}")
                continue
            fid = score(gen.samples)
            scores[key] = {
                "classifier_fid": fid,
                "nfe": gen.total_nfe,
                "breakdown": gen.nfe,
                "guidance_scale": w,
            }
            grid = os.path.join(args.out_dir, stem + ".png")
            if per_class is not None:
                scores[key].update(per_class(gen.samples, labels))
                # one row per class: the first 10 images of each class
                order = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)])
                save_grid(gen.samples[order], grid, nrow=10)
                print(
                    f"{label} {tag}: NFE {gen.total_nfe} guidance {w} label accuracy "
                    f"{scores[key]['accuracy']:.4f}, per-class classifier FID {scores[key]['per_class_fid']:.3f}"
                )
            else:
                save_grid(gen.samples[:64], grid, nrow=8)
            scores[key]["sample_s"] = time.perf_counter() - t1
            print(f"{label} {tag}: NFE {gen.total_nfe} {gen.nfe} classifier FID {fid:.3f}")
        return scores

    row = {"spec": spec, "method": name, "label": label, "settings": dataclasses.asdict(settings)}
    if args.score_kept:  # a checkpoint's own step as the target: nothing is trained, the EMA is scored
        result = train(config(checkpoint_step(run_dir), None, True), data=train_imgs)
        row["equal_time"] = {
            "step": result.step,
            "train_wall_s": None,
            "train_cpu_s": None,
            "scores": evaluate(result, "budget"),
            "scored_from": run_dir,
        }
        return row
    used = {"wall": 0.0, "cpu": 0.0}
    first_total = args.equal_steps if args.equal_steps else 10**9
    result = train(config(first_total, args.budget_s, False), data=train_imgs)
    used["wall"] += result.wall_time_s
    used["cpu"] += result.cpu_time_s
    if args.equal_steps:
        row["equal_steps"] = {
            "step": result.step,
            "reached": result.step == args.equal_steps,
            "scores": evaluate(
                result,
                f"step{result.step}",
                nfes if result.step < args.equal_steps else [int(n) for n in args.equal_steps_nfe.split(",")],
            ),
        }
        if args.equal_steps_only:
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir, ignore_errors=True)
            return row
        left = args.budget_s - used[args.budget_clock]
        if result.step == args.equal_steps and left > 0:
            result = train(config(10**9, left, True), data=train_imgs)
            used["wall"] += result.wall_time_s
            used["cpu"] += result.cpu_time_s
    reused = args.equal_steps and not row["equal_steps"]["reached"]  # the budget ended first: same weights
    row["equal_time"] = {
        "step": result.step,
        "train_wall_s": used["wall"],
        "train_cpu_s": used["cpu"],
        "scores": row["equal_steps"]["scores"] if reused else evaluate(result, "budget"),
    }
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def report(folder: str) -> None:
    """Print the markdown tables of every JSON file in ``folder`` (and write ``folder/README.md``)."""
    runs = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not runs:
        raise SystemExit(f"no JSON results in {folder}")

    def scorer(r: dict) -> tuple:  # which classifier scored a run (older files hold rounded values)
        floor = r["floor"] if isinstance(r["floor"], dict) else {"all": r["floor"]}
        return round(r["classifier_accuracy"], 4), tuple(sorted((k, round(v, 2)) for k, v in floor.items()))

    scorers = {scorer(r) for r in runs}
    if len(scorers) > 1:
        raise SystemExit(
            f"the JSON results in {folder} were scored by {len(scorers)} different classifiers (their "
            "accuracies and floors differ); their FIDs are not comparable, so put them in separate folders"
        )
    nfes = [int(n) for n in runs[0]["args"]["nfe"].split(",")]
    a = runs[0]["args"]
    conditional = a.get("conditional", False)
    floor = runs[0]["floor"]
    if conditional:
        runs[0]["floor"] = floor["all"]
    lines = [
        f"MNIST, classifier FID (128-d penultimate features of a CNN with test accuracy "
        f"{runs[0]['classifier_accuracy']:.4f}; not FID) between {a['n_eval']} generated and {a['n_eval']} "
        f"test images; lower is better. Floor (train vs test images): {runs[0]['floor']:.2f}. UNet preset "
        f"`{a['preset']}`, batch {a['batch_size']}, Adam {a['lr']:g}, warm-up {a['warmup']}, EMA "
        f"{a['ema_decay']}, seed {a['seed']}; EMA weights, Euler sampling; {runs[0]['threads']} thread(s) per "
        f"run on {runs[0]['machine']}, torch {runs[0]['torch']}. A cell reads FID (NFE breakdown).",
    ]
    if conditional:
        k = a["n_eval"] // 10
        lines[0] = lines[0].replace("A cell reads FID (NFE breakdown).", "")
        lines.append(
            f"Class-conditional runs (label dropout {a['cfg_dropout']:g}, guidance scale "
            f"{a['guidance_scale'] if a['guidance_scale'] is not None else 'none'}): {k} images per class. A "
            "cell reads **label accuracy** (the classifier's prediction equals the requested label) / **classifier "
            f"FID per class** ({k} generated against {k} test images of the class, averaged over the 10 classes; "
            f"floor, {k} training against {k} test images per class: {floor['per_class']:.2f}) (NFE breakdown)."
        )

    def cell(scores: dict, n: int, w: float | None) -> str:
        s = scores.get(str(n) if w is None else f"{n}@w{w:g}")
        if s is None:
            return "—"
        parts = list(s["breakdown"].values())
        detail = "" if len(parts) == 1 else " (" + "+".join(str(v) for v in parts) + ")"
        if conditional:
            return f"{100 * s['accuracy']:.1f}% / {s['per_class_fid']:.1f}{detail}"
        return f"{s['classifier_fid']:.2f}{detail}"

    for key, title in (("equal_time", "Equal training time"), ("equal_steps", "Equal optimiser steps")):
        rows = [r for r in runs if key in r["row"]]
        if not rows:
            continue
        budget = (
            f"{a['budget_s']:.0f} s of {a['budget_clock']} time per method" if key == "equal_time" else ""
        )
        lines += [
            "",
            f"{title}{': ' + budget if budget else ''}",
            "",
            "| method | steps | train time (wall / cpu) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
            "|---|---|---|" + "---|" * len(nfes),
        ]
        for r in rows:
            part = r["row"][key]
            times = (
                (
                    "scored from a kept checkpoint"
                    if part["train_wall_s"] is None
                    else f"{part['train_wall_s']:.0f} / {part['train_cpu_s']:.0f} s"
                )
                if key == "equal_time"
                else ("" if part["reached"] else "not reached in budget")
            )
            for w in guidance_scales(r["args"].get("guidance_scale")):
                name = r["row"]["label"] + ("" if w is None else f", guidance {w:g}")
                lines.append(
                    f"| {name} | {part['step']} | {times} | "
                    + " | ".join(cell(part["scores"], n, w) for n in nfes)
                    + " |"
                )
    commands = dict.fromkeys(r["command"] for r in runs)  # one command may have run several methods
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
