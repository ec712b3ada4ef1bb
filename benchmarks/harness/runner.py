r"""Run a study: train method M on task T for seed s within one budget, score at its NFEs, one JSON per run.

A study is a list of :class:`RunSpec` (task, method, seed, NFEs) and one :class:`~harness.methods.BenchConfig`.
:func:`run_study` trains each run (``METHODS[method](task, config, seed)``), scores the returned sampler, and
every snapshot it holds, by exact W2 (POT ``emd2``, :func:`torchcfm_nsgf.metrics.w2`) between the samples of a
fixed set of source points and as many fresh target points (:class:`EvalSet`) at each NFE (Euler), and writes
the run's record to ``out_dir/<task>_<method>_seed<s>.json`` as it finishes (atomically). A run whose JSON
exists is skipped, and a run is *claimed* first (a lock on a ``.claim`` file, see :func:`claim`), so several
processes can share one job list and an interrupted study resumes where it stopped (the claim of a process
that is gone is free). ``shard=(i, n)`` keeps every n-th job from the i-th.

The record (:data:`SCHEMA` lists its keys): the run's identity and settings, ``w2`` and ``nfe_used`` at the
end (keys are NFEs as strings), ``steps``, ``train_time_s`` (on the budget's clock), ``cpu_s`` and ``wall_s``,
the two-sample ``floor`` W2(target, target), and ``evaluations``: one entry per snapshot (or one, at the end)
with ``steps``, ``cpu_s``, ``wall_s`` and ``w2``.

A spec with its own scoring (per class, on total-NFE grids, of a simulated flow) gives
``RunSpec.evaluate(sampler, task, seed) -> dict``: the runner then trains as usual, draws no
:class:`EvalSet`, and merges that dict into the record in place of its own scores (``w2``, ``nfe_used`` and
``floor`` are whatever the dict holds, ``{}``/``None`` if it holds none). Resuming, claims and shards are
the same.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from torchcfm_nsgf.datasets import TASKS, get_task
from torchcfm_nsgf.metrics import w2

from .methods import NFES_OF, BenchConfig, NotApplicable, clear_caches, label_of, method_fn

__all__ = [
    "SCHEMA",
    "EvalSet",
    "RunSpec",
    "claim",
    "release",
    "evaluate",
    "evaluate_snapshots",
    "parse_methods",
    "run_file",
    "run_one",
    "run_study",
    "study_jobs",
]

#: The keys of a run's record.
SCHEMA = (
    "task",
    "method",
    "label",
    "seed",
    "nfes",
    "config",
    "w2",
    "nfe_used",
    "steps",
    "train_time_s",
    "cpu_s",
    "wall_s",
    "clock",
    "floor",
    "evaluations",
    "machine",
    "torch",
    "finished",
)


@dataclass(frozen=True)
class RunSpec:
    """One run: ``method`` (a registered name) on ``task`` with ``seed``, scored at ``nfes``; or, with
    ``evaluate``, scored by ``evaluate(sampler, task, seed)`` (a dict of JSON values merged into the record)."""

    task: str
    method: str
    seed: int
    nfes: tuple[int, ...]
    evaluate: Callable[..., dict] | None = field(default=None, compare=False, repr=False)


def parse_methods(specs: Iterable[str], default_nfes: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``["nsgf@1,2", "drift", ...]`` -> ``[("nsgf", (1, 2)), ("drift", NFES_OF["drift"] or default)]``;
    every name must be registered."""
    out = []
    for spec in specs:
        name, sep, nfes = spec.partition("@")
        method_fn(name)  # raises on an unknown name
        if sep:
            try:
                chosen = tuple(int(n) for n in nfes.split(","))
            except ValueError:
                raise ValueError(
                    f"method spec {spec!r}: NFEs after '@' must be integers, e.g. nsgf@1,2"
                ) from None
        else:
            chosen = NFES_OF.get(name, default_nfes)
        out.append((name, chosen))
    return out


def study_jobs(
    tasks: Iterable[str], methods: list[tuple[str, tuple[int, ...]]], seeds: Iterable[int]
) -> list[RunSpec]:
    """Seeds outermost, then tasks, then methods: a study cut short has whole comparisons."""
    return [RunSpec(t, m, s, nfes) for s in seeds for t in tasks for m, nfes in methods]


@dataclass
class EvalSet:
    """The points a run is scored on: source points ``x0`` (n, 2), fresh targets (n, 2) and the floor."""

    x0: torch.Tensor
    target: torch.Tensor
    floor: float

    @classmethod
    def draw(cls, task_name: str, seed: int, n: int = 2000, offset: int = 10_000) -> EvalSet:
        """From a generator of ``offset + seed``: ``n`` source points, ``n`` targets, and the floor against a
        third draw of ``n`` targets."""
        task = get_task(task_name)
        if task_name not in TASKS:
            raise ValueError(
                f"task {task_name!r} is class-conditional: score it per class (two_dim_conditional.py)"
            )
        g = torch.Generator().manual_seed(offset + seed)
        x0, target = task.source(n, g), task.target(n, g)
        return cls(x0, target, w2(task.target(n, g), target))


def evaluate(sampler, x0: torch.Tensor, target: torch.Tensor, nfes: Iterable[int]) -> tuple[dict, dict]:
    """W2 of ``sampler.sample(x0, nfe, "euler")`` against ``target`` and the NFE it used, keyed by NFE."""
    scores, used = {}, {}
    for nfe in nfes:
        with torch.no_grad():
            samples, n_used = sampler.sample(x0, nfe, "euler")
        scores[str(nfe)], used[str(nfe)] = w2(samples, target), n_used
    return scores, used


