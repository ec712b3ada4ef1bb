r"""One-step generators on the 2D tasks: the Sinkhorn drift (:class:`~torchcfm_nsgf.SinkhornDrift`) and MeanFlow
(:class:`~torchcfm_nsgf.MeanFlow`), as method functions of the 2D benchmark.

``train_drift(task, config, seed)`` and ``train_meanflow(task, config, seed)`` have the shape of the methods of
``benchmarks/two_dim.py`` (``fn(task, config, seed) -> Sampler``): ``config`` is the benchmark's ``BenchConfig``
(read: ``train_steps``, ``time_budget_s``, ``batch_size``, ``lr``, ``width``, and when it has them ``clock``,
``ema`` or ``ema_decay``, ``drift``, ``meanflow``), the returned object answers ``sample(x0, nfe, solver) ->
(samples, nfe_used)`` and carries ``train_time_s``. Conventions:

* the time budget is seconds of the training loop on ``config.clock`` (``"cpu"``: ``time.process_time``, the
  default when the config has no clock; ``"wall"``: ``time.perf_counter``);
* the samples come from EMA weights (decay ``config.ema``, or ``ema_decay``, default 0.999; None: the last
  weights), with the warm-up ``min(decay, (1 + k) / (10 + k))`` at step ``k`` so that short runs are not held
  at the initial weights;
* the generator ``G(x0)`` is torchcfm's ``MLP(2, w=width)`` without a time input, so it answers every ``nfe``
  (and the adaptive solvers' ``nfe=None``) with one evaluation and reports ``nfe_used = 1``; MeanFlow's
  network is the same MLP with the two times as inputs (:class:`~torchcfm_nsgf.AverageVelocityMLP`), sampled
  by ``nfe`` uniform jumps (one for ``nfe=None``).

Quick check and the settings study (one line per run; ``--set`` overrides a field of the method's settings):

    OMP_NUM_THREADS=1 python benchmarks/one_step.py --method drift --tasks 8gaussians-moons --steps 300
    OMP_NUM_THREADS=1 python benchmarks/one_step.py --method drift --budget 30 --set self_term=independent
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from harness.loop import EMA
from torch import Tensor, nn
from torchcfm.models import MLP

from torchcfm_nsgf import AverageVelocityMLP, MeanFlow, SinkhornDrift, SinkhornOptions, meanflow_sample
from torchcfm_nsgf.datasets import Task, get_task
from torchcfm_nsgf.metrics import w2

__all__ = [
    "DriftSettings",
    "MeanFlowSettings",
    "MeanFlowSampler",
    "OneStepGenerator",
    "train_drift",
    "train_meanflow",
]

DEFAULT_EMA = 0.999


@dataclass(frozen=True)
class DriftSettings:
    """The Sinkhorn drift's settings in the 2D benchmark (``config.drift`` as a dict overrides them).

    ``data_batch``: data samples per step (None: ``config.batch_size``); ``lr``: Adam's learning rate (None:
    ``config.lr``); ``ema_decay``: None takes ``config.ema_decay`` when the config has one, else 0.999. The
    Sinkhorn fields are :class:`~torchcfm_nsgf.SinkhornOptions`'.
    """

    step_size: float = 1.0
    self_term: str = "same"
    blur: float = 0.1
    relative_blur: bool = True
    scaling: float = 0.5
    tol: float = 0.1
    data_batch: int | None = None
    lr: float | None = None
    ema_decay: float | None = None

    def sinkhorn(self) -> SinkhornOptions:
        return SinkhornOptions(
            blur=self.blur, relative_blur=self.relative_blur, scaling=self.scaling, tol=self.tol
        )


@dataclass(frozen=True)
class MeanFlowSettings:
    """MeanFlow's settings in the 2D benchmark (``config.meanflow`` as a dict overrides them); the objective's
    fields are :class:`~torchcfm_nsgf.MeanFlow`'s, ``lr`` and ``ema_decay`` as in :class:`DriftSettings`.

    The defaults are the best of the settings tried on the 2D tasks at 30 CPU seconds: the paper's CIFAR-10
    time sampler and share (logit-normal (-2, 2) in its clock, i.e. ``logit_mean=+2`` here; 75 % of pairs with
    s != t) with the plain squared error (``weight_power=0``). NFE-1 W2 on 8gaussians -> moons and
    N(0, I) -> checkerboard: 0.574 and 0.489, against 0.611 and 0.603 with the CIFAR-10 weight p = 0.75 and
    0.762 and 0.847 with :class:`~torchcfm_nsgf.MeanFlow`'s defaults (ImageNet's: 25 %, (-0.4, 1), p = 1).
    """

    logit_mean: float = 2.0
    logit_std: float = 2.0
    unequal_share: float = 0.75
    weight_power: float = 0.0
    weight_eps: float = 1e-3
    lr: float | None = None
    ema_decay: float | None = None

    def objective(self) -> MeanFlow:
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lr", "ema_decay")}
        return MeanFlow(**kw)


# ---------------------------------------------------------------------------------------------- samplers
@dataclass
class OneStepGenerator:
    """A trained generator ``G(x0)`` behind the benchmark's ``Sampler`` protocol (EMA weights)."""

    generator: nn.Module
    train_time_s: float
    n_opt_steps: int
    losses: list[float] = field(default_factory=list)

    def sample(self, x0: Tensor, nfe: int | None, solver: str = "euler") -> tuple[Tensor, int]:
        """``G(x0)`` for every ``nfe`` and ``solver``: one network evaluation, ``nfe_used = 1``."""
        with torch.no_grad():
            return self.generator(x0), 1


