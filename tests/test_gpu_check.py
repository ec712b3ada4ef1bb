"""The one-command GPU check (benchmarks/gpu_check.py): its --smoke run on the CPU writes every part, the
part that needs MNIST is skipped with a message when the data is missing, and the time guard writes what
there is before it stops the process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _env import ROOT, pythonpath
from _fake_datasets import write_fake_mnist

from torchcfm_nsgf.images import NSGFSettings, available_methods

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

FILES = ["README.md", "a_throughput.json", "b_engine.json", "c_mnist.json"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, float]:
    """One --smoke run on fake MNIST in the real idx format: (results folder, wall seconds)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    write_fake_mnist(tmp / "data", n_train=64, n_test=16, strokes=True)
    out = tmp / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)]
    cmd += ["--data-root", str(tmp / "data"), "--classifier", str(tmp / "classifier.pt")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, wall


def _part(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_smoke_writes_one_folder_with_every_part(smoke) -> None:
    out, wall = smoke
    assert sorted(p.name for p in out.iterdir()) == FILES  # no temporaries left beside them
    for name in FILES[1:]:
        part = _part(out, name)
        assert part["status"] == "done", part
        env = part["environment"]
        assert env["torch"] and env["card"].startswith("CPU") and "--smoke" in env["command"]
    assert _part(out, "a_throughput.json")["environment"]["total_wall_s"] <= wall


@pytest.mark.slow
def test_throughput_covers_every_registered_method(smoke) -> None:
    out, _ = smoke
    part = _part(out, "a_throughput.json")
    rows = {r["method"]: r for r in part["rows"]}
    shared = NSGFSettings().nsgfpp.network == "shared"
    variant = "nsgf++ network=" + ("separate" if shared else "shared")  # NSGF++'s other network setting
    assert sorted(rows) == sorted([*available_methods(), variant])
    assert list(rows)[:3] == ["otcfm", "nsgf++", variant]
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("traceback"))
        assert r["timed_steps"] == gpu_check.SMOKE.window, name
        assert _finite(r["images_per_s"]) and r["images_per_s"] > 0, name
        # images/s is the timed steps' images over their wall time, as the loop reports it
        assert r["images_per_s"] == pytest.approx(r["timed_steps"] * gpu_check.SMOKE.batch / r["timed_s"])
        assert "note" not in r, (name, r["note"])  # timed on the resumed run, the whole window
        assert _finite(r["passes_per_step"]) and r["passes_per_step"] > 0, name
        assert r["calls_per_step"] >= 1, name
        assert sum(r["passes_by_network"].values()) == pytest.approx(r["passes_per_step"])
    # torchcfm's OT-CFM and I-CFM pass each batch once through their one network
    for name in ("otcfm", "icfm"):
        assert rows[name]["passes_per_step"] == 1.0 and rows[name]["calls_per_step"] == 1.0
    # one network for both phases: one call fewer per step than a network per phase, the same rows
    one, two = (rows["nsgf++"], rows[variant]) if shared else (rows[variant], rows["nsgf++"])
    assert two["calls_per_step"] - one["calls_per_step"] == pytest.approx(1.0)
    assert one["passes_per_step"] == pytest.approx(two["passes_per_step"])
    assert list(one["passes_by_network"]) == ["field"]


@pytest.mark.slow
def test_engine_solves_both_sizes_to_tolerance(smoke) -> None:
    out, _ = smoke
    part = _part(out, "b_engine.json")
    assert [r["points"] for r in part["rows"]] == list(gpu_check.SMOKE.engine_points)
    assert part["options"]["backend"] == "auto"
    for r in part["rows"]:
        assert "error" not in r and "note" not in r, r
        assert r["backend"] == r["auto_backend_predicted"]
        assert _finite(r["time_s"]) and _finite(r["velocity_rms"]) and r["velocity_rms"] > 0
        assert r["converged"] and 0 <= r["marginal_error"] <= part["options"]["tol"]
    assert _finite(part["rows"][1]["predicted_s"])


@pytest.mark.slow
def test_mnist_scores_every_method_at_every_nfe_it_accepts(smoke) -> None:
    out, _ = smoke
    part = _part(out, "c_mnist.json")
    assert _finite(part["floor"]) and 0 <= part["classifier_accuracy"] <= 1
    assert part["floor_scores"]["classifier_fid"] == part["floor"]
    assert 0 <= part["floor_scores"]["precision"] <= 1 and 0 <= part["floor_scores"]["recall"] <= 1
    rows = {r["method"]: r for r in part["rows"]}
    assert list(rows) == list(available_methods())
    for name, r in rows.items():
        assert r["status"] == "done" and "error" not in r, (name, r)
        assert r["steps"] >= 1
        assert set(r["scores"]) == {str(n) for n in gpu_check.SMOKE.nfes}
        for nfe, s in r["scores"].items():
            if "classifier_fid" in s:
                assert _finite(s["classifier_fid"]) and s["classifier_fid"] >= 0, (name, nfe)
                assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1, (name, nfe)
                assert s["nfe"] == int(nfe), (name, s)  # the sampler spent exactly the NFE asked for
            else:
                assert s["note"].startswith("not applicable"), (name, nfe, s)
        assert any("classifier_fid" in s for s in r["scores"].values()), name
    for nfe in gpu_check.SMOKE.nfes:  # OT-CFM's Euler sampler takes any number of steps
        assert "classifier_fid" in rows["otcfm"]["scores"][str(nfe)], nfe


@pytest.mark.slow
def test_readme_has_the_tables_and_lists_every_method(smoke) -> None:
    out, _ = smoke
    text = (out / "README.md").read_text()
    env = _part(out, "a_throughput.json")["environment"]
    assert env["command"] in text and env["torch"] in text and env["date"] in text
    sections = text.split("\n## ")
    assert [s.split("\n", 1)[0][:3] for s in sections[1:]] == ["(a)", "(b)", "(c)"]
    for section in (sections[1], sections[3]):
        table = [line for line in section.splitlines() if line.startswith("| ")]
        names = sorted(line.split(" | ")[0][2:] for line in table[1:])
        extra = [n for n in names if n.startswith("nsgf++ network=")] if section is sections[1] else []
        assert names == sorted([*available_methods(), *extra]) and len(extra) == (section is sections[1])
    assert "nan" not in text.lower()


def test_throughput_falls_back_to_two_fresh_runs_when_resuming_fails(monkeypatch) -> None:
    calls = []
    real_train = gpu_check.train

    def train(config, data=None):
        calls.append((config.train_steps, config.resume, config.ckpt_dir is not None))
        if config.resume:
            raise RuntimeError("cannot resume here")
        return real_train(config, data=data)

    monkeypatch.setattr(gpu_check, "train", train)
    sizes = gpu_check.SMOKE
    row = gpu_check.throughput("otcfm", gpu_check.synthetic_cifar(16), sizes, "cpu", budget_s=100.0)
    assert row["note"].startswith("resume failed (RuntimeError: cannot resume here)")
    assert row["timed_steps"] == sizes.window
    w, n = sizes.warm, sizes.warm + sizes.window
    # warm-up with a checkpoint, the failed resume, a kernel-loading run, the short and the long fresh run
    assert calls == [
        (n, False, True),
        (n, True, True),
        (w, False, False),
        (w, False, False),
        (n, False, False),
    ]


def test_mnist_part_is_skipped_with_a_message_without_the_data(tmp_path: Path) -> None:
    run = gpu_check.Run(str(tmp_path / "out"), gpu_check.SMOKE, "python benchmarks/gpu_check.py", "cpu")
    run.t0 = time.perf_counter()
    gpu_check.part_mnist(run, str(tmp_path / "no_data"), str(tmp_path / "classifier.pt"), None)
    part = run.parts["c"]
    assert part["status"] == "skipped" and part["rows"] == []
    assert "MNIST was not found" in part["skipped"] and "no_data" in part["skipped"]
    assert not (tmp_path / "classifier.pt").exists()
    run.finish()
    assert "**Skipped**: MNIST was not found" in (tmp_path / "out" / "README.md").read_text()


def test_time_guard_writes_the_results_and_stops_the_process(tmp_path: Path) -> None:
    # A part that overruns the run's total: the watchdog must write the README and the JSON files, mark
    # the part, and end the process (exit code 0) long before the part would have finished.
    script = textwrap.dedent(
        f"""
        import dataclasses, sys, time
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        import gpu_check
        sizes = dataclasses.replace(gpu_check.SMOKE, total_s=7.0)
        run = gpu_check.Run({str(tmp_path / "out")!r}, sizes, "python benchmarks/gpu_check.py --smoke", "cpu")
        run.t0 = time.perf_counter()
        run.open_part("a", 100.0)
        run.add_row("a", {{"method": "otcfm", "images_per_s": 1.0}})
        run.start_watchdog()
        time.sleep(60)
        print("not stopped")
        """
    )
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not stopped" not in proc.stdout and time.perf_counter() - t < 50
    part = json.loads((tmp_path / "out" / "a_throughput.json").read_text())
    assert part["status"].startswith("stopped by the time guard")
    assert part["rows"] == [{"method": "otcfm", "images_per_s": 1.0}]
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Status: stopped by the time guard" in text and "| otcfm | 1.0 |" in text
