"""The Sinkhorn velocity engine against GeomLoss (+ autograd) and POT, side by side, in one run.

For every configuration (sizes n = m, dimension d, blur) it reports, for each solver:

* median wall time of one velocity evaluation (repeats interleaved across solvers in one process);
* relative error ``||v - v_ref|| / ||v_ref||`` against a float64 reference: this engine in float64 with
  ``tol=1e-10`` (continued by warm starts until converged or ``--ref-cap-s`` ran out; its achieved L1
  marginal error is printed as the certificate);
* peak memory of one call: on CPU the rise of the process's resident-set high-water mark during the
  call (``VmHWM`` reset through ``/proc/self/clear_refs`` before each call, the process re-executed with
  ``MALLOC_MMAP_THRESHOLD_`` so that freed matrices go back to the OS); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call;

and, along a 20-step explicit-Euler flow ``x <- x + eta * v`` driven by the warm-started engine, the
per-step time of the warm-started engine, of a cold engine solve and of GeomLoss at the same particles.

Solvers (cost ½‖x − y‖², ε = blur²):

* engine: ``torchcfm_nsgf.sinkhorn_solve``, dense backend, scaling 0.9, tol 1e-4, max_iter 5000;
* GeomLoss: ``SamplesLoss("sinkhorn", p=2, blur, scaling, debias=True, backend="tensorized")`` and
  ``v = -n * grad_x``, at scaling 0.8 (the paper's setting) and at the first scaling of
  ``--geomloss-scalings`` whose velocity is within 1e-3 of the reference;
* POT: ``ot.sinkhorn(a, b, M, reg=ε, method="sinkhorn_log")`` on torch tensors with M = ½‖x − y‖², run on
  the cross problem and on the particles' symmetric problem (the velocity needs both), to the engine's
  tolerance: POT stops on the L2 norm of the column-marginal error, so ``stopThr = tol / sqrt(m)``
  guarantees the same L1 bound.

A call whose predicted time exceeds ``--cap-s`` is skipped (or, for the iterative solvers, stopped at
the iteration count that fits the cap) and the table says so.

    python benchmarks/sinkhorn_engine.py --out benchmarks/results/sinkhorn_engine.md
    python benchmarks/sinkhorn_engine.py --quick          # small smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4  # the engine's default tolerance (L1 marginal error)
ACC = 1e-3  # the accuracy bar (relative error of the velocity)


# ----------------------------------------------------------------------------------------------------
# Measurement


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), 0 where absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


class Meter:
    """Wall time and peak-memory rise (MiB) of one call, on CPU (resident set) or CUDA (allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.rss_ok = not self.cuda and os.path.exists("/proc/self/clear_refs")

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif self.rss_ok:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the high-water mark to the current resident set
            base = status_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() - base
        elif self.rss_ok:
            peak = status_kb("VmHWM") * 1024 - base
        else:
            peak = float("nan")
        return out, dt, peak / 2**20


def rel_err(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v.double() - ref.double()).norm() / ref.double().norm())


# ----------------------------------------------------------------------------------------------------
# Solvers: each returns (velocity, info string)


def run_engine(x, y, blur, **kw):
    from torchcfm_nsgf import SinkhornConvergenceWarning, sinkhorn_solve

    kw.setdefault("tol", TOL)
    kw.setdefault("max_iter", 5000)
    kw.setdefault("backend", "dense")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        sol = sinkhorn_solve(x, y, blur=blur, **kw)
    return sol.velocity, sol


def run_geomloss(x, y, blur, scaling):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, backend="tensorized")
    xs = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xs, y), xs)
    return -len(x) * grad, None


def _pot_projection(pts_x, pts_y, reg, tol, max_iter):
    import ot

    a = torch.full((len(pts_x),), 1.0 / len(pts_x), dtype=pts_x.dtype, device=pts_x.device)
    b = torch.full((len(pts_y),), 1.0 / len(pts_y), dtype=pts_x.dtype, device=pts_x.device)
    M = 0.5 * ot.dist(pts_x, pts_y)
    P, log = ot.sinkhorn(
        a,
        b,
        M,
        reg,
        method="sinkhorn_log",
        numItermax=max_iter,
        stopThr=tol / math.sqrt(len(pts_y)),
        log=True,
        warn=False,
    )
    return (P @ pts_y) / P.sum(1, keepdim=True), log


