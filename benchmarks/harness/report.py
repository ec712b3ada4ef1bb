"""Tables of a study's run records (:mod:`harness.runner`): W2 per task, method and NFE over the seeds.

:func:`load_runs` reads every ``*.json`` record of one or more folders (a study run in shards, or on several
machines, is merged by naming all its folders; a run present twice counts once). :func:`summarise` gives, per
(task, method, NFE), the W2 of every seed; :func:`study_tables` writes the markdown: one overview table
(mean over seeds, lowest per task in bold, the floor beside it) and one table per task with mean ± std,
seeds, training seconds and steps. With snapshots, :func:`curve_table` gives W2 against training time.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from torchcfm_nsgf.datasets import TASKS

from .methods import METHODS, label_of

__all__ = ["curve_table", "fmt", "load_runs", "summarise", "study_tables"]


def load_runs(folders: Iterable[str | Path]) -> list[dict]:
    """Every run record (``*.json``) of ``folders``, one per (task, method, seed), in a stable order."""
    runs: dict[tuple, dict] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no study folder {str(folder)!r}")
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text())
            runs[record["task"], record["method"], record["seed"]] = record
    return [runs[k] for k in sorted(runs, key=lambda k: (_task_order(k[0]), k[1], k[2]))]


def _task_order(task: str) -> int:
    return list(TASKS).index(task) if task in TASKS else len(TASKS)


def fmt(values: list[float]) -> str:
    """``mean ± std`` (sample std) of ``values``, ``mean`` alone for one value, ``–`` for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(runs: list[dict]) -> dict[tuple[str, str, int], dict[int, float]]:
    """``{(task, method, nfe): {seed: W2}}`` at the end of each run, for the NFEs the run was scored at."""
    out: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in runs:
        for nfe, value in r["w2"].items():
            out.setdefault((r["task"], r["method"], int(nfe)), {})[r["seed"]] = value
    return out


def _columns(runs: list[dict]) -> list[tuple[str, int]]:
    """(method, NFE) in the order the runs name them."""
    seen: dict[tuple[str, int], None] = {}
    for r in runs:
        for nfe in r["w2"]:
            seen[r["method"], int(nfe)] = None
    return list(seen)


def study_tables(runs: list[dict], *, title: str = "2D study") -> list[str]:
    """Markdown lines: the overview (task x method@NFE, mean W2 over seeds) and one table per task."""
    if not runs:
        raise ValueError("no run records to report")
    table = summarise(runs)
    columns = sorted(_columns(runs), key=lambda c: (_method_order(runs, c[0]), c[1]))
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    floors = {t: statistics.fmean(r["floor"] for r in runs if r["task"] == t) for t in tasks}
    cfg = runs[0]["config"]
    budget = (
        f"{cfg['train_steps']} optimiser steps"
        if cfg["train_steps"] is not None
        else f"{cfg['time_budget_s']:g} s of {cfg['clock']} time"
    )
    ema = f"EMA {cfg['ema']:g} weights" if cfg.get("ema") else "last weights"
    lines = [
        f"# {title}: W2 at each method's NFEs",
        "",
        f"Every run: {budget}, MLP width {cfg['width']}, batch {cfg['batch_size']}, Adam {cfg['lr']:g}, {ema}. "
        "W2: exact (POT `emd2`) between generated points (Euler) and as many fresh target points; mean over "
        "seeds (bold: lowest of the row); floor: W2 between two target draws.",
        "",
        "| task | floor | " + " | ".join(f"{label_of(m)} @{n}" for m, n in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for task in tasks:
        means = {c: statistics.fmean(v.values()) for c in columns if (v := table.get((task, *c)))}
        best = min(means.values()) if means else math.nan
        cells = [
            "–" if c not in means else (f"**{means[c]:.3f}**" if means[c] == best else f"{means[c]:.3f}")
            for c in columns
        ]
        lines.append(f"| {task} | {floors[task]:.3f} | " + " | ".join(cells) + " |")
    for task in tasks:
        label = TASKS[task].label if task in TASKS else task
        lines += [
            "",
            f"## {label} (floor {floors[task]:.3f})",
            "",
            "| method | NFE | W2 | seeds | train s (clock) | steps |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, nfe in columns:
            values = table.get((task, method, nfe))
            if not values:
                continue
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            seconds = statistics.fmean(r["train_time_s"] for r in rs)
            steps = statistics.fmean(r["steps"] or 0 for r in rs)
            lines.append(
                f"| {label_of(method)} | {nfe} | {fmt([values[s] for s in sorted(values)])} | {len(values)} | "
                f"{seconds:.1f} ({rs[0]['clock']}) | {steps:.0f} |"
            )
    return lines


def _method_order(runs: list[dict], method: str) -> tuple[int, str]:
    """Registry order (family members after the registered names, by name)."""
    order = list(METHODS)
    return (order.index(method), "") if method in order else (len(order), method)


def curve_table(runs: list[dict], nfe: int) -> list[str]:
    """Markdown: per (task, method, seed), W2 at ``nfe`` at each snapshot, as ``steps (CPU s): W2``."""
    lines = [
        f"| task | method | seed | W2 at NFE {nfe} along training: steps (CPU s): W2 |",
        "|---|---|---:|---|",
    ]
    for r in runs:
        points = [
            f"{e['steps']} ({e['cpu_s']:.0f} s): {e['w2'][str(nfe)]:.3f}"
            for e in r["evaluations"]
            if str(nfe) in e["w2"]
        ]
        if points:
            lines.append(
                f"| {r['task']} | {label_of(r['method'])} | {r['seed']} | " + "; ".join(points) + " |"
            )
    return lines