@dataclass
class MeanFlowSampler:
    """A trained average-velocity network behind the ``Sampler`` protocol: ``nfe`` uniform jumps
    (:func:`~torchcfm_nsgf.meanflow_sample`), one when ``nfe`` is None; ``solver`` is not used."""

    model: nn.Module
    train_time_s: float
    n_opt_steps: int
    losses: list[float] = field(default_factory=list)

    def sample(self, x0: Tensor, nfe: int | None, solver: str = "euler") -> tuple[Tensor, int]:
        out = meanflow_sample(self.model, x0, 1 if nfe is None else nfe)
        return out.samples, out.total_nfe


# ---------------------------------------------------------------------------------------------- training
def _averaged(model: nn.Module, decay: float) -> EMA | None:
    """The harness's EMA of ``model`` (:class:`harness.loop.EMA`, the warm-up every method of the harness
    gets), or None for the last weights (``decay`` 0)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
    return EMA(model, decay) if decay > 0 else None


def _evaluated(model: nn.Module, ema: EMA | None) -> nn.Module:
    """The weights a run is scored with: the EMA's, or a frozen copy of the last ones."""
    return ema.module if ema is not None else copy.deepcopy(model).eval().requires_grad_(False)


def _clock(config: Any) -> Callable[[], float]:
    """The budget's clock: ``config.clock`` ("cpu": ``time.process_time``, "wall": ``time.perf_counter``) when the
    config has one, else CPU time."""
    clock = getattr(config, "clock", "cpu")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"config.clock must be 'cpu' or 'wall', got {clock!r}")
    return time.process_time if clock == "cpu" else time.perf_counter


def _steps(config: Any) -> Iterator[int]:
    """Step indices until ``config.train_steps`` steps or ``config.time_budget_s`` seconds of its clock have run."""
    steps, budget, clock = config.train_steps, config.time_budget_s, _clock(config)
    if (steps is None) == (budget is None):
        raise ValueError("config must set exactly one of train_steps and time_budget_s")
    start, k = clock(), 0
    while (k < steps) if steps is not None else (clock() - start < budget):
        yield k
        k += 1


def _config_ema(config: Any) -> float:
    """The config's EMA decay: ``config.ema`` (the harness's; None: the last weights) or ``config.ema_decay``
    when the config has either, else :data:`DEFAULT_EMA`."""
    if hasattr(config, "ema"):
        return 0.0 if config.ema is None else float(config.ema)
    if getattr(config, "ema_decay", None) is not None:
        return float(config.ema_decay)
    return DEFAULT_EMA


def _settings(cls: type, config: Any, key: str, settings: Any) -> Any:
    if settings is None:
        settings = cls(**dict(getattr(config, key, None) or {}))
    if settings.ema_decay is None:
        settings = replace(settings, ema_decay=_config_ema(config))
    if settings.lr is None:
        settings = replace(settings, lr=float(config.lr))
    return settings


