"""The one benchmark harness: train method M on task T within budget B, score at NFEs, one JSON per run, report.

* :mod:`.loop` — torchcfm's training loop for any matcher, a step count or a CPU/wall-time budget, EMA
  weights, snapshots for curves;
* :mod:`.methods` — the 2D methods by name (``METHODS``, ``register``, ``BenchConfig``);
* :mod:`.runner` — a study as a list of runs: resumable, claimable, shardable, one JSON record per run;
* :mod:`.report` — the tables of a study's records;
* :mod:`.images` — the MNIST scorer (classifier FID, precision and recall) and the CPU-time curves of the
  image loop.

Scripts in ``benchmarks/`` import it as ``harness`` (their own folder is on ``sys.path``).
"""

from .loop import (
    EMA,
    Sampler,
    Snapshot,
    StepClock,
    TrainedField,
    make_conditional_model,
    make_model,
    train_flow_matching,
)
from .methods import (
    LABELS,
    METHODS,
    NFES_OF,
    BenchConfig,
    NotApplicable,
    label_of,
    lazy,
    method_fn,
    register,
    register_family,
    train_nsgf,
    train_nsgfpp,
)
from .report import load_runs, study_tables, summarise
from .runner import EvalSet, RunSpec, claim, parse_methods, release, run_file, run_one, run_study, study_jobs

__all__ = [
    "EMA",
    "LABELS",
    "METHODS",
    "NFES_OF",
    "BenchConfig",
    "EvalSet",
    "NotApplicable",
    "RunSpec",
    "Sampler",
    "Snapshot",
    "StepClock",
    "TrainedField",
    "claim",
    "release",
    "label_of",
    "lazy",
    "load_runs",
    "make_conditional_model",
    "make_model",
    "method_fn",
    "parse_methods",
    "register",
    "register_family",
    "run_file",
    "run_one",
    "run_study",
    "study_jobs",
    "study_tables",
    "summarise",
    "train_flow_matching",
    "train_nsgf",
    "train_nsgfpp",
]
