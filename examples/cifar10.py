"""CIFAR-10 with NSGF, a torchcfm flow-matching baseline or a one-step generator, all trained by the same loop.

`--method` is one of nsgf++, nsgf, coupling, otcfm, icfm, fm, rf, drift (a one-step generator trained by the
Sinkhorn drift), meanflow (MeanFlow, the one-step baseline).

Examples
--------
    torchrun --nproc_per_node=4 examples/cifar10.py --method otcfm --data-root ./data --download --ckpt-dir runs/c10_otcfm
    python examples/cifar10.py --method drift --train-steps 2000 --sample            # NFE 1
    python examples/cifar10.py --method icfm --unet tiny --train-steps 200 --batch-size 16 --sample --nfe 20
    python examples/cifar10.py --method otcfm --ckpt-dir RUN --resume --sample --nfe 100   # continue / sample

Every flag, with its default (torchcfm's recipe), and the presets: `python examples/cifar10.py --help`.
Several GPUs (or CPU processes, gloo): `torchrun --nproc_per_node=K examples/cifar10.py ...`.
"""

from __future__ import annotations

import sys

from torchcfm_nsgf.images.cli import main as cli_main


def main(argv: list[str] | None = None) -> dict:
    return cli_main("cifar10", argv)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
