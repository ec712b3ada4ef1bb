"""The command line shared by ``examples/mnist.py`` and ``examples/cifar10.py``.

:func:`build_parser` gives every flag with the recipe's defaults (``--preset NAME`` swaps in the values of a
:data:`RUN_PRESETS` entry, flags given explicitly win); :func:`run` trains (or resumes), then optionally
samples a PNG grid and computes FID/IS, and returns what it did without printing; :func:`main` is the
entry point of the example scripts: it prints the report, and a user error (a bad flag, an unwritable
``--ckpt-dir``, a missing dataset or checkpoint) as one ``prog: error: ...`` line with exit status 2.
Sample grids go to the run's folder ``--ckpt-dir`` unless ``--sample-out`` names another path. A
``--conditional`` run trains every method on the labels and ``--sample`` writes a class grid: one row per
class, ``--n-samples / classes`` images per row (``--n-samples 100``: 10 x 10 for MNIST), classifier-free
guided with ``--guidance-scale`` (a run trained with ``--cfg-dropout``).

``--resume`` with ``--train-steps`` below the checkpoint's step is an error; equal to it, nothing is
trained, which is allowed only to sample or score the checkpoint (``--sample``, ``--fid``). ``--resume auto``
resumes when ``--ckpt-dir`` holds a checkpoint and starts a fresh run otherwise, and the report says which:
a job that a scheduler requeues can run the same command every time.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from .._cli import (
    DeprecatedFlag,
    add_dataclass_flags,
    add_option_flags,
    dataclass_kwargs,
    fraction,
    non_negative_float,
    options_from_args,
    positive_int,
)
from .._io import check_writable_dir
from ..drift import SELF_TERMS
from ..matcher import PATHS
from ..nsgfpp import NSGFPlusPlusOptions
from ..sinkhorn import SinkhornOptions
from .checkpoint import CheckpointError
from .data import DATASETS, load_images, to_uint8
from .fid import InceptionUnavailableError, check_inception_available, inception_metrics
from .generation import generate, save_grid
from .registry import available_methods
from .settings import NSGFSettings
from .training import ConfigError, TrainConfig, checkpoint_step, train
from .unet import UNET_PRESETS

__all__ = ["RUN_PRESETS", "UsageError", "build_parser", "config_from_args", "main", "report_lines", "run"]

logger = logging.getLogger(__name__)

# NSGF++'s fields that follow the image pool's flags (--refresh-every, --pool-capacity), shared with nsgf
_SHARED_POOL = ("refresh_every", "pool_capacity")
# flags of earlier releases -> the generated NSGF++ flags (dest) that replace them
_OLD_NSGFPP_FLAGS = {
    "--phase1-steps": "flow_steps",
    "--phase1-step-size": "step_size",
    "--phase1-batch-fraction": "phase1_batch_fraction",
    "--phase2": "phase2",
    "--endpoints": "endpoints",
}

# Values a preset gives to flags (argparse dests) that are not given explicitly. Warm-up and EMA decay are
# left out: they scale with train_steps.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    # a first try on a laptop CPU: recognisable MNIST digits in a few minutes (CIFAR-10: a smoke test only)
    "quick": dict(unet="tiny", batch_size=32, lr=1e-3, train_steps=800, sample=True, nfe=20, log_every=50),
}


class UsageError(Exception):
    """A flag (named in the message) that cannot work; :func:`main` prints it as one line."""


# errors caused by what the user asked for, not by a bug: one line, no traceback
_USER_ERRORS = (
    UsageError,
    ConfigError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    InceptionUnavailableError,
)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Applies ``--preset``: its values replace the defaults of the flags not given on the command line."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, "preset", None) is not None:
            given = self._given(args)
            for dest, value in RUN_PRESETS[ns.preset].items():
                if dest not in given:
                    setattr(ns, dest, value)
        return ns, extras

    def error(self, message: str) -> NoReturn:
        """One line, without the (long) usage: ``--help`` lists the flags."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def _given(self, args: Sequence[str] | None) -> set[str]:
        """The dests set on the command line: parsed again with every default suppressed."""
        saved = [(a, a.default) for a in self._actions]
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        try:
            ns, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action, default in saved:
                action.default = default
        return set(vars(ns))


def _preset_name(value: str) -> str:
    if value in RUN_PRESETS:
        return value
    hint = f"; the UNet is chosen with --unet {value}" if value in UNET_PRESETS else ""
    raise argparse.ArgumentTypeError(f"unknown preset {value!r} (choose from {', '.join(RUN_PRESETS)}){hint}")


