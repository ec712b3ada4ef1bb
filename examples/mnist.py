"""MNIST with NSGF or a torchcfm flow-matching baseline, all trained by the same loop.

`--method` is one of nsgf++, nsgf, otcfm, icfm, fm, rf.

Examples
--------
    python examples/mnist.py --method nsgf --data-root ../shared/data --ckpt-dir runs/mnist_nsgf --sample
    python examples/mnist.py --method icfm --tiny --total-steps 200 --batch-size 16 --sample --nfe 20
    python examples/mnist.py --method otcfm --ckpt-dir RUN --resume --sample --nfe 100   # continue / sample

Every flag, with its default (torchcfm's recipe): `python examples/mnist.py --help`.
Several GPUs (or CPU processes, gloo): `torchrun --nproc_per_node=K examples/mnist.py ...`.
"""

from __future__ import annotations

import logging
import sys

from torchcfm_nsgf.images.cli import build_parser, report_lines, run


def main(argv: list[str] | None = None) -> dict:
    args = build_parser("mnist").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = run(args)
    if out["rank"] == 0:
        print("\n".join(report_lines(args.method, out)))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
