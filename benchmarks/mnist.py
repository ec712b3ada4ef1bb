"""MNIST on CPU: NSGF, NSGF++ variants, OT-CFM and I-CFM at equal training time and at equal steps.

Every method is trained by the shared loop (``torchcfm_nsgf.images.training.train``) with the same UNet,
batch, optimiser and data. Each run is scored twice: at ``--equal-steps`` optimiser steps, and at the end of
its time budget (``--budget-s``, pool warm-up and Sinkhorn simulation included; ``--budget-clock cpu``
counts this process's CPU time, so that runs sharing a machine one thread each get equal budgets). The run
continues from its own checkpoint between the two scores (resuming is exact), so both come from one run.

Samples are scored in the 128-d penultimate-layer features of a small CNN classifier trained here, seeded, on
MNIST (cached in ``--classifier``; ``benchmarks/harness/images.py``): **classifier FID**, the Fréchet distance
between Gaussians fitted to the features of the generated images and of the first ``--n-eval`` MNIST test
images, and **precision and recall** (k-nearest-neighbour manifolds in the same features, k = 3, Kynkäänniemi
et al. 2019). ``--n-eval`` is 10 000 (every test image; ``--fast``: 2000 for development). Classifier FID is
*not* FID (no Inception network) and its values are not comparable with published FIDs. The floor is the same
scores for ``--n-eval`` training images against the test images.

``--curve-minutes 15,30,60,120`` trains one run per method (and ``--seed``) and scores its EMA weights each
time its training time (``--budget-clock``) reaches the next of those minutes (default NFEs 1, 2, 10, 20):
curves, not points. With ``--resume auto`` an interrupted study continues where it stopped (each run's JSON
and checkpoint are written at every scored time) and a finished run is skipped, or extended when the command
asks for later minutes and the run kept its checkpoint (``--keep-checkpoints``; NFEs asked that the last scored
time lacks are scored there first, from that checkpoint: earlier times keep their NFEs); ``--report`` then adds the
tables of FID · precision / recall against training time and a plot per NFE (``curves_nfe<N>.png``).

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
    python benchmarks/mnist.py --methods nsgf++,nsgf,otcfm,icfm --curve-minutes 15,30,60,120 --resume auto \
        --seeds 0,1 --threads 1 --out-dir benchmarks/results/mnist_curves   # twice, side by side: they share the runs
    python benchmarks/mnist.py --report benchmarks/results/mnist_curves
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
import statistics
import time
from pathlib import Path

import torch
from _report import command_line, table_head
from harness.images import (
    Classifier,
    FeatureScorer,
    frechet_distance,
    get_classifier,
    parse_method,
    plot_curves,
    short_label,
    slug,
)
from harness.runner import claim, release, write_json

from torchcfm_nsgf.images import (
    NSGFSettings,
    TrainConfig,
    generate,
    load_images,
    train,
)
from torchcfm_nsgf.images.data import to_unit_range
from torchcfm_nsgf.images.generation import save_grid
from torchcfm_nsgf.images.training import checkpoint_step

HERE = os.path.dirname(os.path.abspath(__file__))


class ClassScores:
    """Scores of class-conditional samples: the classifier's accuracy against the requested labels, and the
    classifier FID of each class's ``k`` images against ``k`` test images of that class, averaged."""

    def __init__(self, classifier: Classifier, test, train_imgs, k: int) -> None:
        self.classifier, self.k = classifier, k
        self.real = [self._features(self._first(test, c)) for c in range(10)]
        self.floor = sum(self._fid(self._first(train_imgs, c), c) for c in range(10)) / 10

    def _first(self, data, c: int) -> torch.Tensor:
        return to_unit_range(data.images[torch.nonzero(data.labels == c).flatten()[: self.k]])

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(b) for b in images.split(500)])

    def _fid(self, fake: torch.Tensor, c: int) -> float:
        return frechet_distance(self.real[c], self._features(fake))

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        pred = torch.cat([self.classifier(b).argmax(1) for b in samples.split(500)])
        fids = [self._fid(samples[labels == c], c) for c in range(10)]
        return {
            "accuracy": float((pred == labels).float().mean()),
            "per_class_fid": sum(fids) / 10,
            "class_fids": fids,
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--methods", default="nsgf++,nsgf,otcfm,icfm", help="comma-separated method specs")
    p.add_argument("--budget-s", type=float, default=1200.0, help="training time per method")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--equal-steps", type=int, default=None, help="also score every method at this step")
    p.add_argument(
        "--nfe", default=None, help="NFEs scored (default 5,10,20,60; with --curve-minutes 1,2,10,20)"
    )
    p.add_argument("--equal-steps-nfe", default="10,20", help="the NFEs scored at --equal-steps")
    p.add_argument(
        "--equal-steps-only",
        action="store_true",
        help="stop at --equal-steps (no equal-time score; --budget-s is then only a cap)",
    )
    p.add_argument(
        "--curve-minutes",
        default=None,
        help="one run per method, scored at these minutes of training time on --budget-clock (e.g. 15,30,60,120; "
        "replaces --budget-s and --equal-steps)",
    )
    p.add_argument(
        "--resume",
        choices=("auto", "no"),
        default="no",
        help="with --curve-minutes: auto continues each run from its checkpoint and its JSON (a finished run "
        "is skipped); no starts every run afresh",
    )
    p.add_argument(
        "--n-eval",
        type=int,
        default=10_000,
        help="generated and test images per score (10000: all test images; --fast: 2000)",
    )
    p.add_argument("--fast", action="store_true", help="score 2000 images (development)")
    p.add_argument(
        "--sample-batch",
        type=int,
        default=128,
        help="images generated per sampler call when scoring (the noise is the same for any value; on one CPU "
        "thread 128 runs the tiny UNet 1.7x faster per image than 500)",
    )
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
    p.add_argument(
        "--seeds",
        default=None,
        help="with --curve-minutes: these seeds (comma-separated), one run per method and seed; the same "
        "command in several processes shares the runs",
    )
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
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.equal_steps_only and not args.equal_steps:
        p.error("--equal-steps-only needs --equal-steps")
    if args.report:
        return report(args.report)
    if args.fast:
        args.n_eval = 2000
    if args.sample_batch < 1:
        p.error(f"--sample-batch must be a positive number of images, got {args.sample_batch}")
    if args.nfe is None:
        args.nfe = "1,2,10,20" if args.curve_minutes else "5,10,20,60"
    minutes = None
    if args.curve_minutes:
        minutes = [float(m) for m in args.curve_minutes.split(",")]
        if minutes != sorted(minutes) or minutes[0] <= 0:
            p.error("--curve-minutes must be increasing positive minutes, e.g. 15,30,60,120")
        if args.equal_steps or args.score_kept:
            p.error("--curve-minutes replaces --equal-steps and --score-kept")
    elif args.resume != "no" or args.seeds:
        p.error("--resume auto and --seeds go with --curve-minutes")
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
    train_imgs = load_images("mnist", args.data_root)
    if args.n_eval > min(len(test), len(train_imgs)):
        p.error(f"--n-eval {args.n_eval} exceeds the {len(test)} test images (or the training images)")
    score = FeatureScorer(classifier.features, to_unit_range(test.images[: args.n_eval]))
    floor_scores = score(to_unit_range(train_imgs.images[: args.n_eval]))
    floor = floor_scores["classifier_fid"]
    print(
        f"floor ({args.n_eval} train vs {args.n_eval} test images): classifier FID {floor:.3f}, precision "
        f"{floor_scores['precision']:.3f}, recall {floor_scores['recall']:.3f}"
    )
    per_class = None
    if args.conditional:
        if args.n_eval % 10:
            raise SystemExit("--conditional needs --n-eval divisible by the 10 classes")
        k = args.n_eval // 10
        per_class = ClassScores(classifier, test, train_imgs, k)
        floor = {"all": floor, "per_class": per_class.floor}
        print(f"floor per class (train vs test, {k} images each): mean classifier FID {per_class.floor:.3f}")
    os.makedirs(args.out_dir, exist_ok=True)
    header = {
        "args": vars(args),
        "command": command_line("mnist.py", argv),
        "machine": (
            torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else f"{platform.machine()} {platform.processor()}".strip()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "classifier_accuracy": acc,
        "floor": floor,
        "floor_scores": floor_scores,
    }
    scorer = Scoring(args, score, nfes, scales, per_class)
    if minutes is not None:
        for seed in [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]:
            args.seed = seed
            for name, settings, label, spec in methods:
                run = {**header, "args": dict(vars(args))}
                run_curve(args, name, settings, label, spec, train_imgs, scorer, minutes, run)
        return
    for name, settings, label, spec in methods:
        row = run_method(args, name, settings, label, spec, train_imgs, scorer)
        write_json(Path(args.out_dir) / (slug(spec) + ".json"), {**header, "row": row})


def guidance_scales(given: object) -> list[float | None]:
    """``--guidance-scale`` as a list (``[None]``: no guidance); older result files hold one float."""
    return [None] if given is None else [float(w) for w in str(given).split(",")]


def train_config(args, name: str, settings: NSGFSettings, run_dir: str, train_steps: int, budget, resume):
    """The image loop's settings of one benchmark run (checkpoints only at the end of each call)."""
    return TrainConfig(
        dataset="mnist",
        method=name,
        train_steps=train_steps,
        ckpt_dir=run_dir,
        ckpt_every=10**9,
        resume=resume,
        time_budget_s=budget,
        progress=False,
        log_every=500,
        nsgf=settings,
        **{k: getattr(args, k) for k in SHARED_FLAGS},
    )


#: The command-line flags that are :class:`TrainConfig` fields of the same name.
SHARED_FLAGS = (
    "data_root",
    "batch_size",
    "lr",
    "warmup",
    "ema_decay",
    "preset",
    "seed",
    "budget_clock",
    "conditional",
    "cfg_dropout",
    "device",
)


class Scoring:
    """Scores of a trained run's EMA weights at every NFE (and guidance scale): classifier FID, precision and
    recall of ``--n-eval`` generated images against as many test images, with a grid of samples."""

    def __init__(self, args, score: FeatureScorer, nfes: list[int], scales: list, per_class=None) -> None:
        self.args, self.score, self.nfes, self.scales, self.per_class = args, score, nfes, scales, per_class
        self.skipped: dict[str, str] = {}  # the last call's keys the method cannot sample, with the reason

    @staticmethod
    def key(nfe: int, w: float | None) -> str:
        return str(nfe) if w is None else f"{nfe}@w{w:g}"

    def missing(self, point: dict) -> list[int]:
        """The asked NFEs that a scored curve point holds no score for (nor a recorded reason to skip)."""
        have = set(point["scores"] or {}) | set(point.get("skipped", {}))
        return [n for n in self.nfes if any(self.key(n, w) not in have for w in self.scales)]

    def __call__(self, result, spec: str, label: str, tag: str, nfes: list[int] | None = None) -> dict:
        """Scores keyed by NFE (``"10"``), or by NFE and guidance scale (``"10@w2"``) for guided runs."""
        args, scores = self.args, {}
        self.skipped = {}
        for w, nfe in [(w, n) for w in self.scales for n in nfes or self.nfes]:
            t1 = time.perf_counter()
            labels = torch.arange(args.n_eval) % 10 if args.conditional else None
            steps = nfe // 2 if w not in (None, 1.0) else nfe  # --nfe counts network calls
            key = self.key(nfe, w)
            stem = f"{slug(spec)}_{tag}_nfe{nfe}" + ("" if w is None else f"_w{w:g}")
            try:
                gen = generate(
                    result.method,
                    result.ema,
                    args.n_eval,
                    result.shape,
                    nfe=steps,
                    batch_size=args.sample_batch,
                    seed=args.seed + 1,
                    labels=labels,
                    guidance_scale=w,
                    device=args.device,
                )
            except ValueError as err:  # a budget below the method's minimum (NSGF++ phase 1)
                print(f"{label} {tag}: NFE {nfe} skipped: {err}")
                self.skipped[key] = str(err)
                continue
            scores[key] = {
                **self.score(gen.samples.cpu()),
                "nfe": gen.total_nfe,
                "breakdown": gen.nfe,
                "guidance_scale": w,
            }
            grid = os.path.join(args.out_dir, stem + ".png")
            if self.per_class is not None:
                scores[key].update(self.per_class(gen.samples, labels))
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
            s = scores[key]
            print(
                f"{label} {tag}: NFE {gen.total_nfe} {gen.nfe} classifier FID {s['classifier_fid']:.3f}, "
                f"precision {s['precision']:.3f}, recall {s['recall']:.3f}"
            )
        return scores


def run_method(args, name, settings, label, spec, train_imgs, scorer: Scoring) -> dict:
    """Train one method (to ``--equal-steps``, scored, then on to the budget, scored) and return its row."""
    run_dir = os.path.join(args.run_dir, slug(spec))
    if not args.score_kept:
        shutil.rmtree(run_dir, ignore_errors=True)

    def config(train_steps: int, budget: float | None, resume: bool) -> TrainConfig:
        return train_config(args, name, settings, run_dir, train_steps, budget, resume)

    row = {"spec": spec, "method": name, "label": label, "settings": dataclasses.asdict(settings)}
    if args.score_kept:  # a checkpoint's own step as the target: nothing is trained, the EMA is scored
        result = train(config(checkpoint_step(run_dir), None, True), data=train_imgs)
        row["equal_time"] = {
            "step": result.step,
            "train_wall_s": None,
            "train_cpu_s": None,
            "scores": scorer(result, spec, label, "budget"),
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
            "scores": scorer(
                result,
                spec,
                label,
                f"step{result.step}",
                None if result.step < args.equal_steps else [int(n) for n in args.equal_steps_nfe.split(",")],
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
        "scores": row["equal_steps"]["scores"] if reused else scorer(result, spec, label, "budget"),
    }
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def curve_file(out_dir: str, spec: str, seed: int) -> Path:
    return Path(out_dir) / f"{slug(spec)}_seed{seed}_curve.json"


def run_curve(args, name, settings, label, spec, train_imgs, scorer: Scoring, minutes, header) -> None:
    """One run of ``spec``, scored whenever its training time reaches the next of ``minutes``.

    The run's JSON is written after every training segment (before scoring, ``scores`` None) and after every
    score, and the image loop checkpoints the end of every segment, so ``--resume auto`` continues an
    interrupted run exactly: it scores a segment left unscored, then trains the next from the checkpoint. A
    finished run is skipped; a run another process holds (a ``.claim`` file) is left to it."""
    path = curve_file(args.out_dir, spec, args.seed)
    run_dir = os.path.join(args.run_dir, f"{slug(spec)}_seed{args.seed}")
    held = path.with_suffix(".claim")
    if not claim(held):
        print(f"{label}: another process is running it ({held})")
        return
    try:
        row = None
        if args.resume == "auto" and path.exists():
            row = json.loads(path.read_text())["row"]
            scored = max((p["minutes"] for p in row["curve"] if p["scores"] is not None), default=0.0)
            last = row["curve"][-1] if row["curve"] else None
            lacking = scorer.missing(last) if last is not None and last["scores"] is not None else []
            if row["done"] and max(minutes) <= scored and not lacking:
                print(f"{label}: finished already ({path})")
                return
            if row["done"] and not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
                print(
                    f"{label}: finished at {scored:g} min and its checkpoint was not kept: not extended and no "
                    f"NFE added ({path})"
                )
                return
            if row["curve"] and not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
                print(f"{label}: no checkpoint in {run_dir} to continue from: starting afresh")
                row = None
        if row is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            row = {"spec": spec, "method": name, "label": label, "settings": dataclasses.asdict(settings)}
            row.update(curve=[], done=False, clock=args.budget_clock)

        def save() -> None:
            write_json(path, {**header, "row": row})

        def config(train_steps: int, budget: float | None, resume: bool) -> TrainConfig:
            return train_config(args, name, settings, run_dir, train_steps, budget, resume)

        curve = row["curve"]
        if curve and curve[-1]["scores"] is None:  # trained, not scored: score the checkpoint
            result = train(config(checkpoint_step(run_dir), None, True), data=train_imgs)
            curve[-1]["scores"] = scorer(result, spec, label, f"seed{args.seed}_{curve[-1]['minutes']:g}min")
            curve[-1]["skipped"] = scorer.skipped
            save()
        elif curve and (lacking := scorer.missing(curve[-1])):
            # NFEs asked now that the last point lacks: scored from its checkpoint if that is the point's (the
            # weights of earlier points are gone)
            point = curve[-1]
            if checkpoint_step(run_dir) != point["step"]:
                print(
                    f"{label}: the checkpoint is past the {point['minutes']:g}-min point: NFE {lacking} not added"
                )
            else:
                result = train(config(point["step"], None, True), data=train_imgs)
                tag = f"seed{args.seed}_{point['minutes']:g}min"
                point["scores"].update(scorer(result, spec, label, tag, lacking))
                point["skipped"] = {**point.get("skipped", {}), **scorer.skipped}
                save()
        for m in minutes:
            spent = {"cpu": curve[-1]["train_cpu_s"], "wall": curve[-1]["train_wall_s"]} if curve else None
            if spent is not None and spent[args.budget_clock] >= 60 * m:
                continue
            left = 60 * m - (spent[args.budget_clock] if spent else 0.0)
            result = train(config(10**9, left, bool(curve)), data=train_imgs)
            curve.append(
                {
                    "minutes": m,
                    "step": result.step,
                    "train_cpu_s": (spent["cpu"] if spent else 0.0) + result.cpu_time_s,
                    "train_wall_s": (spent["wall"] if spent else 0.0) + result.wall_time_s,
                    "scores": None,
                }
            )
            save()
            curve[-1]["scores"] = scorer(result, spec, label, f"seed{args.seed}_{m:g}min")
            curve[-1]["skipped"] = scorer.skipped
            save()
        row["done"] = True
        save()
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        release(held)


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
    nfes = sorted({int(n) for r in runs for n in r["args"]["nfe"].split(",")})  # runs may score other NFEs
    a = runs[0]["args"]
    conditional = a.get("conditional", False)
    floor = runs[0]["floor"]
    floor_pr = runs[0].get("floor_scores")
    seeds = sorted({r["args"]["seed"] for r in runs})
    if conditional:
        runs[0]["floor"] = floor["all"]
    lines = [
        f"MNIST, classifier FID (128-d penultimate features of a CNN with test accuracy "
        f"{runs[0]['classifier_accuracy']:.4f}; not FID) between {a['n_eval']} generated and {a['n_eval']} "
        f"test images; lower is better. Floor (train vs test images): {runs[0]['floor']:.2f}. UNet preset "
        f"`{a['preset']}`, batch {a['batch_size']}, Adam {a['lr']:g}, warm-up {a['warmup']}, EMA "
        f"{a['ema_decay']}, seed {', '.join(map(str, seeds))}; EMA weights, Euler sampling; {runs[0]['threads']} "
        f"thread(s) per run on {runs[0]['machine']}, torch {runs[0]['torch']}. A cell reads FID (NFE breakdown)"
        + (
            ", then precision / recall (k-NN manifolds, k = 3, in the same features; floor "
            f"{floor_pr['precision']:.3f} / {floor_pr['recall']:.3f})."
            if floor_pr
            else "."
        ),
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
        pr = f" · {s['precision']:.2f} / {s['recall']:.2f}" if "precision" in s else ""
        return f"{s['classifier_fid']:.2f}{detail}{pr}"

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
            *table_head(["method", "steps", "train time (wall / cpu)", *(f"NFE {n}" for n in nfes)]),
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
    curves = [r for r in runs if "curve" in r["row"]]
    if curves:
        lines += curve_tables(curves, nfes, folder, runs[0]["floor"])
    commands = dict.fromkeys(r["command"] for r in runs)  # one command may have run several methods
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)
    print(text)


def curve_tables(runs: list[dict], nfes: list[int], folder: str, floor: float) -> list[str]:
    """Per NFE: classifier FID (mean over seeds) at each scored training time, precision / recall beside it;
    ``folder/curves_nfe<N>.png`` (FID against training minutes, one line per method, each seed a dot) and
    ``folder/curves.png`` (every NFE, one panel each)."""
    clock = runs[0]["row"].get("clock", "cpu")
    minutes = sorted({p["minutes"] for r in runs for p in r["row"]["curve"] if p["scores"] is not None})
    labels = list(dict.fromkeys(r["row"]["label"] for r in runs))
    legend = {r["row"]["label"]: short_label(r["row"]["spec"]) for r in runs}
    lines = [
        "",
        f"Quality against training time ({clock} minutes; one run per method and seed, scored as its training "
        "reached each time; mean over the seeds present, their number in brackets; FID · precision / recall):",
    ]
    panels: dict[str, dict[str, dict[float, list[float]]]] = {}
    for n in nfes:
        points: dict[str, dict[float, list[float]]] = {}
        rows = []
        for label in labels:
            cells = []
            for m in minutes:
                got = [
                    p["scores"][str(n)]
                    for r in runs
                    if r["row"]["label"] == label
                    for p in r["row"]["curve"]
                    if p["minutes"] == m and p["scores"] is not None and str(n) in p["scores"]
                ]
                if not got:
                    cells.append("—")
                    continue
                fid = statistics.fmean(g["classifier_fid"] for g in got)
                pr = [statistics.fmean(g[k] for g in got) for k in ("precision", "recall")]
                cells.append(f"{fid:.2f} · {pr[0]:.2f} / {pr[1]:.2f} ({len(got)})")
                points.setdefault(legend[label], {})[m] = [g["classifier_fid"] for g in got]
            if any(c != "—" for c in cells):
                rows.append(f"| {label} | " + " | ".join(cells) + " |")
        if not rows:
            continue
        lines += [
            "",
            f"NFE {n}:",
            "",
            *table_head(["method", *(f"{m:g} min" for m in minutes)]),
            *rows,
        ]
        png = f"curves_nfe{n}.png"
        plot_curves({f"NFE {n}": points}, os.path.join(folder, png), floor)
        panels[f"NFE {n}"] = points
        lines += ["", f"![classifier FID against training time, NFE {n}]({png})"]
    if len(panels) > 1:
        plot_curves(panels, os.path.join(folder, "curves.png"), floor)
        lines += ["", "![classifier FID against training time, every NFE](curves.png)"]
    return lines


if __name__ == "__main__":
    main()
