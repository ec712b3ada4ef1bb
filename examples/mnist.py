"""MNIST with NSGF, a torchcfm flow-matching baseline or a one-step generator, all trained by the same loop.

`--method` is one of nsgf++, nsgf, coupling, otcfm, icfm, fm, rf, drift (a one-step generator trained by the
Sinkhorn drift), meanflow (MeanFlow, the one-step baseline).

Examples
--------
    python examples/mnist.py --preset quick --download --ckpt-dir runs/quick   # digits in minutes on a CPU
    python examples/mnist.py --method nsgf --data-root ./data --download --ckpt-dir runs/mnist_nsgf --sample
    python examples/mnist.py --method drift --train-steps 2000 --sample            # NFE 1
    python examples/mnist.py --method icfm --unet tiny --train-steps 200 --batch-size 16 --sample --nfe 20
    python examples/mnist.py --method otcfm --ckpt-dir RUN --resume --sample --nfe 100   # continue / sample

Every flag, with its default (torchcfm's recipe), and the presets: `python examples/mnist.py --help`.
Several GPUs (or CPU processes, gloo): `torchrun --nproc_per_node=K examples/mnist.py ...`.
"""

from __future__ import annotations

import sys

from torchcfm_nsgf.images.cli import main as cli_main


def main(argv: list[str] | None = None) -> dict:
    return cli_main("mnist", argv)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
