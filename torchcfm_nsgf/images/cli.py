"""The command line shared by ``examples/mnist.py`` and ``examples/cifar10.py``.

:func:`build_parser` gives every flag with the recipe's defaults; :func:`run` trains (or resumes), then
optionally samples a PNG grid and computes FID/IS. It returns what it did and never prints: the example
scripts print.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .._cli import add_option_flags, options_from_args
from ..matcher import PATHS
from ..sinkhorn import SinkhornOptions
from .data import load_images, to_uint8
from .fid import check_inception_available, inception_metrics
from .generation import generate, save_grid
from .methods import UNET_PRESETS, NSGFSettings, available_methods
from .training import TrainConfig, train

__all__ = ["build_parser", "config_from_args", "run"]

logger = logging.getLogger(__name__)

_DEFAULT_STEPS = {"cifar10": 400_000, "mnist": 20_000}


def build_parser(dataset: str) -> argparse.ArgumentParser:
    """Argument parser for ``dataset`` (``"mnist"`` or ``"cifar10"``); defaults are torchcfm's recipe."""
    if dataset not in _DEFAULT_STEPS:
        raise ValueError(f"dataset must be 'mnist' or 'cifar10', got {dataset!r}")
    nsgf = NSGFSettings()
    p = argparse.ArgumentParser(
        description=f"Train NSGF / NSGF++ or a torchcfm flow-matching baseline on {dataset} with one loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", default="otcfm", choices=available_methods(), help="training method")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default="./data", help="torchvision root folder of the dataset")
    g.add_argument("--download", action="store_true", help="let torchvision download missing files")
    if dataset == "cifar10":
        g.add_argument(
            "--no-verify-checksums",
            dest="verify_checksums",
            action="store_false",
            help="skip torchvision's md5 check of the CIFAR-10 batches",
        )
    g.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for cifar10, off for mnist)",
    )
    g = p.add_argument_group("recipe")
    g.add_argument("--total-steps", type=int, default=_DEFAULT_STEPS[dataset])
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--sigma", type=float, default=0.0, help="sigma of the icfm/otcfm/fm paths")
    g.add_argument("--preset", default=dataset, choices=sorted(UNET_PRESETS), help="UNet configuration")
    g.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help="same as --preset tiny")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    g.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--ckpt-dir", default=None)
    g.add_argument("--ckpt-every", type=int, default=5000)
    g.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/checkpoint.pt")
    g.add_argument("--stop-after", type=int, default=None, help="stop after N steps without checkpointing")
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("NSGF / NSGF++ Sinkhorn flow")
    add_option_flags(g, SinkhornOptions)
    g.add_argument("--flow-steps", type=int, default=nsgf.flow_steps, help="T of nsgf's simulated flow")
    g.add_argument("--step-size", type=float, default=nsgf.step_size, help="eta of nsgf's simulated flow")
    g.add_argument("--path", default=nsgf.path, choices=list(PATHS), help="targets nsgf serves")
    g.add_argument("--phase1-steps", type=int, default=nsgf.phase1_steps, help="T of nsgf++'s NSGF phase")
    g.add_argument("--phase1-step-size", type=float, default=nsgf.phase1_step_size)
    g.add_argument("--pool-capacity", type=int, default=nsgf.pool_capacity, help="items per process")
    g.add_argument("--pool-max-bytes", type=int, default=None, help="byte bound per process")
    g.add_argument("--pool-dtype", default=nsgf.pool_dtype, choices=["float16", "bfloat16", "float32"])
    g.add_argument("--pool-storage", default=nsgf.pool_storage, choices=["memory", "disk"])
    g.add_argument("--pool-path", default=None, help="folder of a disk pool (rank{r} sub-folders)")
    g.add_argument("--refresh-every", type=int, default=nsgf.refresh_every)
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--sample", action="store_true", help="write a PNG grid and print the NFE")
    g.add_argument("--n-samples", type=int, default=64)
    g.add_argument("--nfe", type=int, default=None, help="sampling step budget (method default if unset)")
    g.add_argument("--solver", default="euler", help="euler, or a torchdyn solver (midpoint, rk4, dopri5)")
    g.add_argument("--sample-out", default=None, help="PNG path (default: samples_<method>.png)")
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--sample-batch-size", type=int, default=256)
    g.add_argument("--no-ema", dest="use_ema", action="store_false", help="sample with the raw weights")
    g.add_argument("--fid", action="store_true", help="FID (and IS for cifar10) with torchmetrics")
    g.add_argument("--fid-samples", type=int, default=50_000)
    g.add_argument("--inception-weights", default=None, help="local path of the Inception FID weights")
    p.set_defaults(dataset=dataset)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` described by parsed arguments."""
    nsgf = NSGFSettings(
        sinkhorn=options_from_args(args, SinkhornOptions),
        flow_steps=args.flow_steps,
        step_size=args.step_size,
        path=args.path,
        phase1_steps=args.phase1_steps,
        phase1_step_size=args.phase1_step_size,
        pool_capacity=args.pool_capacity,
        pool_max_bytes=args.pool_max_bytes,
        pool_dtype=args.pool_dtype,
        pool_storage=args.pool_storage,
        pool_path=args.pool_path,
        refresh_every=args.refresh_every,
    )
    return TrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        method=args.method,
        total_steps=args.total_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        hflip=args.hflip,
        preset=args.preset,
        sigma=args.sigma,
        seed=args.seed,
        ckpt_dir=args.ckpt_dir,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        stop_after=args.stop_after,
        time_budget_s=args.time_budget,
        device=args.device,
        progress=args.progress,
        log_every=args.log_every,
        download=args.download,
        verify_checksums=getattr(args, "verify_checksums", True),
        nsgf=nsgf,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train / resume, then sample and evaluate as the flags ask.

    Returns
    -------
    dict
        ``step``, ``wall_time_s``, ``rank``; with ``--sample``: ``grid`` (path), ``nfe``, ``nfe_breakdown``;
        with ``--fid``: ``fid`` (and ``is_mean``, ``is_std`` for cifar10). Only rank 0 samples.
    """
    config = config_from_args(args)
    if args.fid:  # fail before training, not after hours of it
        check_inception_available(args.inception_weights)
    result = train(config)
    rank = int(os.environ.get("RANK", "0"))
    out: dict[str, Any] = {"step": result.step, "wall_time_s": result.wall_time_s, "rank": rank}
    if rank != 0 or not (args.sample or args.fid):
        return out
    device = next(result.method.nets.parameters()).device
    nets = result.ema if args.use_ema else result.method.nets
    shape = result.shape
    if args.sample:
        gen = generate(
            result.method,
            nets,
            args.n_samples,
            shape,
            nfe=args.nfe,
            solver=args.solver,
            batch_size=args.sample_batch_size,
            seed=args.sample_seed,
            device=device,
        )
        path = args.sample_out or f"samples_{config.method}.png"
        save_grid(gen.samples, path)
        out.update(grid=path, nfe=gen.total_nfe, nfe_breakdown=dict(gen.nfe))
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
                )
                out["fid_nfe"] = g.total_nfe
                yield to_uint8(g.samples)

        real_batches = (real[i : i + bs] for i in range(0, len(real), bs))
        out.update(
            inception_metrics(
                real_batches,
                fake_batches(),
                weights_path=args.inception_weights,
                inception_score=config.dataset == "cifar10",
                device=device,
            )
        )
    return out


def report_lines(method: str, out: dict[str, Any]) -> list[str]:
    """The lines an example prints for the result of :func:`run` (the library itself never prints)."""
    lines = [f"trained {method} to step {out['step']} ({out['wall_time_s']:.1f} s this run)"]
    if "grid" in out:
        parts = ", ".join(f"{k} {v}" for k, v in out["nfe_breakdown"].items())
        lines += [f"wrote {out['grid']}", f"NFE: {out['nfe']} ({parts})"]
    if "fid" in out:
        line = f"FID: {out['fid']:.3f} (NFE {out['fid_nfe']})"
        if "is_mean" in out:
            line += f", IS: {out['is_mean']:.3f} ± {out['is_std']:.3f}"
        lines.append(line)
    return lines