def run_pot(x, y, blur, max_iter):
    n = len(x)
    xf, yf = x.reshape(n, -1), y.reshape(len(y), -1)
    proj_y, log_xy = _pot_projection(xf, yf, blur**2, TOL, max_iter)
    proj_x, log_xx = _pot_projection(xf, xf, blur**2, TOL, max_iter)
    err = max(float(log_xy["err"][-1]), float(log_xx["err"][-1])) if log_xy["err"] else float("nan")
    return (proj_y - proj_x).reshape(x.shape), (int(log_xy["niter"]) + 1, int(log_xx["niter"]) + 1, err)


# ----------------------------------------------------------------------------------------------------
# Data


def make_data(n, d, blur_kind, seed, device):
    g = torch.Generator().manual_seed(seed)
    if d == 2:
        from torchcfm_nsgf.datasets import get_task

        task = get_task("8gaussians-moons")
        x, y = task.source(n, g), task.target(n, g)
    else:
        x = torch.randn(n, d, generator=g)  # the flow's noise source
        y = torch.rand(n, d, generator=g) * 2 - 1  # "images": pixels uniform in [-1, 1]
    return x.to(device), y.to(device)


def reference(x, y, blur, cap_s):
    """Float64 engine at tol 1e-10, continued by warm starts until converged or cap_s ran out."""
    x64, y64 = x.double(), y.double()
    t0 = time.perf_counter()
    sol = None
    chunk = 200
    while True:
        _, sol = run_engine(
            x64, y64, blur, tol=1e-10, max_iter=chunk, warm_start=sol, check_every=10, adapt_omega=True
        )
        if sol.converged or time.perf_counter() - t0 > cap_s:
            break
        chunk = min(chunk * 2, 5000)
    return sol.velocity, sol.marginal_error, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# One configuration


@dataclass
class Row:
    label: str
    ref_err: float = float("nan")
    ref_s: float = float("nan")
    res: dict = field(default_factory=dict)  # solver -> dict(t, err, mem, reps, note)
    g_scaling: float | None = None
    g_note: str = ""
    flow: dict = field(default_factory=dict)


def _levels(scaling, eps0, eps):
    return math.ceil(math.log(eps0 / eps) / (-2 * math.log(scaling))) + 2


