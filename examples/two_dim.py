"""NSGF on a 2D task, end to end on the CPU (the README's main job).

    python examples/two_dim.py                      # 8gaussians -> moons, about 2-3 minutes on one core
    python examples/two_dim.py --task gaussian-checkerboard

Simulates empirical Sinkhorn flows into a trajectory pool, trains torchcfm's MLP on it with torchcfm's loop
(``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1); loss = mean((v(t, xt) - ut)^2)``), then
prints the exact W2 (POT ``emd2``) between generated and fresh target samples at Euler NFE 1, 2, 5, 10, 100
and writes to ``outputs/``: the trajectories (source, paths, samples) and W2 against the Euler step.

Blur is 0.3, not the paper's 0.05: see ``torchcfm_nsgf.toy.NSGFConfig`` (Sinkhorn cost measured).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from torchcfm_nsgf import SinkhornFlowMatcher, euler_sample  # noqa: E402
from torchcfm_nsgf.toy import TASKS, NSGFConfig, get_task, train_nsgf, w2  # noqa: E402

NFES = (1, 2, 5, 10, 100)


def main() -> None:
    defaults = NSGFConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="8gaussians-moons", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=5000, help="optimiser steps (Adam 1e-3, batch 256)")
    parser.add_argument("--flows", type=int, default=defaults.n_flows, help="simulated flows in the pool")
    parser.add_argument("--flow-steps", type=int, default=defaults.flow_steps, help="T of each flow")
    parser.add_argument("--eta", type=float, default=defaults.step_size, help="flow step size")
    parser.add_argument(
        "--target-batch", type=int, default=None, help="target samples per flow (default 256)"
    )
    parser.add_argument("--blur", type=float, default=defaults.blur, help="Sinkhorn blur, eps = blur^2")
    parser.add_argument("--n-eval", type=int, default=2000, help="points for the W2 table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this MLP)")
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--nsgfpp", action="store_true", help="also train NSGF++ (5 NSGF steps + predictor + straight flow)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    task = get_task(args.task)
    config = NSGFConfig(
        blur=args.blur,
        flow_steps=args.flow_steps,
        step_size=args.eta,
        n_flows=args.flows,
        target_batch=args.target_batch,
    )
    generator = torch.Generator().manual_seed(args.seed)
    print(f"task {task.label}; {config}")

    result = train_nsgf(task, config, n_steps=args.steps, generator=generator, progress=not args.no_progress)
    print(f"trained in {result.train_time_s:.1f} s (simulation included), final loss {result.losses[-1]:.3g}")

    x0 = task.source(args.n_eval, generator)
    y = task.target(args.n_eval, generator)
    floor = w2(task.target(args.n_eval, generator), y)
    print(f"\nW2 to {args.n_eval} fresh target samples (two-sample floor W2(target, target) = {floor:.3f})")
    print("| Euler NFE | W2 |\n|---:|---:|")
    for nfe in NFES:
        samples, _ = result.sample(x0, nfe)
        print(f"| {nfe} | {w2(samples, y):.3f} |")
    print(f"| dopri5 ({(r := result.sample(x0, None, 'dopri5'))[1]}) | {w2(r[0], y):.3f} |")

    if args.nsgfpp:
        from torchcfm_nsgf.networks import TimePredictorMLP, VelocityMLP
        from torchcfm_nsgf.nsgfpp import NSGFPlusPlus

        # NSGF++ (Algorithm 3): 5 NSGF steps of eta 0.6 (run C of benchmarks/results/nsgfpp_two_dim.md),
        # the time predictor and the straight flow, each trained for --steps optimiser steps.
        pp_gen = torch.Generator().manual_seed(args.seed + 1)  # leaves the NSGF run's draws unchanged
        pp = NSGFPlusPlus(
            VelocityMLP(2),
            TimePredictorMLP(2),
            VelocityMLP(2),
            n_steps=5,
            step_size=0.6,
            blur=config.blur,
            scaling=config.scaling,
            refresh_every=max(1, args.steps // config.n_flows),
            generator=pp_gen,
            progress=not args.no_progress,
        )
        start = time.perf_counter()
        pp.fit(
            lambda n: task.source(n, pp_gen),
            lambda n: task.target(n, pp_gen),
            nsgf_iters=args.steps,
            predictor_iters=args.steps,
            straight_iters=args.steps,
        )
        print(f"\nNSGF++ trained in {time.perf_counter() - start:.1f} s")
        print("| NSGF++ phase 2 | NFE = NSGF + predictor + straight | W2 |\n|---|---:|---:|")
        for solver, steps in (("euler", 5), ("euler", 10), ("dopri5", None)):
            out = pp.sample(x0, solver=solver, straight_steps=steps)
            n = out.nfe
            print(
                f"| {solver} {steps or ''} | {n['nsgf']} + {n['predictor']} + {n['straight']} = "
                f"{out.total_nfe} | {w2(out.samples, y):.3f} |"
            )

    # Trajectories of the learned field (100 Euler steps) and W2 against the step, next to the simulated flow.
    n_plot = 1000
    traj = euler_sample(result.field, x0[:n_plot], n_steps=100, return_trajectory=True).trajectory
    matcher = SinkhornFlowMatcher(
        config.flow_steps,
        config.step_size,
        config.blur,
        config.scaling,
        tol=config.tol,
        max_iter=config.max_iter,
    )
    flow = matcher.simulate(x0[: config.flow_batch], task.target(config.flow_batch, generator))
    every = 5
    learned = [(k / 100, w2(traj[k], y[:n_plot])) for k in range(0, 101, every)]
    simulated = [
        (k / config.flow_steps, w2(flow.xs[k], y[:n_plot]))
        for k in range(0, config.flow_steps + 1, max(1, config.flow_steps // 20))
    ]

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(*traj[0].T, s=2, c="tab:blue", alpha=0.6, label="source")
    ax.plot(traj[:, :200, 0], traj[:, :200, 1], c="olive", alpha=0.15, lw=0.6)
    ax.scatter(*traj[-1].T, s=2, c="tab:red", alpha=0.8, label="samples (NFE 100)")
    ax.set_title(f"NSGF, {task.label}")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"two_dim_{task.name}_trajectories.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*learned, strict=True), "o-", label="learned field, 100 Euler steps")
    ax.plot(
        *zip(*simulated, strict=True), "s--", label=f"simulated Sinkhorn flow ({config.flow_batch} particles)"
    )
    ax.axhline(floor, color="k", ls=":", label="two-sample floor")
    ax.set_yscale("log")
    ax.set_xlabel("t (normalised clock: step k of T at t = k / T)")
    ax.set_ylabel("W2 to target")
    ax.set_title(f"NSGF, {task.label}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"two_dim_{task.name}_w2.png"), dpi=120)
    plt.close(fig)
    print(f"\nwrote {args.out}/two_dim_{task.name}_trajectories.png and _w2.png")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
