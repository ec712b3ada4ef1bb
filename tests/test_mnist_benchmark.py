"""The MNIST benchmark (benchmarks/mnist.py, benchmarks/harness/images.py): the classifier behind its scores is
rebuilt identically from the data, results scored by different classifiers are never tabled together, the
Fréchet distance and the k-NN precision and recall against independent references, and the resumable curves
on fake MNIST."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _fake_datasets import write_fake_mnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mnist as mnist_benchmark  # noqa: E402
from harness.images import frechet_distance, knn_precision_recall  # noqa: E402


def test_classifier_is_rebuilt_identically_whatever_the_rng_and_threads(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data", n_train=64, n_test=16)
    threads = torch.get_num_threads()
    nets = []
    for seed, n_threads in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        torch.set_num_threads(n_threads)
        try:
            path = tmp_path / f"classifier{seed}.pt"
            net, acc = mnist_benchmark.get_classifier(str(path), str(tmp_path / "data"), epochs=1)
        finally:
            torch.set_num_threads(threads)
        torch.testing.assert_close(torch.rand(3), expected)  # the global RNG is left alone
        assert path.is_file()
        assert 0.0 <= acc <= 1.0
        nets.append(net)
    assert sorted(p.name for p in tmp_path.glob("*.pt*")) == ["classifier1.pt", "classifier2.pt"]  # no temps
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The cache is loaded as written.
    cached, _ = mnist_benchmark.get_classifier(str(tmp_path / "classifier1.pt"), str(tmp_path / "missing"))
    for a, b in zip(cached.state_dict().values(), nets[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_report_refuses_runs_scored_by_different_classifiers(tmp_path: Path) -> None:
    for name, floor in (("a", 31.41), ("b", 33.40)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"classifier_accuracy": 0.9863, "floor": floor}))
    with pytest.raises(SystemExit, match="2 different classifiers"):
        mnist_benchmark.report(str(tmp_path))


# ---------------------------------------------------------------------------------------------- scores
def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019), written out with loops: a point is in a set's manifold when it lies within
    the k-th-nearest-neighbour distance (itself excluded) of some member of that set."""

    def radii(x: np.ndarray) -> list[float]:
        out = []
        for i, p in enumerate(x):
            d = sorted(float(np.linalg.norm(p - q)) for j, q in enumerate(x) if j != i)
            out.append(d[k - 1])
        return out

    def share_inside(points: np.ndarray, centres: np.ndarray) -> float:
        r = radii(centres)
        inside = [any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r, strict=True)) for p in points]
        return sum(inside) / len(points)

    return share_inside(fake, real), share_inside(real, fake)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_match_a_brute_force_reference(seed: int) -> None:
    g = np.random.default_rng(seed)
    real = g.normal(size=(40, 3))
    fake = g.normal(loc=0.7, scale=1.3, size=(33, 3))  # overlapping clouds: neither share is 0 or 1
    expected = _brute_precision_recall(real, fake, k=3)
    got = knn_precision_recall(torch.tensor(real), torch.tensor(fake), k=3)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_precision_recall_closed_forms() -> None:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert knn_precision_recall(x, x.clone()) == (1.0, 1.0)  # identical sets: every point inside
    assert knn_precision_recall(x, x + 1000.0) == (0.0, 0.0)  # disjoint, far apart: none
    with pytest.raises(ValueError, match="fake needs at least 4 points"):
        knn_precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="NaN"):
        knn_precision_recall(x, torch.full((10, 8), float("nan")))


def test_frechet_distance_against_scipy_and_its_closed_forms() -> None:
    from scipy import linalg

    g = np.random.default_rng(0)
    a = g.normal(size=(300, 5))
    b = g.normal(size=(250, 5)) @ g.normal(size=(5, 5)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([3.0, 0, 0, 0, 4.0], dtype=torch.float64)
    assert frechet_distance(torch.tensor(a), torch.tensor(a) + shift) == pytest.approx(25.0, rel=1e-8)


# ---------------------------------------------------------------------------------------------- curves
def _curve_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data-root",
        str(tmp_path / "data"),
        "--classifier",
        str(tmp_path / "classifier.pt"),
        "--out-dir",
        str(tmp_path / "out"),
        "--run-dir",
        str(tmp_path / "runs"),
        "--methods",
        "otcfm",
        "--n-eval",
        "16",
        "--nfe",
        "1,2",
        "--warmup",
        "1",
        "--batch-size",
        "8",
        "--ema-decay",
        "0.5",
        *extra,
    ]