def bench_config(n, d, blur, args, device, meter):
    label = f"d={d}, n=m={n}, blur={blur:g}"
    print(f"== {label}  (load {os.getloadavg()[0]:.1f})", flush=True)
    x, y = make_data(n, d, blur, args.seed, device)
    row = Row(label)
    v_ref, row.ref_err, row.ref_s = reference(x, y, blur, args.ref_cap_s)
    print(f"   reference: marginal error {row.ref_err:.1e} in {row.ref_s:.1f} s", flush=True)
    if row.ref_err > 1e-6:
        warnings.warn(f"{label}: reference only reached marginal error {row.ref_err:.1e}", stacklevel=1)
    eps = blur**2
    diam2 = float(
        (
            (torch.cat([x, y]).reshape(2 * n, -1).amax(0) - torch.cat([x, y]).reshape(2 * n, -1).amin(0)) ** 2
        ).sum()
    )

    # Pilots: one call each, which also sets the caps of the iterative solvers.
    calls = {}
    # Engine: predict its worst case (annealing + max_iter) from a short run; stop it at the cap if needed.
    (_, sol), t_short, _ = meter(lambda: run_engine(x, y, blur, max_iter=20))
    per_it = t_short / (sol.n_anneal + sol.n_iter)
    eng_kw, note = {}, ""
    if per_it * (sol.n_anneal + 5000) > args.cap_s:
        eng_kw = dict(max_iter=max(20, int(args.cap_s / per_it) - sol.n_anneal))
    (v, sol), t, mem = meter(lambda: run_engine(x, y, blur, **eng_kw))
    if not sol.converged:
        note = f"stopped at {sol.n_iter} it ({'cap' if eng_kw else 'max_iter'}), not converged"
    calls["engine"] = dict(
        fn=lambda: run_engine(x, y, blur, **eng_kw),
        t=[t],
        mem=mem,
        err=rel_err(v, v_ref),
        note=note,
        info=f"{sol.n_anneal}+{sol.n_iter} it, marg {sol.marginal_error:.0e}",
    )
    (v, _), t, mem = meter(lambda: run_geomloss(x, y, blur, 0.8))
    calls["geomloss 0.8"] = dict(
        fn=lambda: run_geomloss(x, y, blur, 0.8),
        t=[t],
        mem=mem,
        err=rel_err(v, v_ref),
        note="",
        info=f"{_levels(0.8, diam2, eps)} levels",
    )
    # POT: time a few iterations, then allow what fits in the cap.
    _, t_pilot, _ = meter(lambda: run_pot(x, y, blur, 20))
    pot_iters = int(min(args.pot_max_iter, max(20, args.cap_s / (t_pilot / 20))))
    (v, info), t, mem = meter(lambda: run_pot(x, y, blur, pot_iters))
    pot_note = "" if info[2] <= TOL / math.sqrt(n) else f"stopped at {pot_iters} it (cap), not converged"
    calls["POT"] = dict(
        fn=lambda: run_pot(x, y, blur, pot_iters),
        t=[t],
        mem=mem,
        err=rel_err(v, v_ref),
        note=pot_note,
        info=f"{info[0]}+{info[1]} it",
    )
    print(
        "   pilots: " + ", ".join(f"{k} {c['t'][0]:.2f}s err {c['err']:.1e}" for k, c in calls.items()),
        flush=True,
    )

    # GeomLoss: first scaling that reaches the accuracy bar (predicted from the cost per level).
    row.g_scaling, row.g_note = None, ""
    if calls["geomloss 0.8"]["err"] <= ACC:
        row.g_scaling = 0.8
    else:
        t_level = calls["geomloss 0.8"]["t"][0] / _levels(0.8, diam2, eps)
        best = (0.8, calls["geomloss 0.8"]["err"])
        for s in args.geomloss_scalings:
            pred = t_level * _levels(s, diam2, eps)
            if pred > args.cap_s:
                row.g_note = (
                    f"scaling {s:g} predicted {pred:.0f} s > cap {args.cap_s:.0f} s; "
                    f"best reached: {best[1]:.1e} at {best[0]:g}"
                )
                break
            (v, _), t, mem = meter(lambda s=s: run_geomloss(x, y, blur, s))
            e = rel_err(v, v_ref)
            t_level = t / _levels(s, diam2, eps)
            print(f"   geomloss scaling {s:g}: {t:.2f} s, err {e:.1e}", flush=True)
            best = min(best, (s, e), key=lambda z: z[1])
            if e <= ACC:
                row.g_scaling = s
                calls[f"geomloss {s:g}"] = dict(
                    fn=lambda s=s: run_geomloss(x, y, blur, s),
                    t=[t],
                    mem=mem,
                    err=e,
                    note="",
                    info=f"{_levels(s, diam2, eps)} levels",
                )
                break
        else:
            row.g_note = (
                f"none of {args.geomloss_scalings} reached {ACC:g}; best {best[1]:.1e} at {best[0]:g}"
            )

    # Timed repeats, interleaved across solvers; fewer repeats for calls longer than the budget allows.
    reps = {k: max(1, min(args.repeats, int(args.budget_s / max(c["t"][0], 1e-9)))) for k, c in calls.items()}
    for r in range(1, max(reps.values())):
        for k, c in calls.items():
            if r < reps[k]:
                _, t, mem = meter(c["fn"])
                c["t"].append(t)
                c["mem"] = max(c["mem"], mem)
    for k, c in calls.items():
        row.res[k] = dict(
            t=statistics.median(c["t"]),
            err=c["err"],
            mem=c["mem"],
            reps=len(c["t"]),
            note=c["note"],
            info=c["info"],
        )
        print(
            f"   {k}: {row.res[k]['t']:.3f} s (x{len(c['t'])}), err {c['err']:.1e}, {c['mem']:.0f} MiB "
            f"{c['info']} {c['note']}",
            flush=True,
        )

    eng = calls["engine"]
    if args.no_flow:
        pass
    elif eng["note"] or eng["t"][0] > args.cap_s / 4:
        row.flow = dict(skipped=f"engine cold solve {eng['t'][0]:.0f} s {eng['note']}: 20-step flow not run")
    else:
        row.flow = bench_flow(x, y, blur, row.g_scaling, args, meter, calls)
    return row


