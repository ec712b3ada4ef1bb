"""Training throughput (images/s) of every image method on CIFAR-10-shaped batches, one shared loop.

Each method is trained twice from scratch by ``torchcfm_nsgf.images.training.train`` with the same UNet
preset, batch and optimiser: for ``--warm-steps`` steps and for ``--warm-steps + --steps`` steps. The
steady-state throughput is ``steps * batch / (wall(long) - wall(short))``, so the start (CUDA and cuDNN
set-up, NSGF's first pool fill) drops out; the short run's wall time is reported as the start-up cost. The
window of ``--steps`` steps holds many pool refreshes (NSGF simulates a new Sinkhorn flow every
``refresh_every`` = 10 steps), so their cost is in the figure.

The images are random uint8 tensors of CIFAR-10's shape (3x32x32; ``--n-images`` of them): throughput does not
depend on their content except through the number of Sinkhorn iterations, which is capped. Real CIFAR-10
needs ``examples/cifar10.py --download``.

    python benchmarks/throughput.py --methods nsgf++,nsgf,otcfm,icfm --batch-size 128 --out throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import torch

from torchcfm_nsgf.images import TrainConfig, available_methods, train
from torchcfm_nsgf.images.data import ImageData


def synthetic_cifar(n: int, seed: int = 0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageData(images=images, labels=labels, name="cifar10")


def measure(method: str, data: ImageData, args: argparse.Namespace) -> dict:
    walls = []
    for total in (args.warm_steps, args.warm_steps + args.steps):
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(
                dataset="cifar10",
                data_root=tmp,
                method=method,
                train_steps=total,
                batch_size=args.batch_size,
                preset=args.preset,
                warmup=0,
                ema_decay=0.999,
                device=args.device,
                progress=False,
                log_every=10**6,
                seed=args.seed,
            )
            result = train(config, data=data)
        if result.step != total:
            raise RuntimeError(f"{method}: trained {result.step} steps, expected {total}")
        walls.append(result.wall_time_s)
    window = walls[1] - walls[0]
    return {
        "method": method,
        "startup_s": walls[0],
        "window_s": window,
        "steps": args.steps,
        "images_per_s": args.steps * args.batch_size / window,
        "steps_per_s": args.steps / window,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="nsgf++,nsgf,otcfm,icfm", help="comma-separated methods")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--preset", default="cifar10", help="UNet preset (torchcfm's CIFAR-10 UNet by default)")
    p.add_argument("--warm-steps", type=int, default=10, help="steps of the short run (start-up)")
    p.add_argument("--steps", type=int, default=100, help="steps of the timed window")
    p.add_argument("--n-images", type=int, default=10_000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    for m in methods:
        if m not in available_methods():
            raise SystemExit(f"--methods: {m!r} is not available (available: {available_methods()})")
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    )
    data = synthetic_cifar(args.n_images, args.seed)
    rows = []
    print(f"| method | images/s | steps/s | start-up (first {args.warm_steps} steps) |")
    print("|---|---|---|---|")
    for m in methods:
        row = measure(m, data, args)
        rows.append(row)
        print(
            f"| {m} | {row['images_per_s']:.0f} | {row['steps_per_s']:.2f} | {row['startup_s']:.1f} s |",
            flush=True,
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "command": "python benchmarks/throughput.py " + " ".join(argv or sys.argv[1:]),
                        "device": device_name,
                        "torch": torch.__version__,
                        "args": vars(args),
                        "rows": rows,
                    },
                    f,
                    indent=1,
                )


if __name__ == "__main__":
    main()
