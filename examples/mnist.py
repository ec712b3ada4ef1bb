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

from torchcfm_nsgf.images.cli import build_parser, run


def main(argv: list[str] | None = None) -> dict:
    args = build_parser("mnist").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = run(args)
    if out["rank"] == 0:
        print(f"trained {args.method} to step {out['step']} ({out['wall_time_s']:.1f} s this run)")
        if "grid" in out:
            parts = ", ".join(f"{k} {v}" for k, v in out["nfe_breakdown"].items())
            print(f"wrote {out['grid']}")
            print(f"NFE: {out['nfe']} ({parts})")
        if "fid" in out:
            line = f"FID: {out['fid']:.3f} (NFE {out['fid_nfe']})"
            if "is_mean" in out:
                line += f", IS: {out['is_mean']:.3f} ± {out['is_std']:.3f}"
            print(line)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