def bench_flow(x, y, blur, g_scaling, args, meter, calls):
    """20 Euler steps driven by the warm-started engine; cold engine and GeomLoss timed at sampled steps."""
    eta = args.eta_2d if x.shape[1] == 2 else args.eta_img
    est = {"cold": calls["engine"]["t"][0], "geomloss 0.8": calls["geomloss 0.8"]["t"][0]}
    if g_scaling not in (None, 0.8):
        est[f"geomloss {g_scaling:g}"] = calls[f"geomloss {g_scaling:g}"]["t"][0]
    n_samples = max(1, min(5, int(args.budget_s / max(est.values()))))
    sample_steps = set(np.linspace(0, args.steps - 1, n_samples).round().astype(int).tolist())
    times = {"warm": [], **{k: [] for k in est}}
    iters = []
    sol = None
    for k in range(args.steps):
        (_, sol_new), t, _ = meter(lambda x=x, sol=sol: run_engine(x, y, blur, warm_start=sol))
        if k > 0:  # step 0 has nothing to warm-start from: it is a cold solve
            times["warm"].append(t)
            iters.append(sol_new.n_iter)
        if k in sample_steps:
            _, t, _ = meter(lambda x=x: run_engine(x, y, blur))
            times["cold"].append(t)
            for name in est:
                if name.startswith("geomloss"):
                    _, t, _ = meter(lambda x=x, name=name: run_geomloss(x, y, blur, float(name.split()[1])))
                    times[name].append(t)
        sol = sol_new
        x = x + eta * sol.velocity
    out = {k: statistics.median(v) for k, v in times.items()}
    out["warm_iters"] = statistics.median(iters)
    out["eta"] = eta
    out["n_samples"] = len(times["cold"])
    print("   flow: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Report


def _fmt_t(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def write_report(rows, args, device, header, path):
    L = [header, ""]
    L.append(
        "### One velocity evaluation (cold start), median time / relative error vs float64 / peak memory"
    )
    L.append("")
    L.append(
        "| configuration | reference marginal err (time) | engine | GeomLoss s=0.8 | GeomLoss at ≤1e-3 | POT sinkhorn_log | "
        "engine speed-up vs GeomLoss at ≤1e-3 |"
    )
    L.append("|---|---|---|---|---|---|---|")
    for r in rows:

        def cell(k, r=r):
            c = r.res.get(k)
            if c is None:
                return "–"
            s = f"{_fmt_t(c['t'])} (×{c['reps']}) / {c['err']:.1e} / {c['mem']:.0f} MiB<br>{c['info']}"
            return s + (f"<br>**{c['note']}**" if c["note"] else "")

        if r.g_scaling is None:
            gm, speed = f"**not reached**: {r.g_note}", "GeomLoss never reaches the bar"
        elif r.g_scaling == 0.8:
            gm = "s=0.8 already ≤1e-3"
            speed = f"{r.res['geomloss 0.8']['t'] / r.res['engine']['t']:.1f}x"
        else:
            k = f"geomloss {r.g_scaling:g}"
            gm = f"s={r.g_scaling:g}: " + cell(k)
            speed = f"{r.res[k]['t'] / r.res['engine']['t']:.1f}x"
        eng_ok = r.res["engine"]["err"] <= ACC
        speed += "" if eng_ok else " (engine itself above 1e-3)"
        L.append(
            f"| {r.label} | {r.ref_err:.0e} ({r.ref_s:.0f} s) | {cell('engine')} | {cell('geomloss 0.8')} | {gm} | "
            f"{cell('POT')} | {speed} |"
        )
    if any(r.flow for r in rows):
        L += [
            "",
            f"### Per-step time along a {args.steps}-step Euler flow x ← x + η v (flow driven by the warm-started engine)",
            "",
        ]
        L.append(
            "| configuration | η | warm engine (median it) | cold engine | GeomLoss s=0.8 | GeomLoss at ≤1e-3 | "
            "warm speed-up vs GeomLoss 0.8 | vs GeomLoss at ≤1e-3 |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            f = r.flow
            if not f:
                continue
            if "skipped" in f:
                L.append(f"| {r.label} | – | {f['skipped']} | | | | | |")
                continue
            gk = f"geomloss {r.g_scaling:g}" if r.g_scaling not in (None, 0.8) else None
            g_at = (
                f"{_fmt_t(f[gk])} (s={r.g_scaling:g})"
                if gk
                else ("= s=0.8" if r.g_scaling == 0.8 else "not reached")
            )
            g_ref = f[gk] if gk else (f["geomloss 0.8"] if r.g_scaling == 0.8 else None)
            sp_ref = f"{g_ref / f['warm']:.1f}x" if g_ref else "–"
            L.append(
                f"| {r.label} | {f['eta']:g} | {_fmt_t(f['warm'])} ({f['warm_iters']:.0f}) | {_fmt_t(f['cold'])} | "
                f"{_fmt_t(f['geomloss 0.8'])} | {g_at} | {f['geomloss 0.8'] / f['warm']:.1f}x | "
                f"{sp_ref} |"
            )
        L.append("")
        L.append(
            f"Warm-start times are the median over steps 1..{args.steps - 1}; cold engine and GeomLoss are timed at "
            "the same particles at evenly spaced steps (count in the log; at most 5)."
        )
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    print(f"wrote {path}")


def machine_header(args, argv, device):
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except Exception:  # noqa: BLE001
        model = platform.processor()
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU: {model}, {os.cpu_count()} cores"
    )
    load = os.getloadavg()
    return "\n".join(
        [
            f"## Sinkhorn engine benchmark ({device.type})",
            "",
            f"Command: `python {' '.join(argv)}`",
            "",
            f"Machine: {dev}; torch {torch.__version__} ({torch.get_num_threads()} intra-op threads); "
            f"Python {platform.python_version()}; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
            "(the machine is shared: times are noisy, ratios from interleaved runs are more reliable than absolute values).",
            "",
            f"Cells: median time (× repeats) / relative error of the velocity vs the float64 reference / peak memory "
            f"rise of one call ({'CUDA allocator peak' if device.type == 'cuda' else 'resident-set high-water mark, VmHWM reset before each call'}); "
            f"per-call cap {args.cap_s:.0f} s; accuracy bar {ACC:g}; engine and POT at L1 marginal tolerance {TOL:g}.",
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (n = 128, d = 2 and 784)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sinkhorn_engine.md"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--budget-s", type=float, default=20.0, help="time per solver for repeats (fewer if slower)"
    )
    p.add_argument("--cap-s", type=float, default=60.0, help="skip or stop a call predicted longer than this")
    p.add_argument("--ref-cap-s", type=float, default=90.0)
    p.add_argument("--pot-max-iter", type=int, default=100_000)
    p.add_argument("--geomloss-scalings", type=float, nargs="+", default=[0.9, 0.95, 0.99, 0.995, 0.999])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta-2d", type=float, default=0.02, help="Euler step for d = 2 (the paper's 2-D η)")
    p.add_argument("--eta-img", type=float, default=0.03, help="Euler step for images (the paper's CIFAR η)")
    p.add_argument("--no-flow", action="store_true")
    p.add_argument("--configs", nargs="*", default=None, help="subset as d:n:blur, e.g. 2:256:0.05")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Re-run with freed large buffers returned to the OS, so that per-call peak RSS is measurable.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        configs = [(2, 128, 0.3), (784, 128, 2.0)]
        args.repeats, args.budget_s, args.steps = 3, 2.0, 5
    elif args.configs:
        configs = [(int(a), int(b), float(c)) for a, b, c in (s.split(":") for s in args.configs)]
    else:
        configs = [(d, n, 2.0) for d in (784, 3072) for n in (128, 512)]
        configs += [(2, n, blur) for blur in (0.3, 0.05) for n in (256, 1024, 4096)]
    header = machine_header(args, ["benchmarks/sinkhorn_engine.py", *sys.argv[1:]], device)
    print(header, flush=True)
    meter = Meter(device)
    rows = []
    for d, n, blur in configs:
        rows.append(bench_config(n, d, blur, args, device, meter))
        write_report(rows, args, device, header, args.out)  # keep partial results
    load = os.getloadavg()
    with open(args.out, "a") as fh:
        fh.write(f"\nLoad average at end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n")


if __name__ == "__main__":
    main()
