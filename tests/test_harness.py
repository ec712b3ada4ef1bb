"""The benchmark harness (benchmarks/harness): budgets, EMA, snapshots, the resumable runner, the report."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import (  # noqa: E402
    METHODS,
    BenchConfig,
    EvalSet,
    RunSpec,
    claim,
    load_runs,
    make_model,
    parse_methods,
    register,
    release,
    run_file,
    run_study,
    study_jobs,
    study_tables,
    summarise,
    train_flow_matching,
)
from harness.methods import LABELS, NFES_OF, lazy, method_fn  # noqa: E402
from harness.runner import SCHEMA  # noqa: E402
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher  # noqa: E402

from torchcfm_nsgf.datasets import get_task  # noqa: E402
from torchcfm_nsgf.metrics import w2  # noqa: E402

SMALL = dict(batch_size=32, width=16, reflow_pairs=200)


def _small_eval(task: str, seed: int) -> EvalSet:
    return EvalSet.draw(task, seed, n=64)


def _batches(seed: int):
    task = get_task("gaussian-moons")
    g = torch.Generator().manual_seed(seed)
    return lambda n: (task.source(n, g), task.target(n, g))


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---------------------------------------------------------------------------------------------- the loop
def test_cpu_budget_stops_training_once_its_cpu_seconds_are_spent() -> None:
    torch.manual_seed(0)
    before = time.process_time()
    trained = train_flow_matching(
        make_model(16),
        ConditionalFlowMatcher(sigma=0.0),
        _batches(0),
        train_steps=None,
        time_budget_s=0.3,
        clock="cpu",
        batch_size=32,
    )
    spent = time.process_time() - before
    per_step = trained.cpu_s / trained.n_opt_steps
    assert trained.n_opt_steps > 1
    assert trained.train_time_s == trained.cpu_s
    assert 0.3 <= trained.cpu_s <= 0.3 + per_step + 0.05  # stops at the first step past the budget
    assert trained.cpu_s <= spent + 1e-3  # only the training is timed


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_weights_are_the_exponential_average_of_the_iterates(warmup: bool) -> None:
    # Reference: the iterates theta_0, theta_1, theta_2 of the same seeded run without EMA (snapshots), averaged
    # by hand: decay d_k = 0.5, or with the warm-up d_k = min(0.5, (1 + k) / (10 + k)) = 0.1, 2/11.
    torch.manual_seed(0)
    model = make_model(8)
    theta0 = _params(model)
    plain = train_flow_matching(
        model, ConditionalFlowMatcher(sigma=0.0), _batches(1), train_steps=2, snapshot_every=1, batch_size=16
    )
    theta1, theta2 = (_params(s.field.model) for s in plain.snapshots)
    torch.manual_seed(0)
    averaged = train_flow_matching(
        make_model(8),
        ConditionalFlowMatcher(sigma=0.0),
        _batches(1),
        train_steps=2,
        ema=0.5,
        ema_warmup=warmup,
        batch_size=16,
    )
    d0, d1 = (0.1, 2 / 11) if warmup else (0.5, 0.5)
    for got, a, b, c in zip(averaged.field.model.parameters(), theta0, theta1, theta2, strict=True):
        torch.testing.assert_close(got, d1 * (d0 * a + (1 - d0) * b) + (1 - d1) * c)
    for got, c in zip(averaged.last.model.parameters(), theta2, strict=True):
        torch.testing.assert_close(got, c)  # the last weights are kept beside the EMA


def test_snapshots_every_k_steps_and_at_the_end_with_growing_times() -> None:
    torch.manual_seed(0)
    trained = train_flow_matching(
        make_model(8),
        ConditionalFlowMatcher(sigma=0.0),
        _batches(2),
        train_steps=7,
        snapshot_every=3,
        batch_size=16,
    )
    assert [s.steps for s in trained.snapshots] == [3, 6, 7]
    cpu = [s.cpu_s for s in trained.snapshots]
    assert cpu == sorted(cpu) and cpu[-1] == trained.cpu_s
    last = trained.snapshots[-1].field.model
    for a, b in zip(last.parameters(), trained.field.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bench_config_needs_exactly_one_stop_rule() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        BenchConfig(train_steps=None)
    with pytest.raises(ValueError, match="exactly one"):
        BenchConfig(train_steps=5, time_budget_s=1.0)
    with pytest.raises(ValueError, match="time_budget_s must be > 0"):
        BenchConfig(train_steps=None, time_budget_s=0.0)
    with pytest.raises(ValueError, match="clock"):
        train_flow_matching(make_model(8), None, _batches(0), train_steps=1, clock="gpu")


# ---------------------------------------------------------------------------------------------- registry
def test_method_specs_name_their_nfes_and_unknown_names_raise() -> None:
    assert parse_methods(["nsgf@1,2", "otcfm", "nsgf:1024@2"], (1, 2, 10)) == [
        ("nsgf", (1, 2)),
        ("otcfm", (1, 2, 10)),
        ("nsgf:1024", (2,)),
    ]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_methods(["nope@1"], (1,))
    with pytest.raises(ValueError, match="integers"):
        parse_methods(["nsgf@one"], (1,))


def test_a_method_of_another_module_plugs_in_with_one_registration(tmp_path: Path, monkeypatch) -> None:
    # A benchmarks module defining fn(task, config, seed) -> Sampler, registered lazily by one line.
    (tmp_path / "plug_in_method.py").write_text(
        "import torch\n"
        "class Fixed:\n"
        "    train_time_s = 0.0\n"
        "    def sample(self, x0, nfe, solver='euler'):\n"
        "        return x0 + 1.0, 1\n"
        "def train_fixed(task, config, seed):\n"
        "    return Fixed()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register("fixed", "shift by one", nfes=(1,))(lazy("plug_in_method", "train_fixed"))
    try:
        assert parse_methods(["fixed"], (1, 2)) == [("fixed", (1,))]
        config = BenchConfig(train_steps=1, **SMALL)
        (record,) = run_study(
            study_jobs(["gaussian-moons"], [("fixed", (1,))], [0]), config, None, eval_set=_small_eval
        )
        evals = _small_eval("gaussian-moons", 0)
        assert record["w2"]["1"] == pytest.approx(w2(evals.x0 + 1.0, evals.target))
        assert record["label"] == "shift by one"
    finally:
        METHODS.pop("fixed", None)
        LABELS.pop("fixed", None)
        NFES_OF.pop("fixed", None)


# ---------------------------------------------------------------------------------------------- runner
def _study(out: Path, shard=(0, 1), methods=(("otcfm", (1, 2)), ("nsgf", (1,)))) -> list[dict]:
    config = BenchConfig(train_steps=4, **SMALL)
    jobs = study_jobs(["gaussian-moons", "8gaussians-moons"], list(methods), [0])
    return run_study(jobs, config, out, shard=shard, eval_set=_small_eval)


def test_run_record_schema_and_scores_recomputed_independently(tmp_path: Path) -> None:
    config = BenchConfig(train_steps=4, ema=0.9, **SMALL)
    (record,) = run_study(
        [RunSpec("gaussian-moons", "icfm", 3, (1, 3))], config, tmp_path, eval_set=_small_eval
    )
    on_disk = json.loads(run_file(tmp_path, "gaussian-moons", "icfm", 3).read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert set(SCHEMA) <= set(on_disk)
    assert on_disk["config"]["ema"] == 0.9 and on_disk["steps"] == 4 and on_disk["nfes"] == [1, 3]
    assert set(on_disk["w2"]) == {"1", "3"} and on_disk["nfe_used"] == {"1": 1, "3": 3}
    assert on_disk["evaluations"][-1]["w2"] == on_disk["w2"]
    # the same seeded run, trained again outside the runner and scored by hand
    trained = method_fn("icfm")(get_task("gaussian-moons"), config, 3)
    evals = _small_eval("gaussian-moons", 3)
    with torch.no_grad():
        x = evals.x0.clone()
        for i in range(3):  # Euler, written out
            t = torch.full((len(x), 1), i / 3)
            x = x + trained.field.model(torch.cat([x, t], 1)) / 3
    assert on_disk["w2"]["3"] == pytest.approx(w2(x, evals.target), rel=1e-5)


def test_resume_skips_finished_and_claimed_runs_and_takes_over_stale_claims(tmp_path: Path) -> None:
    first = _study(tmp_path)
    assert len(first) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert _study(tmp_path) == []  # every run is finished
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == stamps
    # A run claimed by a live process is left to it; the claim file of a process that is gone is free.
    alive = run_file(tmp_path, "gaussian-moons", "icfm", 0).with_suffix(".claim")
    holder = _hold_claim(alive)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = run_file(tmp_path, "8gaussians-moons", "icfm", 0).with_suffix(".claim")
    stale.write_text(str(gone.pid))
    try:
        done = _study(tmp_path, methods=(("otcfm", (1, 2)), ("nsgf", (1,)), ("icfm", (1,))))
        assert [(r["task"], r["method"]) for r in done] == [("8gaussians-moons", "icfm")]
        assert alive.exists() and not stale.exists()
    finally:
        holder.kill()
        holder.wait()


def _hold_claim(path: Path) -> subprocess.Popen:
    """A process that claims ``path`` and sleeps; returns once it holds the claim."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from harness.runner import claim; assert claim(Path(sys.argv[2])); print('held', flush=True); "
        "time.sleep(60)"
    )
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    proc = subprocess.Popen([sys.executable, "-c", code, bench, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_claim_has_one_holder_and_is_free_once_its_process_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "run.claim"
    assert claim(path) and path.read_text() == str(os.getpid())
    assert not claim(path)  # held: by this process too
    release(path)
    assert not path.exists()
    release(path)  # not held: nothing happens
    holder = _hold_claim(path)
    try:
        assert path.read_text() == str(holder.pid) and not claim(path)
        holder.kill()  # no clean-up: the file stays, the lock goes with the process
        holder.wait()
        assert path.exists() and claim(path) and path.read_text() == str(os.getpid())
    finally:
        release(path)
        holder.kill()
        holder.wait()


def test_a_claim_released_between_open_and_lock_is_taken_on_the_new_file(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    path = tmp_path / "run.claim"
    other = os.open(path, os.O_CREAT | os.O_RDWR)  # another holder's claim
    fcntl.flock(other, fcntl.LOCK_EX)
    real_flock, calls = fcntl.flock, []

    def released_meanwhile(fd, op):
        if not calls:  # the holder releases (removes the file, then unlocks) after our open, before our lock
            path.unlink()
            os.close(other)
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", released_meanwhile)
    try:
        assert claim(path)  # the lock on the removed file is not the claim: it locks the new file
        assert len(calls) == 2 and path.exists() and path.read_text() == str(os.getpid())
    finally:
        release(path)


class _Shift:
    """A sampler that moves every point by +1 (with a label: by +1 + label)."""

    train_time_s = 0.0

    def sample(self, x0, nfe, solver="euler", y=None):
        return x0 + 1.0 + (0.0 if y is None else y[:, None].to(x0.dtype)), nfe


def _per_class_w2(sampler, task, seed: int) -> dict:
    """A spec's own scoring: W2 per class of the shifted source against that class's targets."""
    g = torch.Generator().manual_seed(seed)
    x, y = task.target(400, g)
    x0 = task.source(len(x), g)
    moved, _ = sampler.sample(x0, 1, y=y)
    per_class = [w2(moved[y == c], x[y == c]) for c in range(task.num_classes)]
    return {"per_class": per_class, "w2": {"1": sum(per_class) / len(per_class)}, "note": "own scoring"}


def test_a_spec_with_its_own_evaluation_writes_its_fields_and_resumes(tmp_path: Path) -> None:
    register("shift", "shift by one")(lambda task, config, seed: _Shift())
    try:
        task = "gaussian-8gaussians-conditional"  # class-conditional: no EvalSet can be drawn for it
        jobs = [RunSpec(task, "shift", seed, (1,), evaluate=_per_class_w2) for seed in (0, 1)]
        config = BenchConfig(train_steps=1, **SMALL)
        first = run_study(jobs, config, tmp_path)
        assert [r["seed"] for r in first] == [0, 1]
        on_disk = json.loads(run_file(tmp_path, task, "shift", 1).read_text())
        assert set(SCHEMA) <= set(on_disk) and on_disk["note"] == "own scoring"
        assert on_disk["floor"] is None and on_disk["nfe_used"] == {}
        assert on_disk["evaluations"][-1]["w2"] == on_disk["w2"]
        # the per-class scores, recomputed by hand from the same draws
        t = get_task(task)
        g = torch.Generator().manual_seed(1)
        x, y = t.target(400, g)
        x0 = t.source(len(x), g) + 1.0 + y[:, None].float()
        expected = [w2(x0[y == c], x[y == c]) for c in range(8)]
        assert on_disk["per_class"] == pytest.approx(expected)
        assert on_disk["w2"]["1"] == pytest.approx(sum(expected) / 8)
        # resume: both runs are finished, nothing is rewritten; a spec keeps its identity without evaluate
        stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
        assert run_study(jobs, config, tmp_path) == []
        assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == stamps
        assert jobs[0] == RunSpec(task, "shift", 0, (1,))
        with pytest.raises(ValueError, match="class-conditional"):
            run_study([RunSpec(task, "shift", 2, (1,))], config, None)
    finally:
        METHODS.pop("shift", None)
        LABELS.pop("shift", None)


def test_report_of_two_shards_equals_report_of_one(tmp_path: Path) -> None:
    _study(tmp_path / "a", shard=(0, 2))
    _study(tmp_path / "b", shard=(1, 2))
    _study(tmp_path / "one")
    shards = load_runs([tmp_path / "a", tmp_path / "b"])
    whole = load_runs([tmp_path / "one"])
    assert len(shards) == len(whole) == 4
    assert summarise(shards) == summarise(whole)  # same seeds, same scores
    overview = slice(0, 8)  # title, settings, the task x method table: scores only, no times
    assert study_tables(shards)[overview] == study_tables(whole)[overview]
    assert any("**" in line for line in study_tables(whole)[overview])


class _TickClock:
    """A stand-in for the harness's ``time``: every reading advances both clocks by ``tick`` seconds, so a
    timed section costs the same whatever else runs on the machine."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def _read(self) -> float:
        self.now += self.tick
        return self.now

    process_time = perf_counter = _read


def test_two_rf_budget_covers_both_stages_and_the_pairs(monkeypatch) -> None:
    import harness.loop

    # 0.01 s per training step on a clock that ignores the machine's load: 1-RF stops at its half of the
    # budget, and the pairs and the reflow must fit in what is left of the same 0.4 s, not in 0.4 s more.
    monkeypatch.setattr(harness.loop, "time", _TickClock(0.005))
    config = BenchConfig(train_steps=None, time_budget_s=0.4, clock="cpu", **SMALL)
    trained = method_fn("2rf")(get_task("gaussian-moons"), config, 0)
    base = method_fn("1rf")(
        get_task("gaussian-moons"), replace(config, time_budget_s=0.2), 0
    )  # the same 1-RF
    assert 0.2 <= base.train_time_s < 0.2 + 0.011
    assert 0.4 <= trained.train_time_s < 0.4 + 0.011
    # the reflow got the 0.2 s the first stage left, less the pairs' generation: fewer steps than the 1-RF
    assert 10 <= trained.n_opt_steps < base.n_opt_steps


def test_nsgfpp_with_ema_and_a_cpu_budget() -> None:
    config = BenchConfig(train_steps=None, time_budget_s=0.5, clock="cpu", ema=0.9, **SMALL)
    sampler = method_fn("nsgf++")(get_task("gaussian-moons"), config, 0)
    assert sampler.train_time_s >= 0.5 and sampler.n_opt_steps >= 1
    last = copy.deepcopy(sampler.model.nets.state_dict())
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    ema_samples, used = sampler.sample(x0, 1)
    for k, v in sampler.model.nets.state_dict().items():
        assert torch.equal(v, last[k]), k  # sampling the EMA leaves the trained weights in place
    plain = type(sampler)(sampler.model, sampler.train_time_s, sampler.n_opt_steps)
    assert used == plain.sample(x0, 1)[1]
    if sampler.n_opt_steps > 1:
        assert not torch.equal(ema_samples, plain.sample(x0, 1)[0])


def test_study_command_runs_resumes_and_reports(tmp_path: Path, capsys) -> None:
    import study

    argv = [
        "--tasks",
        "gaussian-moons",
        "--methods",
        "otcfm@1,2",
        "2rf@1",
        "--seeds",
        "2",
        "--train-steps",
        "3",
        "--ema",
        "0.9",
        "--width",
        "16",
        "--n-eval",
        "64",
        "--out-dir",
        str(tmp_path / "runs"),
    ]
    study.main(argv)
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.json")) == [
        "gaussian-moons_2rf_seed0.json",
        "gaussian-moons_2rf_seed1.json",
        "gaussian-moons_otcfm_seed0.json",
        "gaussian-moons_otcfm_seed1.json",
    ]
    capsys.readouterr()
    study.main(argv)  # every run is finished: nothing is trained again
    assert capsys.readouterr().out == ""
    study.main(["--report", str(tmp_path / "runs"), "--out", str(tmp_path / "study.md")])
    text = (tmp_path / "study.md").read_text()
    runs = load_runs([tmp_path / "runs"])
    mean = sum(r["w2"]["2"] for r in runs if r["method"] == "otcfm") / 2
    assert f"{mean:.3f}" in text and "2-RF (one reflow) @1" in text and "EMA 0.9 weights" in text
    assert all(r["config"]["ema"] == 0.9 and r["steps"] == 3 for r in runs)


def test_study_settings_of_other_modules_reach_the_config_by_name() -> None:
    import study

    args = study.build_parser().parse_args(
        [
            "--budget-s",
            "90",
            "--set",
            "drift.self_term=independent",
            "drift.step_size=0.5",
            "meanflow.ratio=0.25",
        ]
    )
    config = study.config_of(args)
    assert config.train_steps is None and config.time_budget_s == 90 and config.clock == "cpu"
    assert config.drift == {"self_term": "independent", "step_size": 0.5}
    assert config.meanflow == {"ratio": 0.25}
    assert getattr(config, "nothing", None) is None
    with pytest.raises(ValueError, match="KEY.FIELD=VALUE"):
        study.extra_settings(["step_size=0.5"])