def evaluate_snapshots(sampler, x0: torch.Tensor, target: torch.Tensor, nfes: Iterable[int]) -> list[dict]:
    """For each snapshot of ``sampler`` (none: an empty list): its ``steps``, ``cpu_s``, ``wall_s``, ``loss``,
    matcher counters and ``w2`` at ``nfes`` (:func:`evaluate`)."""
    return [
        dict(
            steps=s.steps,
            cpu_s=s.cpu_s,
            wall_s=s.wall_s,
            loss=s.loss,
            **s.stats,
            w2=evaluate(s, x0, target, nfes)[0],
        )
        for s in getattr(sampler, "snapshots", [])
    ]


def run_one(spec: RunSpec, config: BenchConfig, evals: EvalSet | None) -> dict:
    """Train and score one run; its record (:data:`SCHEMA`). Raises :class:`NotApplicable` where it does not
    apply. ``evals`` is unused (may be None) where ``spec.evaluate`` scores the run."""
    task = get_task(spec.task)
    sampler = method_fn(spec.method)(task, config, spec.seed)
    own: dict = {}
    if spec.evaluate is not None:
        own = spec.evaluate(sampler, task, spec.seed)
        scores, used, evaluations = own.get("w2", {}), own.get("nfe_used", {}), []
        floor = own.get("floor")
    elif evals is None:
        raise ValueError(f"run {spec}: evals is None and the spec has no evaluate of its own")
    else:
        scores, used = evaluate(sampler, evals.x0, evals.target, spec.nfes)
        evaluations = evaluate_snapshots(sampler, evals.x0, evals.target, spec.nfes)
        floor = evals.floor
    steps = getattr(sampler, "n_opt_steps", None)
    cpu_s = getattr(sampler, "cpu_s", sampler.train_time_s if config.clock == "cpu" else None)
    wall_s = getattr(sampler, "wall_s", sampler.train_time_s if config.clock == "wall" else None)
    if not evaluations:
        evaluations = [dict(steps=steps, cpu_s=cpu_s, wall_s=wall_s, w2=scores)]
    record = dict(
        task=spec.task,
        method=spec.method,
        label=label_of(spec.method),
        seed=spec.seed,
        nfes=list(spec.nfes),
        config=asdict(config),
        w2=scores,
        nfe_used=used,
        steps=steps,
        train_time_s=sampler.train_time_s,
        cpu_s=cpu_s,
        wall_s=wall_s,
        clock=config.clock,
        floor=floor,
        evaluations=evaluations,
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    record.update(own)
    return record


def run_file(out_dir: Path, task: str, method: str, seed: int) -> Path:
    """``out_dir/<task>_<method>_seed<seed>.json`` (``:`` in a family name written ``-``)."""
    return Path(out_dir) / f"{task}_{method.replace(':', '-')}_seed{seed}.json"


_HELD: dict[Path, int] = {}  # the claims this process holds: their open, locked file descriptors


def claim(path: Path) -> bool:
    """Hold ``path`` for this process unless a live process holds it; True if this process now does.

    A claim is an exclusive lock (``flock``) on the file, which the system drops when its process ends: a claim
    of a process that is gone is free, and two processes can never both take one (a take-over by reading a
    process id and removing the file could race). The file holds the holder's process id for people reading
    the folder. POSIX only; give it back with :func:`release`.
    """
    import fcntl  # POSIX: imported here so that the harness imports everywhere

    path = Path(path)
    if path in _HELD:
        return False  # this process holds it already: one holder, one run
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its holder released it between our open and our lock: claim the path anew
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[path] = fd
    return True


def release(path: Path) -> None:
    """Give back a claim this process holds (the file goes, then the lock); nothing if it holds none."""
    fd = _HELD.pop(Path(path), None)
    if fd is not None:
        Path(path).unlink(missing_ok=True)
        os.close(fd)


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: a reader never sees half a record."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_study(
    jobs: list[RunSpec],
    config: BenchConfig,
    out_dir: Path | str | None,
    *,
    shard: tuple[int, int] = (0, 1),
    n_eval: int = 2000,
    eval_set: Callable[[str, int], EvalSet] | None = None,
    extra: dict | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run ``jobs[shard[0]::shard[1]]``: skip finished or claimed runs, write each record as it finishes.

    ``eval_set(task, seed)`` gives the scoring points (default :meth:`EvalSet.draw` with ``n_eval``); ``extra``
    is merged into every record (e.g. the command line). Returns the records written by this call; a
    method that does not apply to a task (:class:`NotApplicable`) writes nothing.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    eval_set = eval_set or (lambda task, seed: EvalSet.draw(task, seed, n_eval))
    cache: dict[tuple[str, int], EvalSet | None] = {}
    records = []
    for spec in jobs[index::count]:
        path = held = None
        if out is not None:
            path = run_file(out, spec.task, spec.method, spec.seed)
            held = path.with_suffix(".claim")
            if path.exists() or not claim(held):
                continue
        try:
            key = (spec.task, spec.seed)
            if key not in cache:
                cache.clear()
                clear_caches()
                cache[key] = None if spec.evaluate is not None else eval_set(spec.task, spec.seed)
            elif cache[key] is None and spec.evaluate is None:
                cache[key] = eval_set(spec.task, spec.seed)
            try:
                record = run_one(spec, config, cache[key])
            except NotApplicable:
                continue
            record.update(extra or {})
            records.append(record)
            if path is not None:
                write_json(path, record)
            if on_record is not None:
                on_record(record)
        finally:
            if held is not None:
                release(held)
    return records
