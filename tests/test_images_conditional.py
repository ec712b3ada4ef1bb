"""Class-conditional image runs on fake MNIST in the real idx format: labels from the loader to the loss, exact
resume, samplers that pass the labels, the class grid of the CLI, classifier-free guidance."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from _fake_datasets import write_fake_mnist
from _spies import LabelSpy
from PIL import Image
from torch import nn

from torchcfm_nsgf import SinkhornOptions
from torchcfm_nsgf.images import ConfigError, TrainConfig, generate, load_images, train
from torchcfm_nsgf.images.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.filterwarnings("ignore:ema_decay=0.9 averages:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n_train=32, n_test=8)
    return root


def _config(root: Path, method: str, **kw) -> TrainConfig:
    base = dict(
        dataset="mnist",
        data_root=str(root),
        method=method,
        train_steps=4,
        batch_size=4,
        preset="tiny",
        warmup=2,
        ckpt_every=2,
        progress=False,
        verify_checksums=False,
        ema_decay=0.9,
        sample_steps=3,
        conditional=True,
        device="cpu",  # bit-identical resume is checked on the CPU
    )
    base.update(kw)
    config = TrainConfig(**base)
    s = config.nsgf
    s.flow_steps, s.pool_capacity, s.refresh_every = 2, 64, 2
    s.nsgfpp = s.nsgfpp.replace(flow_steps=2)
    s.sinkhorn = SinkhornOptions(blur=5.0, relative_blur=False, scaling=0.5)
    return config


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("method", "cfg"),
    [("nsgf", 0.0), ("nsgf++", 0.5), ("otcfm", 0.0), ("icfm", 0.5), ("drift", 0.0), ("meanflow", 0.0)],
)
def test_conditional_run_resumes_exactly_and_samples_the_asked_classes(data_root, tmp_path, method, cfg):
    full = train(_config(data_root, method, cfg_dropout=cfg, ckpt_dir=str(tmp_path / "a")))
    assert full.method.num_classes == 10
    killed = train(_config(data_root, method, cfg_dropout=cfg, ckpt_dir=str(tmp_path / "b"), stop_after=3))
    assert killed.step == 3
    resumed = train(_config(data_root, method, cfg_dropout=cfg, ckpt_dir=str(tmp_path / "b"), resume=True))
    assert resumed.step == 4 and resumed.losses == full.losses[2:]
    assert _state_equal(resumed.method.nets.state_dict(), full.method.nets.state_dict())
    assert _state_equal(resumed.ema.state_dict(), full.ema.state_dict())
    if method == "nsgf":  # the pool's labels are part of the resumed state
        pool = resumed.method.matcher.pool
        assert pool.labelled and torch.equal(pool._y[: len(pool)], full.method.matcher.pool._y[: len(pool)])
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["settings"]
    assert saved["conditional"] is True and saved["cfg_dropout"] == cfg

    # the sampler gives every network call the asked labels (a sampler that dropped them would fail here)
    spies = nn.ModuleDict({k: LabelSpy(v) for k, v in resumed.ema.items()})
    labels = torch.tensor([3, 1, 4, 1, 5])
    out = generate(resumed.method, spies, 5, (1, 28, 28), labels=labels, batch_size=3)
    assert out.samples.shape == (5, 1, 28, 28)
    seen = [y for spy in spies.values() for y in spy.labels]
    assert len(seen) == sum(out.nfe.values()) * 2  # two batches (3 + 2 images), each the same calls
    assert all(
        y is not None and torch.equal(y, labels[: len(y)] if len(y) == 3 else labels[3:]) for y in seen
    )
    with pytest.raises(ValueError, match="y must be integer labels"):
        generate(resumed.method, resumed.ema, 2, (1, 28, 28))
    if cfg > 0:  # classifier-free guidance: two network calls per guided step
        guided = generate(resumed.method, resumed.ema, 2, (1, 28, 28), labels=labels[:2], guidance_scale=2.0)
        plain = generate(resumed.method, resumed.ema, 2, (1, 28, 28), labels=labels[:2])
        per_step = {k: 2 * v for k, v in plain.nfe.items() if k != "predictor"}
        assert {k: v for k, v in guided.nfe.items() if k != "predictor"} == per_step


def test_the_loss_sees_the_labels_of_its_images(data_root, monkeypatch):
    from torchcfm_nsgf.images.methods import FlowMatchingMethod

    seen = []
    loss = FlowMatchingMethod.loss

    def spy(self, nets, x0, x1, y1=None):
        seen.append((x1.detach().clone(), y1))
        return loss(self, nets, x0, x1, y1)

    monkeypatch.setattr(FlowMatchingMethod, "loss", spy)
    train(_config(data_root, "icfm", train_steps=2, ckpt_every=100))
    data = load_images("mnist", data_root)
    by_pixels = {bytes(img.numpy()): int(lab) for img, lab in zip(data.images, data.labels, strict=True)}
    assert len(seen) == 2
    for x1, y1 in seen:
        pixels = ((x1 + 1) * 127.5).round().to(torch.uint8)
        assert y1.tolist() == [by_pixels[bytes(p.numpy())] for p in pixels]


def test_conditional_is_fixed_on_resume(data_root, tmp_path):
    train(_config(data_root, "icfm", train_steps=2, ckpt_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="conditional"):
        train(
            _config(data_root, "icfm", train_steps=3, ckpt_dir=str(tmp_path), resume=True, conditional=False)
        )
    with pytest.raises(ValueError, match="cfg_dropout needs conditional"):
        _config(data_root, "icfm", conditional=False, cfg_dropout=0.1)


def _mnist_example():
    spec = importlib.util.spec_from_file_location("example_mnist", ROOT / "examples" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_sample_writes_one_row_per_class(data_root, tmp_path, capsys):
    argv = [
        "--method", "nsgf", "--tiny", "--data-root", str(data_root), "--batch-size", "4", "--no-progress",
        "--train-steps", "2", "--ckpt-dir", str(tmp_path), "--conditional", "--cfg-dropout", "0.2",
        "--sample", "--n-samples", "20", "--guidance-scale", "1.5", "--blur", "5", "--no-relative-blur",
    ]  # fmt: skip
    out = _mnist_example().main(argv)
    assert out["grid_rows"] == 10
    assert out["grid_labels"].tolist() == [c for c in range(10) for _ in range(2)]
    width, height = Image.open(out["grid"]).size
    assert (width, height) == (2 * 30 + 2, 10 * 30 + 2)  # 2 images per row, 10 rows, 2-pixel padding
    assert out["nfe"] == 2 * 2  # the NSGF matcher's 2 Euler steps, each a guided (two-call) evaluation
    capsys.readouterr()
    bad = [
        "--method", "nsgf", "--tiny", "--data-root", str(data_root), "--conditional", "--sample",
        "--guidance-scale", "1.5", "--ckpt-dir", str(tmp_path / "x"),
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        _mnist_example().main(bad)
    assert "--guidance-scale needs" in capsys.readouterr().err
    assert np.isfinite(out["wall_time_s"])
