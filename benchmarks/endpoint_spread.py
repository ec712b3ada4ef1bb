"""How spread out are NSGF++'s phase-1 end points on MNIST, from a trained run's checkpoint?

NSGF++ (``nsgf++``, ``endpoints="network"``, the image default) starts its straight flow at X_T, T Euler
steps of the NSGF UNet from noise. A one-step regression of the Sinkhorn flow's velocity predicts the mean of
its targets over the data batches it saw, so X_T may be far less varied than the simulated Sinkhorn end
points it imitates, and phase 2 then has to spread a contracted cloud back out over the digits. This script
loads the EMA networks of one or more ``benchmarks/mnist.py`` runs (``--run-dir`` with
``--keep-checkpoints``) and reports, for 1024 noise samples:

* the total variance (sum of the per-pixel variances) and the median pairwise distance of the points;
* the median distance of each point to its nearest image among ``--others`` training images;

for the data, the noise, the simulated X_T (T Sinkhorn steps of the checkpoint's η and blur against batches
of 64 training images), the network's X_T, and the NSGF++ samples at total NFE 10 and 20 (Euler).

Pixels in [-1, 1]. One thread.

    python benchmarks/mnist.py --methods nsgf++:blur=0.05 --run-dir RUNS --keep-checkpoints ...  # §5a
    python benchmarks/endpoint_spread.py --data-root ../shared/data RUNS/nsgfpp_blur0.05/checkpoint.pt
"""

from __future__ import annotations

import argparse
import os

import torch
from _report import emit  # benchmarks/, next to this script
from harness.images import mnist_unit

from torchcfm_nsgf.images.registry import make_method
from torchcfm_nsgf.images.settings import NSGFSettings
from torchcfm_nsgf.nsgfpp.shared import phase_views
from torchcfm_nsgf.sinkhorn import SinkhornOptions

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (1, 28, 28)


def load(path: str):
    """The ``nsgf++`` method of a checkpoint (EMA networks, eval mode), its step and its NSGF settings."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt["config"]
    if config["method"] != "nsgf++":
        raise SystemExit(f"{path}: an {config['method']!r} run, not nsgf++")
    settings = dict(config["nsgf"])
    settings["sinkhorn"] = SinkhornOptions(**settings["sinkhorn"])
    method = make_method("nsgf++", SHAPE, preset=config["preset"], nsgf=NSGFSettings(**settings))
    method.nets.load_state_dict(ckpt["ema"])
    method.nets.eval()
    return method, ckpt["step"], config["nsgf"]


def spread(x: torch.Tensor, others: torch.Tensor) -> str:
    x = x.flatten(1)
    k = min(512, x.shape[0])
    pairwise = torch.cdist(x[:k], x[:k])[~torch.eye(k, dtype=torch.bool)]
    nearest = torch.cdist(x, others).min(dim=1).values
    return f"{float(x.var(0).sum()):.1f} | {float(pairwise.median()):.2f} | {float(nearest.median()):.2f}"


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of nsgf++ runs of benchmarks/mnist.py")
    p.add_argument("--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--n", type=int, default=1024, help="noise samples (a multiple of 64)")
    p.add_argument("--images", type=int, default=8192, help="training images the Sinkhorn batches come from")
    p.add_argument("--others", type=int, default=4096, help="further training images, for the nearest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    if args.n % 64:
        p.error("--n must be a multiple of 64")
    torch.set_num_threads(1)
    images, _ = mnist_unit(args.data_root, args.images + args.others)
    data, others = images[: args.images], images[args.images :].flatten(1)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn((args.n, *SHAPE), generator=gen)

    lines = [
        "| points | total variance | median pairwise distance | median distance to the nearest image |",
        "|---|---|---|---|",
        f"| MNIST training images | {spread(data[: args.n], others)} |",
        f"| noise N(0, I) | {spread(x0, others)} |",
    ]
    for path in args.checkpoints:
        method, step, s = load(path)
        objective = method.objective
        # the NSGF field: its own network, or phase 1 of the one network of network="shared"
        nsgf = (
            phase_views(method.nets, False)["nsgf"] if objective.network == "shared" else method.nets["nsgf"]
        )
        p = s.get("nsgfpp") or {
            "phase2": s["phase2"],
            "flow_steps": s["phase1_steps"],
            "step_size": s["phase1_step_size"],
        }
        label = (
            f"`{p['phase2']}`, T = {p['flow_steps']}, η = {p['step_size']:g}, "
            f"blur {s['sinkhorn']['blur']:g}, step {step}"
        )
        simulated = torch.cat(
            [
                objective.simulate_endpoints(
                    x0[i : i + 64], data[torch.randint(0, len(data), (64,), generator=gen)]
                )
                for i in range(0, args.n, 64)
            ]
        )
        network = torch.cat(
            [objective.network_endpoints(nsgf, x0[i : i + 256]) for i in range(0, args.n, 256)]
        )
        lines.append(f"| simulated X_T ({label}) | {spread(simulated, others)} |")
        lines.append(f"| network X_T, EMA ({label}) | {spread(network, others)} |")
        for nfe in (10, 20):
            samples = torch.cat(
                [method.sample(method.nets, x0[i : i + 256], nfe=nfe).samples for i in range(0, args.n, 256)]
            )
            lines.append(f"| NSGF++ samples, NFE {nfe} ({label}) | {spread(samples.clamp(-1, 1), others)} |")
    emit("endpoint_spread.py", args, lines, positional=("checkpoints",))


if __name__ == "__main__":
    main()
