"""NSGF on a 2D task, end to end on the CPU (the README's main job).

    python examples/two_dim.py                      # 8gaussians -> moons, 1-2 minutes on one core
    python examples/two_dim.py --task gaussian-checkerboard
    python examples/two_dim.py --path polyline --flow-steps 3 --blur 0.05

torchcfm's training loop with ``FM = SinkhornFlowMatcher()`` (its defaults unless flags say otherwise):
``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1); loss = mean((v(t, xt) - ut)^2)``. Prints the
exact W2 (POT ``emd2``) between generated and fresh target samples at Euler NFE 1, 2, 5, 10, 100 and with
dopri5, next to exact OT-CFM (torchcfm, σ = 0) trained the same way with ``--compare``, and writes to
``outputs/`` the trajectories and W2 against t (learned field and simulated flow).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher  # noqa: E402
from torchcfm.models import MLP  # noqa: E402
from torchcfm.utils import torch_wrapper  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from torchcfm_nsgf._cli import add_matcher_flags, matcher_from_args  # noqa: E402
from torchcfm_nsgf.datasets import TASKS, get_task  # noqa: E402
from torchcfm_nsgf.metrics import w2  # noqa: E402

NFES = (1, 2, 5, 10, 100)


def train(FM, sample_batch, train_steps: int, width: int, progress: bool, desc: str):
    """torchcfm's training loop for the matcher ``FM``, Adam 1e-3, batch 256. Returns the trained field
    ``field(t, x)``, the seconds it took (NSGF: its simulated flows included) and the losses."""
    model = MLP(dim=2, w=width, time_varying=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(train_steps), desc=desc, disable=None if progress else True, leave=False):
        x0, x1 = sample_batch(256)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)  # the only line NSGF changes
        loss = torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return torch_wrapper(model), time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default="8gaussians-moons", choices=sorted(TASKS), help="2D task")
    parser.add_argument(
        "--train-steps", type=int, default=3000, help="optimiser steps (Adam 1e-3, batch 256)"
    )
    parser.add_argument("--width", type=int, default=64, help="width of torchcfm's MLP")
    parser.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=True, help="also train OT-CFM"
    )
    parser.add_argument("--n-eval", type=int, default=2000, help="points for the W2 table")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and matcher")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this MLP)")
    parser.add_argument("--out", default="outputs", help="folder of the plots")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group = parser.add_argument_group("SinkhornFlowMatcher (defaults: the matcher's own)")
    add_matcher_flags(group)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    task = get_task(args.task)
    generator = torch.Generator().manual_seed(args.seed)
    FM = matcher_from_args(args, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"task {task.label}\n{FM}")

    common = dict(train_steps=args.train_steps, width=args.width, progress=not args.no_progress)
    field, seconds, losses = train(
        FM, lambda bs: (task.source(bs, generator), task.target(bs, generator)), desc="NSGF", **common
    )
    print(
        f"NSGF trained in {seconds:.1f} s ({FM.n_flows} simulated flows at blur {FM.blur:.3g}, "
        f"pool of {len(FM.pool) if FM.pool is not None else 0} segments), final loss {losses[-1]:.3g}"
    )
    fields = {"NSGF": field}
    if args.compare:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)  # noqa: NPY002 - torchcfm's OT pairing draws from NumPy's global generator
        ot_gen = torch.Generator().manual_seed(args.seed)
        fields["OT-CFM"], seconds, _ = train(
            ExactOptimalTransportConditionalFlowMatcher(sigma=0.0),
            lambda bs: (task.source(bs, ot_gen), task.target(bs, ot_gen)),
            desc="OT-CFM",
            **common,
        )
        print(f"OT-CFM trained in {seconds:.1f} s")

    x0 = task.source(args.n_eval, generator)
    y = task.target(args.n_eval, generator)
    floor = w2(task.target(args.n_eval, generator), y)
    print(f"\nW2 to {args.n_eval} fresh target samples (two-sample floor W2(target, target) = {floor:.3f})")
    print("| method | " + " | ".join(f"NFE {n}" for n in NFES) + " | dopri5 (NFE) |")
    print("|---|" + "---:|" * (len(NFES) + 1))
    for name, trained in fields.items():
        cells = [f"{w2(FM.sample(trained, x0, n_steps=n).samples, y):.3f}" for n in NFES]
        adaptive = FM.sample(trained, x0, solver="dopri5")
        cells.append(f"{w2(adaptive.samples, y):.3f} ({adaptive.total_nfe})")
        print(f"| {name} | " + " | ".join(cells) + " |")

    # Trajectories of the learned field (100 Euler steps) and W2 against t, next to the simulated flow.
    n_plot = 1000
    traj = FM.sample(fields["NSGF"], x0[:n_plot], n_steps=100, return_trajectory=True).trajectory
    flow = FM.simulate(x0[:256], task.target(256, generator))
    learned = [(k / 100, w2(traj[k], y[:n_plot])) for k in range(0, 101, 5)]
    simulated = [(k / FM.flow_steps, w2(flow.xs[k], y[:n_plot])) for k in range(FM.flow_steps + 1)]

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
    ax.plot(*zip(*simulated, strict=True), "s--", label="simulated Sinkhorn flow (256 particles)")
    ax.axhline(floor, color="k", ls=":", label="two-sample floor")
    ax.set_yscale("log")
    ax.set_xlabel("t (normalised clock)")
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
