"""torchcfm's canonical training loop with one matcher, for whole-process timing of NSGF against OT-CFM.

    python benchmarks/loop_time.py nsgf       # SinkhornFlowMatcher() at its defaults
    python benchmarks/loop_time.py otcfm      # torchcfm's ExactOptimalTransportConditionalFlowMatcher(sigma=0)

2000 steps (``--train-steps``), batch 256 (``--batch-size``), 8gaussians -> moons, torchcfm's MLP (w=64, time
input), Adam 1e-3, one torch thread: the harness's loop (``harness.methods.train_torchcfm``, seed 0). Prints the
loop's wall seconds (imports excluded) and, for NSGF, the matcher's counters. Time the two as whole processes, interleaved, to compare them.
"""

from __future__ import annotations

import argparse

import torch
from harness import BenchConfig
from harness.methods import train_torchcfm
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

from torchcfm_nsgf import SinkhornFlowMatcher
from torchcfm_nsgf.datasets import TASKS, get_task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("matcher", choices=["nsgf", "otcfm"], help="the matcher of the loop")
    parser.add_argument("--task", default="8gaussians-moons", choices=sorted(TASKS), help="2D task")
    parser.add_argument("--train-steps", type=int, default=2000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    FM = (
        SinkhornFlowMatcher()
        if args.matcher == "nsgf"
        else ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    )
    config = BenchConfig(train_steps=args.train_steps, batch_size=args.batch_size, width=64)
    seconds = train_torchcfm(FM, get_task(args.task), config, 0).wall_s
    extra = f", {FM.n_flows} flows, {FM.n_solves} Sinkhorn solves" if args.matcher == "nsgf" else ""
    print(f"{args.matcher}: {args.train_steps} steps in {seconds:.1f} s{extra}")


if __name__ == "__main__":
    main()
