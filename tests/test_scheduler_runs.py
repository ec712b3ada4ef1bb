"""Long runs under a scheduler: progress bars write nothing into a log that is not a terminal, and
``--resume auto`` lets a requeued job run the same command (fresh the first time, resumed afterwards)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from torchcfm_nsgf import NSGFPlusPlus, odeint_sample
from torchcfm_nsgf.networks import VelocityMLP

sys.path.insert(0, str(Path(__file__).parent))
from _fake_datasets import write_fake_mnist  # noqa: E402


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bars(stream: io.StringIO, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    model = NSGFPlusPlus(VelocityMLP(2, 8), None, VelocityMLP(2, 8), progress=True)
    model.fit(torch.randn(64, 2), torch.randn(64, 2) + 2, 3, 16)
    odeint_sample(lambda t, x: -x, torch.randn(4, 2), n_steps=5, progress=True)
    return stream.getvalue()


def test_progress_bars_draw_on_a_terminal_and_write_nothing_into_a_log(monkeypatch):
    assert "\r" in _bars(_Terminal(), monkeypatch)  # on a terminal: tqdm's frames
    assert _bars(io.StringIO(), monkeypatch) == ""  # a file or a pipe: nothing


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n_train=32, n_test=4, strokes=True)
    return root


def _run(data_root: Path, ckpt: Path, steps: int, *extra: str) -> dict:
    from torchcfm_nsgf.images.cli import main

    argv = ["--method", "icfm", "--tiny", "--data-root", str(data_root), "--batch-size", "4", "--progress",
            "--train-steps", str(steps), "--ckpt-dir", str(ckpt), *extra]  # fmt: skip
    return main("mnist", argv)


def test_resume_auto_starts_fresh_then_resumes_and_says_which(data_root, tmp_path, capsys):
    first = _run(data_root, tmp_path / "run", 2, "--resume", "auto")
    out = capsys.readouterr()
    assert first["resumed_from"] is None and first["step"] == 2
    assert "--resume auto: no checkpoint in --ckpt-dir, started a fresh run" in out.out
    assert "\r" not in out.err  # the loop's bar stays out of a log, though --progress is on
    second = _run(data_root, tmp_path / "run", 4, "--resume", "auto")
    assert second["resumed_from"] == 2 and second["steps_this_run"] == 2
    assert "--resume auto: resumed the checkpoint at step 2" in capsys.readouterr().out
    # a plain --resume still needs a checkpoint; --resume takes no other value than auto
    with pytest.raises(SystemExit):
        _run(data_root, tmp_path / "other", 2, "--resume")
    assert "there is no checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(data_root, tmp_path / "other", 2, "--resume", "always")