def _preset_help() -> str:
    lines = [
        f"{name}: "
        + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in values.items())
        for name, values in RUN_PRESETS.items()
    ]
    return (
        "set several flags at once; flags given explicitly override it; warm-up and EMA decay scale with "
        f"--train-steps ({'; '.join(lines)}) (default: none)"
    )


def build_parser(dataset: str) -> argparse.ArgumentParser:
    """Argument parser for ``dataset`` (a key of :data:`~torchcfm_nsgf.images.data.DATASETS`); defaults are
    torchcfm's recipe and the dataset's record."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    record = DATASETS[dataset]
    nsgf = NSGFSettings()
    p = _Parser(
        description=f"Train NSGF / NSGF++ or a torchcfm flow-matching baseline on {dataset} with one loop.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--method", default="otcfm", choices=available_methods(), help="training method")
    p.add_argument("--preset", type=_preset_name, default=None, metavar="NAME", help=_preset_help())
    groups = {name: p.add_argument_group(name) for name in ("data", "recipe", "checkpoints")}
    add_dataclass_flags(
        p,
        TrainConfig,
        groups=groups,
        defaults={"train_steps": record.default_steps, "preset": record.unet_preset},
        skip=() if record.checksums else ("verify_checksums",),
    )
    g = groups["recipe"]
    g.add_argument(
        "--total-steps",
        dest="train_steps",
        type=positive_int,
        action=DeprecatedFlag,
        new_flag="--train-steps",
        default=argparse.SUPPRESS,
    )
    g.add_argument(
        "--tiny",
        dest="unet",
        action="store_const",
        const="tiny",
        default=argparse.SUPPRESS,
        help="--unet tiny",
    )
    g.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    g = p.add_argument_group("NSGF / NSGF++ Sinkhorn flow")
    add_option_flags(g, SinkhornOptions, defaults=nsgf.sinkhorn)
    g.add_argument("--flow-steps", type=int, default=nsgf.flow_steps, help="T of nsgf's simulated flow")
    g.add_argument("--step-size", type=float, default=nsgf.step_size, help="eta of nsgf's simulated flow")
    g.add_argument("--path", default=nsgf.path, choices=list(PATHS), help="targets nsgf serves")
    g = p.add_argument_group("NSGF++ (phase 1 on the Sinkhorn flow above, its pool below)")
    add_option_flags(g, NSGFPlusPlusOptions, prefix="nsgfpp_", defaults=nsgf.nsgfpp, exclude=_SHARED_POOL)
    for old, field_name in _OLD_NSGFPP_FLAGS.items():
        new = "--nsgfpp-" + field_name.replace("_", "-")
        kind = fraction if field_name == "phase1_batch_fraction" else type(getattr(nsgf.nsgfpp, field_name))
        g.add_argument(
            old,
            dest="nsgfpp_" + field_name,
            type=kind,
            action=DeprecatedFlag,
            new_flag=new,
            default=argparse.SUPPRESS,
        )
    g = p.add_argument_group("drift (the one-step generator, on the Sinkhorn flow above)")
    g.add_argument(
        "--drift-self-term",
        default=nsgf.drift_self_term,
        choices=list(SELF_TERMS),
        help="what the generated batch is repelled from: an independent generated batch, itself, or nothing",
    )
    g = p.add_argument_group("NSGF / NSGF++ trajectory pool")
    g.add_argument("--pool-capacity", type=int, default=nsgf.pool_capacity, help="items per process")
    g.add_argument("--pool-max-bytes", type=int, default=None, help="byte bound per process (default: none)")
    g.add_argument(
        "--pool-dtype",
        default=nsgf.pool_dtype,
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype of the trajectory pool",
    )
    g.add_argument(
        "--pool-storage", default=nsgf.pool_storage, choices=["memory", "disk"], help="where the pool lives"
    )
    g.add_argument(
        "--pool-path",
        default=None,
        help="folder of a disk pool, rank{r} sub-folders (default: --ckpt-dir/pool)",
    )
    g.add_argument(
        "--refresh-every",
        type=int,
        default=nsgf.refresh_every,
        help="simulate new flows into the pool every N batches",
    )
    g.add_argument(
        "--flow-size",
        type=int,
        default=nsgf.flow_size,
        help="nsgf, nsgf++ (phase 1) and coupling: particles of each simulated flow, from the latest "
        "batches (default: one batch)",
    )
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after training, write a PNG grid and print the NFE",
    )
    g.add_argument("--n-samples", type=positive_int, default=64, help="images in the grid")
    g.add_argument(
        "--nfe", type=positive_int, default=None, help="sampling step budget (default: the method's own)"
    )
    g.add_argument("--solver", default="euler", help="euler, or a torchdyn solver (midpoint, rk4, dopri5)")
    g.add_argument(
        "--sample-out",
        default=None,
        help="PNG path (default: samples_<method>_step<N>_nfe<K>.png in --ckpt-dir, or in the current folder "
        "without one)",
    )
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling noise")
    g.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance scale w of a --conditional run trained with --cfg-dropout "
        "(0: unconditional, 1: conditional; default: no guidance)",
    )
    g.add_argument("--sample-batch-size", type=positive_int, default=256, help="images per sampler call")
    g.add_argument(
        "--ema",
        dest="use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample with the EMA weights (--no-ema: the raw weights)",
    )
    g.add_argument("--fid", action="store_true", help="FID (and IS for cifar10) with torchmetrics")
    g.add_argument("--fid-samples", type=positive_int, default=50_000, help="generated images for FID")
    g.add_argument(
        "--inception-weights",
        default=None,
        help="local path of the Inception FID weights (default: torch-fidelity's cache or download)",
    )
    p.set_defaults(dataset=dataset)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` described by parsed arguments."""
    defaults = NSGFSettings().nsgfpp
    try:
        nsgfpp = options_from_args(
            args, NSGFPlusPlusOptions, prefix="nsgfpp_", defaults=defaults, exclude=_SHARED_POOL
        )
    except ValueError as err:
        raise UsageError(f"NSGF++ flags (--nsgfpp-*): {err}") from err
    nsgf = NSGFSettings(
        sinkhorn=options_from_args(args, SinkhornOptions),
        flow_steps=args.flow_steps,
        step_size=args.step_size,
        path=args.path,
        nsgfpp=nsgfpp,
        pool_capacity=args.pool_capacity,
        pool_max_bytes=args.pool_max_bytes,
        pool_dtype=args.pool_dtype,
        pool_storage=args.pool_storage,
        pool_path=args.pool_path,
        refresh_every=args.refresh_every,
        flow_size=args.flow_size,
        drift_self_term=args.drift_self_term,
    )
    return TrainConfig(
        dataset=args.dataset, method=args.method, nsgf=nsgf, **dataclass_kwargs(args, TrainConfig)
    )


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before training on what would fail after it: folders that cannot be written, a resume with
    nothing to resume or nothing to do."""
    if args.cfg_dropout > 0 and not args.conditional:
        raise UsageError("--cfg-dropout needs --conditional (label dropout of a class-conditional run)")
    if args.guidance_scale is not None and args.cfg_dropout == 0:
        raise UsageError(
            "--guidance-scale needs a --conditional run trained with --cfg-dropout (a model of the null label)"
        )
    if args.ckpt_dir is not None:
        reason = check_writable_dir(args.ckpt_dir)
        if reason is not None:
            raise UsageError(f"--ckpt-dir {args.ckpt_dir!r} is not a writable folder ({reason})")
    if args.sample and args.sample_out is not None:
        folder = os.path.dirname(os.path.abspath(args.sample_out))
        reason = check_writable_dir(folder)
        if reason is not None:
            raise UsageError(f"--sample-out {args.sample_out!r}: its folder is not writable ({reason})")
    if not args.resume:
        return
    if args.ckpt_dir is None:
        raise UsageError("--resume needs --ckpt-dir, the folder of the run to continue")
    try:
        step = checkpoint_step(args.ckpt_dir)
    except FileNotFoundError as err:
        if args.resume == "auto":
            return  # a fresh run
        raise UsageError(f"--resume: there is no checkpoint.pt in --ckpt-dir {args.ckpt_dir!r}") from err
    if args.train_steps < step:
        raise UsageError(
            f"--train-steps {args.train_steps} is below the step {step} of the checkpoint in --ckpt-dir: "
            "raise it to continue the run"
        )
    if args.train_steps == step and not (args.sample or args.fid):
        raise UsageError(
            f"--train-steps {args.train_steps}: the checkpoint in --ckpt-dir is at that step already, so "
            "there is nothing to train; raise --train-steps to continue, or add --sample / --fid to use it"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train / resume, then sample and evaluate as the flags ask.

    Returns
    -------
    dict
        ``step``, ``steps_this_run``, ``wall_time_s``, ``rank``; with ``--sample``: ``grid`` (path), ``nfe``,
        ``nfe_breakdown`` (and for a ``--conditional`` run ``grid_rows``, the classes, and ``grid_labels``,
        the class of each image in grid order); with ``--fid``: ``fid`` (and ``is_mean``, ``is_std`` for cifar10). Only rank 0
        samples.

    Raises
    ------
    UsageError
        A flag that cannot work, found before training (see :func:`_check_paths`).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _check_paths(args)
    try:
        config = config_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.fid:  # fail before training, not after hours of it
        try:
            check_inception_available(args.inception_weights)
        except FileNotFoundError as err:
            raise UsageError(f"--inception-weights: {err}") from err
    result = train(config)
    rank = int(os.environ.get("RANK", "0"))
    out: dict[str, Any] = {
        "step": result.step,
        "steps_this_run": result.steps_this_run,
        "wall_time_s": result.wall_time_s,
        "rank": rank,
        "resume": args.resume,
        "resumed_from": result.resumed_from,
    }
    if rank != 0 or not (args.sample or args.fid):
        return out
    device = next(result.method.nets.parameters()).device
    nets = result.ema if args.use_ema else result.method.nets
    shape = result.shape
    classes = result.method.num_classes
    if args.sample:
        labels, per_row = None, None
        if classes is not None:  # a class grid: one row per class
            per_row = max(1, args.n_samples // classes)
            labels = torch.arange(classes).repeat_interleave(per_row)
        gen = generate(
            result.method,
            nets,
            args.n_samples if labels is None else len(labels),
            shape,
            nfe=args.nfe,
            solver=args.solver,
            batch_size=args.sample_batch_size,
            seed=args.sample_seed,
            device=device,
            labels=labels,
            guidance_scale=args.guidance_scale,
        )
        path = args.sample_out
        if path is None:
            name = f"samples_{config.method}_step{result.step}_nfe{gen.total_nfe}.png"
            path = name if config.ckpt_dir is None else os.path.join(config.ckpt_dir, name)
        save_grid(gen.samples, path, nrow=per_row)
        out.update(grid=path, nfe=gen.total_nfe, nfe_breakdown=dict(gen.nfe))
        if labels is not None:
            out.update(grid_rows=classes, grid_labels=labels)
    if args.fid:
        real = load_images(config.dataset, config.data_root, verify_checksums=config.verify_checksums).images
        bs = args.sample_batch_size

        def fake_batches():
            for start in range(0, args.fid_samples, bs):
                n = min(bs, args.fid_samples - start)
                g = generate(
                    result.method,
                    nets,
                    n,
                    shape,
                    nfe=args.nfe,
                    solver=args.solver,
                    batch_size=n,
                    seed=args.sample_seed + 1 + start,
                    device=device,
                    labels=None if classes is None else torch.arange(start, start + n) % classes,
                    guidance_scale=args.guidance_scale,
                )
                out["fid_nfe"] = g.total_nfe
                yield to_uint8(g.samples)

        real_batches = (real[i : i + bs] for i in range(0, len(real), bs))
        out.update(
            inception_metrics(
                real_batches,
                fake_batches(),
                weights_path=args.inception_weights,
                inception_score=DATASETS[config.dataset].inception_score,
                device=device,
            )
        )
    return out


def report_lines(method: str, out: dict[str, Any]) -> list[str]:
    """The lines an example prints for the result of :func:`run` (the library itself never prints)."""
    lines = []
    if out.get("resume") == "auto":  # say which
        if out.get("resumed_from") is None:
            lines.append("--resume auto: no checkpoint in --ckpt-dir, started a fresh run")
        else:
            lines.append(f"--resume auto: resumed the checkpoint at step {out['resumed_from']}")
    if out.get("steps_this_run", 1) == 0:
        lines.append(f"the checkpoint of {method} is at step {out['step']} = --train-steps: nothing trained")
    else:
        lines.append(f"trained {method} to step {out['step']} ({out['wall_time_s']:.1f} s this run)")
    if "grid" in out:
        parts = ", ".join(f"{k} {v}" for k, v in out["nfe_breakdown"].items())
        lines += [f"wrote {out['grid']}", f"NFE: {out['nfe']} ({parts})"]
    if "fid" in out:
        line = f"FID: {out['fid']:.3f} (NFE {out['fid_nfe']})"
        if "is_mean" in out:
            line += f", IS: {out['is_mean']:.3f} ± {out['is_std']:.3f}"
        lines.append(line)
    return lines


def main(dataset: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``examples/{dataset}.py``: parse ``argv``, :func:`run`, print the report.

    A user error exits with status 2 and one ``prog: error: ...`` line naming the flag; other exceptions
    (bugs) keep their traceback.
    """
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out = run(args)
    except _USER_ERRORS as err:
        message = " ".join(str(err).split())  # one line
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    if out["rank"] == 0:
        print("\n".join(report_lines(args.method, out)))
    return out
