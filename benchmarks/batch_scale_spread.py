"""How much a relative blur resolved per flow varies on MNIST: the spread of the batch scale.

`SinkhornFlowMatcher` resolves a relative blur for every flow as `blur * scale_of(x1)` of that flow's targets.
This prints the spread of `scale_of` over random training batches, relative to the scale of 20 000 images
(pixels in [-1, 1], as the image loop loads them):

    python benchmarks/batch_scale_spread.py --data-root ../shared/data --batch-size 128
"""

from __future__ import annotations

import argparse

import torch
from harness.images import mnist_unit

from torchcfm_nsgf import SinkhornOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=500)
    args = parser.parse_args()
    x, _ = mnist_unit(args.data_root)
    full = SinkhornOptions.scale_of(x[:20000])
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor(
        [
            SinkhornOptions.scale_of(x[torch.randint(0, len(x), (args.batch_size,), generator=g)]) / full
            for _ in range(args.batches)
        ]
    )
    print(
        f"MNIST train, {args.batches} batches of {args.batch_size}: batch scale / scale of 20000 images: "
        f"mean {ratios.mean():.4f}, std {ratios.std():.4f}, min {ratios.min():.4f}, max {ratios.max():.4f}"
    )


if __name__ == "__main__":
    main()
