"""Why the two moons tasks stay above 2x the two-sample floor: the blur, the network, or its optimisation.

BENCHMARKS.md §3d leaves N(0, I) → moons and 8gaussians → moons at about 3x the floor at NFE 2 even with
flows of 16 384 particles, whose end points lie within the floor of their targets. This script trains the
same loop as `flow_size.py` (torchcfm's MLP, Adam 1e-3, batch 256, 10 000 steps, flows of `--flow-size`
particles at the default cadence) with one thing changed per row:

* `base`: `SinkhornFlowMatcher(flow_size=N)`, width 256 (the study's `nsgf:N`);
* `blur B`: the flows' relative blur B instead of 0.1 (sharper or smoother targets: the entropic blur);
* `width W`: a wider MLP (the network's capacity to follow the map where a source mode splits);
* `EMA`: the base run's weights averaged (decay 0.999) and sampled instead of the last ones (optimisation
  noise; one run gives both rows);
* `flow end points`: no network, the flows' own end points (what the targets are).

Each row gives W2 at Euler NFE 1, 2 and 10 (2000 samples against 2000 fresh targets, as in the study), the
share of the NFE-2 samples that lie off the target's support (farther from 20 000 target draws than 99 % of
fresh target draws are: 1 % for a perfect sampler), the mass a field that cannot split a source mode puts in
the gap. One seed, one torch thread.

    python benchmarks/mode_split.py --out benchmarks/results/mode_split.md
"""

from __future__ import annotations

import argparse
import json

import torch
from _report import emit, machine
from harness import BenchConfig
from harness.methods import train_torchcfm

from torchcfm_nsgf import SinkhornFlowMatcher, SinkhornOptions, odeint_sample
from torchcfm_nsgf.datasets import TASKS
from torchcfm_nsgf.metrics import w2

NFES = (1, 2, 10)


def off_support(samples: torch.Tensor, reference: torch.Tensor, radius: float) -> torch.Tensor:
    """Mask of the samples farther than `radius` from every reference point."""
    return torch.cdist(samples, reference).min(1).values > radius


def support_radius(task, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """20 000 target draws and the 99th percentile of fresh draws' distance to them."""
    reference = task.target(20000, generator)
    fresh = task.target(5000, generator)
    return reference, float(torch.cdist(fresh, reference).min(1).values.quantile(0.99))


def score(samples_by_nfe: dict, target, reference, radius) -> dict:
    out = {f"w2_nfe{n}": w2(s, target) for n, s in samples_by_nfe.items()}
    two = samples_by_nfe[2]
    mask = off_support(two, reference, radius)
    out["off_support_nfe2"] = float(mask.float().mean())
    return out


def corrective_noise(t, xt, ut, scale: float, generator: torch.Generator):
    """Move each served point off its straight path by ``scale * t (1 - t) * eps`` and aim its velocity at the
    path's end point from there: ``u = (X_T - x) / (1 - t) = ut - scale * t * eps``. The clean source
    (t = 0) and the end points are unchanged; a field trained on it learns, at t > 0, to steer points that
    left their path (into the gap where a source mode splits) back towards the nearer end points."""
    eps = torch.randn(xt.shape, generator=generator, dtype=xt.dtype)
    tt = t[:, None]
    return xt + scale * tt * (1 - tt) * eps, ut - scale * tt * eps


class CorrectiveNoise:
    """A matcher whose served points get :func:`corrective_noise` of ``scale`` (drawn from ``generator``)."""

    def __init__(self, matcher, scale: float, generator: torch.Generator) -> None:
        self.matcher, self.scale, self.generator = matcher, scale, generator

    def sample_location_and_conditional_flow(self, x0, x1):
        t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)
        return (t, *corrective_noise(t, xt, ut, self.scale, self.generator))


def train(
    task,
    seed: int,
    steps: int,
    width: int,
    flow_size: int,
    blur: float,
    ema_decay: float | None,
    noise: float = 0.0,
):
    """The study's loop (the harness's torchcfm loop, CPU clock, EMA without warm-up); returns the last field,
    the EMA field (or None) and the CPU seconds of training."""
    fm = SinkhornFlowMatcher(
        flow_size=flow_size,
        sinkhorn=SinkhornOptions(blur=blur),
        generator=torch.Generator().manual_seed(seed + 1000),
    )
    if noise:
        fm = CorrectiveNoise(fm, noise, torch.Generator().manual_seed(seed + 6000))
    config = BenchConfig(train_steps=steps, clock="cpu", ema=ema_decay, width=width)
    trained = train_torchcfm(fm, task, config, seed, ema_warmup=False)
    if ema_decay is None:
        return trained.field, None, trained.cpu_s
    return trained.last, trained.field, trained.cpu_s