def train_drift(
    task: Task, config: Any, seed: int, settings: DriftSettings | None = None
) -> OneStepGenerator:
    """A one-step generator ``G(x0)`` trained with :class:`~torchcfm_nsgf.SinkhornDrift` (Adam, ``settings.lr``).

    Each step: ``x = G(x0)`` for a source batch of ``config.batch_size``, a data batch of ``data_batch``
    (and, with ``self_term="independent"``, a second generated batch ``G(x0')`` without grad), then
    ``drift.loss(x, x1).backward()``. ``train_time_s`` is the CPU time of the loop (generation, solves, EMA).
    """
    settings = _settings(DriftSettings, config, "drift", settings)
    torch.manual_seed(seed)  # the MLP's initialisation
    gen = torch.Generator().manual_seed(seed)
    model = MLP(dim=2, w=config.width, time_varying=False)
    ema = _averaged(model, settings.ema_decay)
    drift = SinkhornDrift(settings.step_size, sinkhorn=settings.sinkhorn(), self_term=settings.self_term)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n, m = config.batch_size, settings.data_batch or config.batch_size
    losses: list[float] = []
    clock = _clock(config)
    start = clock()
    for _ in _steps(config):
        x = model(task.source(n, gen))
        x1 = task.target(m, gen)
        kw = {}
        if settings.self_term == "independent":
            with torch.no_grad():
                kw["x_self"] = model(task.source(n, gen))
        loss = drift.loss(x, x1, **kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
    return OneStepGenerator(_evaluated(model, ema), clock() - start, len(losses), losses)


def train_meanflow(
    task: Task, config: Any, seed: int, settings: MeanFlowSettings | None = None
) -> MeanFlowSampler:
    """MeanFlow's average-velocity MLP (:class:`~torchcfm_nsgf.AverageVelocityMLP`, width ``config.width``)
    trained on independent (source, target) pairs with :meth:`~torchcfm_nsgf.MeanFlow.loss` (Adam,
    ``settings.lr``); ``train_time_s`` is the CPU time of the loop."""
    settings = _settings(MeanFlowSettings, config, "meanflow", settings)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AverageVelocityMLP(2, config.width)
    ema = _averaged(model, settings.ema_decay)
    objective = settings.objective()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = config.batch_size
    losses: list[float] = []
    clock = _clock(config)
    start = clock()
    for _ in _steps(config):
        loss = objective.loss(model, task.source(n, gen), task.target(n, gen), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
    return MeanFlowSampler(_evaluated(model, ema), clock() - start, len(losses), losses)


METHODS = {"drift": (train_drift, DriftSettings), "meanflow": (train_meanflow, MeanFlowSettings)}


# ---------------------------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class _Config:
    """The fields of ``two_dim.BenchConfig`` that these methods read."""

    train_steps: int | None = 1000
    time_budget_s: float | None = None
    batch_size: int = 256
    lr: float = 1e-3
    width: int = 256


def _parse_set(items: list[str], cls: type) -> dict:
    types = {f.name: f.type for f in fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set {key}: not a field of {cls.__name__} ({sorted(types)})")
        if value == "None":
            out[key] = None
        elif value in ("True", "False"):
            out[key] = value == "True"
        else:
            try:
                out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="drift")
    parser.add_argument("--tasks", nargs="+", default=["8gaussians-moons", "gaussian-checkerboard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default 1000 without --budget)"
    )
    parser.add_argument("--budget", type=float, default=None, help="CPU seconds of training instead of steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--set", nargs="*", default=[], help="settings fields, key=value")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1], help="NFEs to score (MeanFlow)")
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None or args.budget is not None else 1000
    config = _Config(
        train_steps=steps, time_budget_s=args.budget, batch_size=args.batch_size, lr=args.lr, width=args.width
    )
    train, cls = METHODS[args.method]
    settings = _settings(cls, config, "", cls(**_parse_set(args.set, cls)))
    for task_name in args.tasks:
        task = get_task(task_name)
        for seed in args.seeds:
            sampler = train(task, config, seed, settings)
            eval_gen = torch.Generator().manual_seed(10_000 + seed)  # two_dim.py's evaluation draws
            x0 = task.source(args.n_eval, eval_gen)
            y = task.target(args.n_eval, eval_gen)
            scores = {str(nfe): w2(sampler.sample(x0, nfe)[0], y) for nfe in args.nfe}
            record = {
                "task": task_name,
                "method": args.method,
                "seed": seed,
                "settings": asdict(settings),
                "config": asdict(config),
                "w2": scores,
                "train_time_s": sampler.train_time_s,
                "n_opt_steps": sampler.n_opt_steps,
                "argv": [os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)],
            }
            w = " ".join(f"NFE {k}: {v:.3f}" for k, v in scores.items())
            print(
                f"{task_name} seed {seed} {args.method}: W2 {w} ({sampler.n_opt_steps} steps, "
                f"{sampler.train_time_s:.1f} CPU s)",
                flush=True,
            )
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