def test_curves_are_scored_at_each_training_time_and_resume_where_they_stopped(
    tmp_path: Path, monkeypatch
) -> None:
    write_fake_mnist(tmp_path / "data", n_train=32, n_test=16, strokes=True)
    args = _curve_args(tmp_path, "--curve-minutes", "0.005,0.05", "--resume", "auto", "--keep-checkpoints")
    calls = []
    original = mnist_benchmark.Scoring.__call__

    def killed_at_the_second_score(self, result, spec, label, tag, nfes=None):
        calls.append(result.step)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped after training, before scoring
        return original(self, result, spec, label, tag, nfes)

    monkeypatch.setattr(mnist_benchmark.Scoring, "__call__", killed_at_the_second_score)
    with pytest.raises(KeyboardInterrupt):
        mnist_benchmark.main(args)
    path = tmp_path / "out" / "otcfm_seed0_curve.json"
    row = json.loads(path.read_text())["row"]
    assert not row["done"] and [p["minutes"] for p in row["curve"]] == [0.005, 0.05]
    assert row["curve"][0]["scores"] is not None and row["curve"][1]["scores"] is None
    trained_to = row["curve"][1]["step"]
    assert row["curve"][1]["train_cpu_s"] >= 0.05 * 60 and trained_to > row["curve"][0]["step"]
    assert not (tmp_path / "out" / "otcfm_seed0_curve.claim").exists()

    monkeypatch.setattr(mnist_benchmark.Scoring, "__call__", original)
    mnist_benchmark.main(
        args
    )  # --resume auto: scores the trained segment from its checkpoint, trains nothing
    row = json.loads(path.read_text())["row"]
    assert row["done"] and row["curve"][1]["step"] == trained_to
    for point in row["curve"]:
        assert set(point["scores"]) == {"1", "2"}
        for s in point["scores"].values():
            assert s["classifier_fid"] >= 0 and 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    stamp = path.stat().st_mtime_ns
    mnist_benchmark.main(args)  # finished: skipped
    assert path.stat().st_mtime_ns == stamp

    # a later command asking for more minutes extends the finished run from its kept checkpoint
    longer = [{"1,2": "1,3", "0.005,0.05": "0.005,0.05,0.08"}.get(a, a) for a in args]
    mnist_benchmark.main(longer)
    row = json.loads(path.read_text())["row"]
    assert row["done"] and [p["minutes"] for p in row["curve"]] == [0.005, 0.05, 0.08]
    assert row["curve"][1]["step"] == trained_to < row["curve"][2]["step"]
    assert row["curve"][2]["train_cpu_s"] >= 0.08 * 60 and set(row["curve"][2]["scores"]) == {"1", "3"}

    # a later command asking for an NFE the last point lacks scores it there from the kept checkpoint; the
    # earlier points keep what they had (their weights are gone) and nothing is trained
    before = row["curve"]
    mnist_benchmark.main([{"1,3": "1,2,3"}.get(a, a) for a in longer])
    row = json.loads(path.read_text())["row"]
    assert [p["step"] for p in row["curve"]] == [p["step"] for p in before]
    assert row["curve"][:2] == before[:2] and set(row["curve"][2]["scores"]) == {"1", "2", "3"}
    assert row["curve"][2]["scores"]["3"] == before[2]["scores"]["3"]  # scored once
    stamp = path.stat().st_mtime_ns
    mnist_benchmark.main([{"1,3": "1,2,3"}.get(a, a) for a in longer])  # nothing lacks now: skipped
    assert path.stat().st_mtime_ns == stamp
    mnist_benchmark.report(str(tmp_path / "out"))
    assert (tmp_path / "out" / "curves_nfe1.png").is_file() and (tmp_path / "out" / "curves.png").is_file()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| OT-CFM |" in text and "NFE 3" in text  # the NFEs of every scored point


def test_a_curve_point_lacks_the_asked_nfes_it_holds_no_score_or_skip_reason_for() -> None:
    scoring = mnist_benchmark.Scoring(None, None, [1, 2, 10], [None])
    point = {"scores": {"2": {}}, "skipped": {"1": "nfe must be at least 2"}}
    assert scoring.missing(point) == [10]
    assert scoring.missing({"scores": {"1": {}, "2": {}, "10": {}}}) == []
    assert scoring.missing({"scores": {"10": {}}}) == [1, 2]  # a point written before skips were recorded
    guided = mnist_benchmark.Scoring(None, None, [2, 4], [1.0, 2.0])
    assert guided.missing({"scores": {"2@w1": {}, "2@w2": {}, "4@w1": {}}}) == [4]


def test_sample_batch_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        mnist_benchmark.main(_curve_args(tmp_path, "--curve-minutes", "1", "--sample-batch", "0"))


def test_method_specs_set_the_settings_they_name_and_refuse_others() -> None:
    from harness.images import parse_method, short_label, slug

    from torchcfm_nsgf.images import NSGFSettings

    base = NSGFSettings()
    name, settings, label = parse_method("nsgf++:nsgfpp.network=separate:nsgfpp.flow_steps=2", base)
    assert name == "nsgf++" and (settings.nsgfpp.network, settings.nsgfpp.flow_steps) == ("separate", 2)
    assert label.endswith("a network per phase, blur 0.05") and base.nsgfpp.network == "shared"
    assert parse_method("nsgf:blur=0.1", base)[1].sinkhorn.blur == 0.1
    name, settings, label = parse_method("drift:drift_self_term=same", base)
    assert settings.drift_self_term == "same" and label == "SinkhornDrift (one step), self term 'same'"
    assert parse_method("drift", base)[2] == "SinkhornDrift (one step)"
    assert slug("drift:drift_self_term=same") == "drift_drift_self_termsame"
    assert short_label("drift:drift_self_term=same") == "SinkhornDrift (one step) (drift_self_term=same)"
    with pytest.raises(SystemExit, match="'flow_stepz' is not an NSGFSettings field"):
        parse_method("nsgf:flow_stepz=3", base)
    with pytest.raises(ValueError, match="drift_self_term must be one of"):
        parse_method("drift:drift_self_term=both", base)