@torch.no_grad()
def sample(field, x0) -> dict:
    return {n: odeint_sample(field, x0, solver="euler", n_steps=n).samples for n in NFES}


def end_points(task, args, blur: float, row: dict, target, reference, radius) -> dict:
    """The targets themselves: the end points of one flow of flow_size fresh particles, no network."""
    gen = torch.Generator().manual_seed(args.seed + 5000)
    x0, x1 = task.source(args.flow_size, gen), task.target(args.flow_size, gen)
    fm = SinkhornFlowMatcher(pool=None, sinkhorn=SinkhornOptions(blur=blur))
    ends = fm.simulate(x0, x1).xs[-1]
    ends = ends[torch.randperm(len(ends), generator=gen)[:2000]]
    label = "flow end points (no network)" + ("" if blur == 0.1 else f", blur {blur:g}")
    return (
        row | dict(row=label, cpu_s=float("nan")) | score({n: ends for n in NFES}, target, reference, radius)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["gaussian-moons", "8gaussians-moons"])
    p.add_argument("--flow-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blurs", nargs="*", type=float, default=[0.03])
    p.add_argument("--widths", nargs="*", type=int, default=[1024])
    p.add_argument("--noises", nargs="*", type=float, default=[], help="rows with corrective noise")
    p.add_argument("--no-base", action="store_true", help="leave out the base, EMA and end-point rows")
    p.add_argument(
        "--endpoint-blurs", nargs="*", type=float, default=[], help="end-point rows at these blurs"
    )
    p.add_argument("--out", default=None, help="markdown table (and a JSON beside it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        task = TASKS[name]
        g = torch.Generator().manual_seed(args.seed + 3000)  # the study's evaluation draws
        x0_eval, target = task.source(2000, g), task.target(2000, g)
        reference, radius = support_radius(task, torch.Generator().manual_seed(args.seed + 4000))
        floor = w2(
            task.target(2000, torch.Generator().manual_seed(1)),
            task.target(2000, torch.Generator().manual_seed(2)),
        )
        runs = [] if args.no_base else [("base", 256, 0.1, 0.999, 0.0)]
        runs += [(f"blur {b:g}", 256, b, None, 0.0) for b in args.blurs]
        runs += [(f"width {w}", w, 0.1, None, 0.0) for w in args.widths]
        runs += [(f"corrective noise {s:g}", 256, 0.1, None, s) for s in args.noises]
        for label, width, blur, ema_decay, noise in runs:
            model, ema, cpu = train(
                task, args.seed, args.steps, width, args.flow_size, blur, ema_decay, noise
            )
            row = dict(task=name, row=label, cpu_s=cpu, floor=floor, radius=radius)
            rows.append(row | score(sample(model, x0_eval), target, reference, radius))
            print(json.dumps(rows[-1]), flush=True)
            if ema is not None:
                rows.append(
                    dict(row, row="base, EMA 0.999") | score(sample(ema, x0_eval), target, reference, radius)
                )
                print(json.dumps(rows[-1]), flush=True)
            if label == "base":
                rows.append(end_points(task, args, 0.1, dict(row), target, reference, radius))
                print(json.dumps(rows[-1]), flush=True)
        for blur in args.endpoint_blurs:
            rows.append(end_points(task, args, blur, dict(task=name, floor=floor), target, reference, radius))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"Flows of {args.flow_size}, {args.steps} steps, seed {args.seed}, one torch thread, {machine()}.",
        "",
        "| task | row | W2 NFE 1 | W2 NFE 2 | W2 NFE 10 | NFE 2 / floor | off support (NFE 2) | CPU s |",
        "|---|---|" + "---:|" * 6,
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['row']} | {r['w2_nfe1']:.3f} | {r['w2_nfe2']:.3f} | {r['w2_nfe10']:.3f} | "
            f"{r['w2_nfe2'] / r['floor']:.2f}x | {100 * r['off_support_nfe2']:.1f} % | "
            f"{r['cpu_s']:.0f} |"
        )
    emit("mode_split.py", args, lines, data=rows)


if __name__ == "__main__":
    main()
