"""Iterations of the engine at the final ε for fixed over-relaxation factors, and the optional tuner.

Prints two markdown tables (iteration counts only, independent of machine load):

1. fixed ``omega`` in {1.0, 1.2, 1.5, 1.7, 1.9}: iterations to ``tol=1e-4`` from a cold start, and for
   1.0 / 1.9 one warm-started step after an Euler step of the flow (η = 0.03 for images, 0.02 for 2-D);
2. ``adapt_omega=True`` (the tuner, with its own cap) in float32 and in float64, against the fixed default,
   on the small-ε 2-D case (velocity error against a float64 solve at tol 1e-6).

    python benchmarks/omega_sweep.py --threads 1
"""

from __future__ import annotations

import argparse
import warnings

import torch
from sinkhorn_engine import make_data, rel_err  # benchmarks/, next to this script

from torchcfm_nsgf import SinkhornConvergenceWarning, sinkhorn_solve

OMEGAS = (1.0, 1.2, 1.5, 1.7, 1.9)
CONFIGS = ((784, 128, 2.0), (3072, 128, 2.0), (2, 256, 0.3), (2, 256, 0.05))

# The settings these tables were measured at (sinkhorn_solve's defaults before they moved to SinkhornOptions).
ENGINE = dict(tol=1e-4, max_iter=5000, backend="dense")


def fixed_table() -> list[str]:
    lines = [
        "| configuration | " + " | ".join(f"ω={w:g}" for w in OMEGAS) + " |",
        "|---|" + "---|" * len(OMEGAS),
    ]
    for d, n, blur in CONFIGS:
        x, y = make_data(n, d, None, 0, "cpu")
        cells = []
        for w in OMEGAS:
            s = sinkhorn_solve(x, y, blur=blur, omega=w, check_every=5, **ENGINE)
            cell = f"{s.n_iter}" if s.converged else f"> {s.n_iter}"
            if w in (1.0, 1.9):
                x2 = x + (0.03 if d > 2 else 0.02) * s.velocity
                ws = sinkhorn_solve(x2, y, blur=blur, omega=w, check_every=5, warm_start=s, **ENGINE)
                cell += f" (warm {ws.n_iter}{'' if ws.converged else ', capped'})"
            cells.append(cell)
        lines.append(f"| d={d}, n={n}, blur {blur:g} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def tuner_table() -> list[str]:
    x, y = make_data(256, 2, None, 0, "cpu")
    ref = sinkhorn_solve(x.double(), y.double(), blur=0.05, tol=1e-6, max_iter=20000, adapt_omega=True)
    lines = [
        f"d=2, n=256, blur 0.05, tol 1e-4; reference: float64, marginal error {ref.marginal_error:.1e}",
        "",
        "| dtype | ω | iterations | marginal error | velocity error |",
        "|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.float64):
        for label, adapt in (("fixed 1.9", False), ("tuned", True)):
            s = sinkhorn_solve(x.to(dtype), y.to(dtype), blur=0.05, adapt_omega=adapt, **ENGINE)
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {label} (end {s.omega:.3f}) | "
                f"{s.n_iter}{'' if s.converged else ' (cap)'} | {s.marginal_error:.1e} | "
                f"{rel_err(s.velocity, ref.velocity):.1e} |"
            )
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", SinkhornConvergenceWarning)
    out = fixed_table() + [""] + tuner_table()
    print("\n".join(out))


if __name__ == "__main__":
    main()
