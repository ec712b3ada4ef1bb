"""The MNIST benchmark's scorer (benchmarks/mnist.py): the classifier behind its classifier FID is rebuilt
identically from the data, and results scored by different classifiers are never tabled together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _fake_datasets import write_fake_mnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mnist as mnist_benchmark  # noqa: E402


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
