"""The engine's backends against GeomLoss and POT: time, peak memory and velocity error against n, in one run.

For every configuration ``d:n`` (n = m), the solvers run one after the other in this process (so that the
machine's load hits them alike), each once:

* engine backends (``sinkhorn_solve`` at the defaults of ``SinkhornOptions``: relative blur 0.1 in 2D,
  0.05 in d > 3 as the matcher uses, tol 1e-2): ``dense`` (while two n x n float32 matrices fit in
  ``--dense-max-gib``), ``streaming``, ``multiscale`` (d <= 3), ``keops`` (when pykeops imports);
* GeomLoss ``SamplesLoss("sinkhorn", p=2, debias=True)`` at the same blur, ``v = -n grad_x``, with the
  backends ``tensorized`` (n <= ``--tensorized-max``), ``online`` and ``multiscale`` (d <= 3; both need
  pykeops), at ``--geomloss-scaling``;
* POT ``ot.sinkhorn(method="sinkhorn_log")`` on the cross and symmetric problems (n <= ``--pot-max``).

Error: relative L2 distance of the velocity to a float64 reference, this engine at tol 1e-6 on the dense
backend (n <= ``--ref-dense-max``) or the multiscale one (d <= 3, larger n); no reference (and no error)
beyond. Peak memory: the rise of the resident set's high-water mark during the call (``Meter`` of
``benchmarks/sinkhorn_engine.py``). Rows whose predicted cost is out of reach are listed as not run.

    python benchmarks/sinkhorn_backends.py --configs 2:1024 2:4096 2:16384 2:65536 784:1024 784:4096 \\
        --threads 2 --out benchmarks/results/sinkhorn_backends.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
import warnings
from functools import partial

import torch
from _report import publish  # benchmarks/, next to this script

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sinkhorn_engine import Meter, rel_err  # noqa: E402

from torchcfm_nsgf import SinkhornConvergenceWarning, SinkhornOptions, sinkhorn_solve  # noqa: E402
from torchcfm_nsgf.datasets import get_task  # noqa: E402
from torchcfm_nsgf.sinkhorn import HIGH_DIM_BLUR  # noqa: E402
from torchcfm_nsgf.sinkhorn.keops import keops_available  # noqa: E402


def make_data(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if d == 2:
        task = get_task("8gaussians-moons")
        return task.source(n, g), task.target(n, g)
    return torch.randn(n, d, generator=g), torch.rand(n, d, generator=g) * 2 - 1


def engine(x, y, blur, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        sol = sinkhorn_solve(x, y, blur=blur, backend=backend, **kw)
    return sol.velocity, f"{sol.n_anneal}+{sol.n_iter} it, marg {sol.marginal_error:.0e}"


def geomloss_velocity(x, y, blur, scaling, backend):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, backend=backend)
    xs = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xs, y), xs)
    return -len(x) * grad, f"scaling {scaling}"


def pot_velocity(x, y, blur, tol=1e-2, max_iter=1000):
    import ot

    def proj(p, q):
        a = torch.full((len(p),), 1.0 / len(p), dtype=p.dtype)
        b = torch.full((len(q),), 1.0 / len(q), dtype=p.dtype)
        P = ot.sinkhorn(
            a,
            b,
            0.5 * ot.dist(p, q),
            blur**2,
            method="sinkhorn_log",
            numItermax=max_iter,
            stopThr=tol / math.sqrt(len(q)),
            warn=False,
        )
        return (P @ q) / P.sum(1, keepdim=True)

    return proj(x, y) - proj(x, x), f"tol {tol:g}, cap {max_iter}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["2:1024", "2:4096"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-max-gib", type=float, default=4.0)
    ap.add_argument("--streaming-max", type=int, default=4096, help="largest n for the streaming backend")
    ap.add_argument(
        "--keops-max", type=int, default=4096, help="largest n for KeOps (engine and GeomLoss online)"
    )
    ap.add_argument("--tensorized-max", type=int, default=4096)
    ap.add_argument("--pot-max", type=int, default=1024)
    ap.add_argument("--ref-dense-max", type=int, default=4096)
    ap.add_argument(
        "--ref64-max", type=int, default=16384, help="beyond: float32 multiscale reference at tol 1e-4"
    )
    ap.add_argument("--ref-max", type=int, default=65536, help="no reference beyond this n")
    ap.add_argument("--ref-max-iter", type=int, default=2000, help="iteration cap of the float64 reference")
    ap.add_argument("--geomloss-scalings", type=float, nargs="+", default=[0.9, 0.99])
    ap.add_argument("--slow-scaling-max", type=int, default=1024, help="largest n for scalings above 0.95")
    ap.add_argument("--skip", nargs="*", default=[], help="solver names to leave out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meter = Meter(torch.device("cpu"))
    keops = keops_available()
    lines = [
        f"Command: `python benchmarks/sinkhorn_backends.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, pykeops {'available' if keops else 'not installed'}; "
        f"load average at start {os.getloadavg()[0]:.1f}.",
        "",
        "| d | n | solver | time | peak memory | velocity error | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg in args.configs:
        d, n = (int(v) for v in cfg.split(":"))
        x, y = make_data(n, d)
        opts = SinkhornOptions(blur=0.1 if d <= 3 else HIGH_DIM_BLUR)
        blur = opts.absolute_blur(y)
        t0 = time.perf_counter()
        ref = None
        if n <= args.ref_dense_max:
            ref, note = engine(x.double(), y.double(), blur, "dense", tol=1e-6, max_iter=args.ref_max_iter)
            ref_note = f"float64 dense at tol 1e-6 ({note}, {time.perf_counter() - t0:.0f} s)"
        elif d <= 3 and n <= args.ref64_max:
            ref, note = engine(
                x.double(), y.double(), blur, "multiscale", tol=1e-6, max_iter=args.ref_max_iter
            )
            ref_note = f"float64 multiscale at tol 1e-6 ({note}, {time.perf_counter() - t0:.0f} s)"
        elif d <= 3 and n <= args.ref_max:
            ref, note = engine(x, y, blur, "multiscale", tol=1e-4, max_iter=5000)
            ref_note = f"float32 multiscale at tol 1e-4 ({note}, {time.perf_counter() - t0:.0f} s)"
        else:
            ref_note = "no reference"
        print(f"d={d} n={n} blur={blur:.3g}: reference {ref_note}", flush=True)
        solvers = []
        if 2 * n * n * 4 / 2**30 <= args.dense_max_gib:
            solvers.append(("engine dense", partial(engine, x, y, blur, "dense")))
        if n <= args.streaming_max:
            solvers.append(("engine streaming", partial(engine, x, y, blur, "streaming")))
        if d <= 3:
            solvers.append(("engine multiscale", partial(engine, x, y, blur, "multiscale")))
        if keops and n <= args.keops_max:
            solvers.append(("engine keops", partial(engine, x, y, blur, "keops")))
        for sc in args.geomloss_scalings:
            if sc > 0.95 and n > args.slow_scaling_max:
                continue
            if n <= args.tensorized_max:
                solvers.append(
                    (f"GeomLoss tensorized {sc}", partial(geomloss_velocity, x, y, blur, sc, "tensorized"))
                )
            if keops and n <= args.keops_max:
                solvers.append(
                    (f"GeomLoss online {sc}", partial(geomloss_velocity, x, y, blur, sc, "online"))
                )
        if keops and d <= 3:
            for sc in args.geomloss_scalings:
                solvers.append(
                    (f"GeomLoss multiscale {sc}", partial(geomloss_velocity, x, y, blur, sc, "multiscale"))
                )
        if n <= args.pot_max:
            solvers.append(("POT sinkhorn_log", partial(pot_velocity, x, y, blur)))
        # Compile KeOps formulas (first use) at a small size, outside the timings.
        xs, ys = make_data(64, d, seed=1)
        for name, fn in solvers:
            if "keops" in name or "online" in name or "GeomLoss multiscale" in name:
                fn.func(xs, ys, *fn.args[2:])
        for name, fn in solvers:
            if any(k in name for k in args.skip):
                continue
            (v, note), dt, mem = meter(fn)
            err = f"{rel_err(v, ref):.1e}" if ref is not None else "–"
            row = f"| {d} | {n} | {name} | {dt:.2f} s | {mem:.0f} MiB | {err} | {note} |"
            print(row, flush=True)
            lines.append(row)
        lines.append(f"| {d} | {n} | reference | | | | {ref_note}; blur {blur:.3g} |")
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
    publish(lines, args.out)


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        # Freed matrices go back to the OS, so that each call's peak is measured from a clean base.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
