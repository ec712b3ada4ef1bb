"""The image command line: presets, help text, run-length-scaled warm-up and EMA, crash-safe checkpoints and
one-line errors. Data: fake MNIST files in the real idx format."""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from torchcfm_nsgf.images import TrainConfig, save_grid, train
from torchcfm_nsgf.images.checkpoint import load_checkpoint
from torchcfm_nsgf.images.cli import RUN_PRESETS, build_parser
from torchcfm_nsgf.images.training import ConfigError, default_ema_decay, default_warmup

sys.path.insert(0, str(Path(__file__).parent))
from _env import ROOT  # noqa: E402
from _fake_datasets import write_fake_mnist  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n_train=64, n_test=8, strokes=True)
    return root


def _example(dataset: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{dataset}", ROOT / "examples" / f"{dataset}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fast(data_root: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    return [
        "--method", "icfm", "--tiny", "--data-root", str(data_root), "--batch-size", "4",
        "--no-progress", "--train-steps", "2", "--ckpt-dir", str(ckpt_dir), *extra,
    ]  # fmt: skip


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the example with ``argv``; it must exit with status 2 and one stderr line, returned."""
    with pytest.raises(SystemExit) as info:
        _example("mnist").main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# --------------------------------------------------------------------------- the quick preset


def _grid_tiles(path: Path, n: int, size: int = 28, pad: int = 2) -> torch.Tensor:
    """The ``n`` images of a save_grid PNG, in [-1, 1]: ``(n, size, size)``."""
    with Image.open(path) as im:
        grid = pil_to_tensor(im.convert("L")).float()[0] / 127.5 - 1.0
    cols = grid.shape[1] // (size + pad)
    return torch.stack(
        [
            grid[pad + r * (size + pad) :][:size, pad + c * (size + pad) :][:, :size]
            for r, c in (divmod(i, cols) for i in range(n))
        ]
    )


def _histogram_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """L1 distance (0 to 2) between the 8-bin pixel histograms of two image sets in [-1, 1]."""
    hx, hy = (torch.histc(v.flatten(), bins=8, min=-1, max=1) / v.numel() for v in (x, y))
    return float((hx - hy).abs().sum())


def test_quick_preset_samples_look_like_the_data_not_like_noise(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    out = _example("mnist").main(
        ["--preset", "quick", "--data-root", str(data_root), "--ckpt-dir", str(run_dir), "--no-progress"]
        + ["--train-steps", "24", "--n-samples", "16", "--nfe", "8"]  # the preset, shortened
    )
    grid = Path(out["grid"])
    assert grid.parent == run_dir and grid.is_file()  # written in the run's folder
    assert f"wrote {grid}" in capsys.readouterr().out
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["settings"]["batch_size"] == RUN_PRESETS["quick"]["batch_size"]
    assert state["config"]["lr"] == RUN_PRESETS["quick"]["lr"]
    assert state["config"]["ema_decay"] == default_ema_decay(24)

    data = torch.from_numpy(write_fake_mnist(tmp_path / "copy", n_train=64, n_test=8, strokes=True))
    data = data.float() / 127.5 - 1.0
    samples = _grid_tiles(grid, 16)
    noise_grid = tmp_path / "noise.png"
    save_grid(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)), noise_grid)
    noise = _grid_tiles(noise_grid, 16)
    d_noise = _histogram_distance(noise, data)
    assert d_noise > 1.0  # the statistic tells noise from the data
    assert _histogram_distance(samples, data) < 0.5 * d_noise
    # and the samples are mostly dark background, as the data (noise: about a fifth)
    assert (samples < -0.5).float().mean() > 0.6


def test_explicit_flags_override_the_preset():
    parser = build_parser("mnist")
    args = parser.parse_args(["--preset", "quick", "--batch-size", "8", "--unet", "mnist", "--no-sample"])
    quick = RUN_PRESETS["quick"]
    assert (args.batch_size, args.unet, args.sample) == (8, "mnist", False)
    assert (args.lr, args.train_steps, args.nfe) == (quick["lr"], quick["train_steps"], quick["nfe"])
    plain = parser.parse_args([])
    assert (plain.batch_size, plain.lr, plain.train_steps, plain.unet, plain.sample) == (
        128, 2e-4, 20_000, "mnist", False,
    )  # fmt: skip


def test_phase1_batch_fraction_flag_reaches_the_nsgfpp_objective(capsys):
    from torchcfm_nsgf.images import available_methods, make_method
    from torchcfm_nsgf.images.cli import config_from_args

    parser = build_parser("mnist")
    config = config_from_args(
        parser.parse_args(["--method", "nsgf++", "--nsgfpp-phase1-batch-fraction", "0.25"])
    )
    assert config.nsgf.nsgfpp.phase1_batch_fraction == 0.25
    if "nsgf++" in available_methods():
        method = make_method("nsgf++", (1, 8, 8), preset="tiny", nsgf=config.nsgf)
        assert method.objective.phase1_batch_fraction == 0.25
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--phase1-batch-fraction", bad])
        assert "--phase1-batch-fraction" in capsys.readouterr().err


def test_drift_self_term_flag_reaches_the_drift_and_a_run_resumes_only_with_its_own(
    data_root, tmp_path, capsys
):
    """``--drift-self-term`` sets the generator's self term (default: the independent batch); a checkpoint
    stores it, is refused under another by name, and one written before the option is the independent term's."""
    from torchcfm_nsgf.images import make_method
    from torchcfm_nsgf.images.checkpoint import atomic_save
    from torchcfm_nsgf.images.cli import config_from_args

    parser = build_parser("mnist")
    assert config_from_args(parser.parse_args(["--method", "drift"])).nsgf.drift_self_term == "independent"
    config = config_from_args(parser.parse_args(["--method", "drift", "--drift-self-term", "same"]))
    method = make_method("drift", (1, 8, 8), preset="tiny", nsgf=config.nsgf)
    assert method.drift.self_term == "same"
    # the same-batch term draws no second generated batch: one generator call per loss
    calls = []
    method.nets["generator"].register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    loss = method.loss(method.nets, torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g))
    assert torch.isfinite(loss) and len(calls) == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--drift-self-term", "both"])
    assert "--drift-self-term" in capsys.readouterr().err
    with pytest.raises(ValueError, match="drift_self_term must be one of"):
        type(config.nsgf)(drift_self_term="both")

    def run(term: str, steps: int, resume: bool = False):
        argv = _fast(data_root, tmp_path / "run", "--drift-self-term", term) + ["--method", "drift"]
        c = config_from_args(parser.parse_args(argv))
        c.train_steps, c.resume = steps, resume
        return train(c)

    run("same", 2)
    with pytest.raises(ConfigError, match="drift.self_term: checkpoint 'same' vs now 'independent'"):
        run("independent", 3, resume=True)
    path = tmp_path / "run" / "checkpoint.pt"
    old = load_checkpoint(path)
    del old["settings"]["drift.self_term"]  # as written before the option existed
    atomic_save(old, path)
    with pytest.raises(ConfigError, match="drift.self_term: checkpoint 'independent' vs now 'same'"):
        run("same", 3, resume=True)
    assert run("independent", 3, resume=True).step == 3


@pytest.mark.parametrize("name", ["nsgf", "coupling", "nsgf++"])
def test_flow_size_flag_reaches_the_matcher_and_trains(name):
    from torchcfm_nsgf import SinkhornCouplingMatcher
    from torchcfm_nsgf.images import make_method
    from torchcfm_nsgf.images.cli import config_from_args

    config = config_from_args(build_parser("mnist").parse_args(["--method", name, "--flow-size", "24"]))
    assert config.nsgf.flow_size == 24
    method = make_method(name, (1, 6, 6), preset="tiny", nsgf=config.nsgf)
    matcher = method.matcher
    assert matcher.flow_size == 24
    assert isinstance(matcher, SinkhornCouplingMatcher) == (name == "coupling")
    g = torch.Generator().manual_seed(0)
    matcher.refresh_every = 2
    for _ in range(5):  # flows at call 0 (one batch of 8) and call 2 (the latest 24 images)
        x1 = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
        t, xt, ut = matcher.sample_location_and_conditional_flow(torch.randn(8, 1, 6, 6, generator=g), x1)
        assert xt.shape == ut.shape == (8, 1, 6, 6)
    items = 1 if matcher.path == "straight" else matcher.flow_steps  # nsgf++ serves the paper's grid
    assert matcher.n_flows == 2 and len(matcher.pool) == (8 + 24) * items
    assert config_from_args(build_parser("mnist").parse_args([])).nsgf.flow_size is None


def test_the_coupling_method_trains_on_its_plan_and_samples_with_the_asked_steps():
    from torchcfm_nsgf.images import make_method

    method = make_method("coupling", (1, 8, 8), preset="tiny", sample_steps=7)
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    loss = method.loss(method.nets, torch.randn(16, 1, 8, 8, generator=g), x1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # pairs of one plan: straight segments that end on the targets of the call
    pool = method.matcher.pool
    end = (pool._xt[:16].float() + pool._ut[:16].float()).flatten(1)  # float16 storage
    assert torch.cdist(end, x1.flatten(1)).min(1).values.max() < 2e-2
    out = method.sample(method.nets, torch.randn(3, 1, 8, 8))
    assert out.nfe == {"velocity": 7} and out.samples.shape == (3, 1, 8, 8)


def test_the_old_unet_spelling_of_preset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        build_parser("mnist").parse_args(["--preset", "tiny"])
    assert "--unet tiny" in capsys.readouterr().err


# --------------------------------------------------------------------------- warm-up and EMA


def test_warmup_and_ema_scale_with_short_runs_only():
    assert default_warmup(400_000) == 5000 and default_warmup(20_000) == 1000 and default_warmup(600) == 30
    assert default_ema_decay(400_000) == 0.9999
    for total in (10, 600, 20_000):
        horizon = 1.0 / (1.0 - default_ema_decay(total))
        assert horizon <= total / 10 + 1e-6
        # the initial random weights keep a negligible share of the final EMA
        assert default_ema_decay(total) ** total < 1e-4


def _config(root: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="mnist", data_root=str(root), method="icfm", train_steps=4, batch_size=4, preset="tiny",
        progress=False, sample_steps=2, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_too_slow_ema_warns_and_the_scaled_default_does_not(data_root, tmp_path):
    with pytest.warns(UserWarning, match="ema_decay=0.9999.*initial random"):
        train(_config(data_root, ema_decay=0.9999, warmup=0))
    with pytest.warns(UserWarning, match="warmup=5000 > train_steps=4"):
        train(_config(data_root, ema_decay=0.0, warmup=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_config(data_root))


def test_a_resumed_run_keeps_its_scaled_values(data_root, tmp_path):
    train(_config(data_root, train_steps=40, stop_after=None, ckpt_dir=str(tmp_path), ckpt_every=20))
    first = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert (first["warmup"], first["ema_decay"]) == (default_warmup(40), default_ema_decay(40))
    # a longer resumption is not refused for a "changed" EMA decay, and keeps the run's values
    resumed = train(_config(data_root, train_steps=42, ckpt_dir=str(tmp_path), resume=True))
    assert resumed.step == 42
    again = load_checkpoint(tmp_path / "checkpoint.pt")["config"]
    assert (again["warmup"], again["ema_decay"]) == (first["warmup"], first["ema_decay"])


# --------------------------------------------------------------------------- crash safety


def test_stale_temporaries_of_interrupted_writes_are_removed(data_root, tmp_path, monkeypatch):
    import torchcfm_nsgf._io as io

    # an interrupted write: the temporary is named after its destination
    seen = []

    def crash(src, dst):
        seen.append(os.path.basename(src))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(io.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            io.atomic_save({"x": 1}, tmp_path / "checkpoint.pt")
    assert re.fullmatch(r"\.checkpoint\.pt\.partial-\w+\.tmp", seen[0])

    # what a kill -9 leaves (this version's names and earlier ones), and files that are not ours
    stale = [".checkpoint.pt.partial-abc123.tmp", ".rank0-step2.pt.partial-x.tmp", ".rank0-step4.pt.q1w2.tmp"]
    kept = [".rank1-step2.pt.partial-y.tmp", ".notes.tmp", "notes.txt"]  # rank 1: another process's
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    train(_config(data_root, ckpt_dir=str(tmp_path), stop_after=1))  # no checkpoint written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)

    # and when a run resumes
    (tmp_path / stale[0]).write_bytes(b"partial")
    train(_config(data_root, ckpt_dir=str(tmp_path / "run"), train_steps=2))
    (tmp_path / "run" / stale[0]).write_bytes(b"partial")
    train(_config(data_root, ckpt_dir=str(tmp_path / "run"), train_steps=4, resume=True))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "rank0-step4.pt"]


def test_unwritable_ckpt_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    missing_data = tmp_path / "no_data"  # loading data would fail: the folder is checked first
    line = _cli_error(capsys, _fast(missing_data, blocker / "run"))
    assert "--ckpt-dir" in line and str(blocker / "run") in line
    with pytest.raises(ConfigError, match="ckpt_dir"):
        train(_config(missing_data, ckpt_dir=str(blocker / "run")))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_ckpt_dir_fails_before_training(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "--ckpt-dir" in _cli_error(capsys, _fast(tmp_path / "no_data", folder))
    finally:
        folder.chmod(0o700)


def test_resume_with_no_steps_left_is_an_error_unless_sampling(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _example("mnist").main(_fast(data_root, run_dir))
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    line = _cli_error(capsys, _fast(data_root, run_dir, "--resume"))  # --train-steps 2: already there
    assert "--train-steps 2" in line and "nothing to train" in line
    line = _cli_error(capsys, _fast(data_root, run_dir, "--resume", "--train-steps", "1"))
    assert "--train-steps 1" in line and "step 2" in line
    with pytest.raises(ConfigError, match="train_steps=1 is below the step 2"):
        train(_config(data_root, train_steps=1, ckpt_dir=str(run_dir), resume=True))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    out = _example("mnist").main(
        _fast(data_root, run_dir, "--resume", "--sample", "--n-samples", "4", "--nfe", "2")
    )
    assert out["steps_this_run"] == 0 and Path(out["grid"]).parent == run_dir
    assert "nothing trained" in capsys.readouterr().out


def test_flag_errors_are_one_line_naming_the_flag(data_root, tmp_path, capsys):
    line = _cli_error(capsys, _fast(data_root, tmp_path / "empty", "--resume"))
    assert "--resume" in line and "--ckpt-dir" in line
    line = _cli_error(capsys, _fast(data_root, tmp_path / "run", "--batch-size", "0"))
    assert "--batch-size" in line and "positive" in line
    line = _cli_error(capsys, _fast(data_root, tmp_path / "run", "--preset", "tiny"))
    assert "--preset" in line and "--unet tiny" in line


# --------------------------------------------------------------------------- help text


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_flag_has_help_and_a_true_default(dataset, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        _example(dataset).main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    text = stdout.split("options:", 1)[1]
    # one entry per option line ("  --flag ARG  help...", help possibly on the following indented lines)
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            entries.append((m.group(1), m.group(2) or ""))
        elif entries and re.match(r"^\s{3,}\S", line):
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}".strip())
    flags = {flag for invocation, _ in entries for flag in re.findall(r"--[\w-]+", invocation)}
    assert {"--preset", "--warmup", "--ema-decay", "--ckpt-dir", "--ema", "--no-ema", "--threads"} <= flags
    for invocation, help_text in entries:
        assert help_text, f"{invocation} has no help"
        assert "default: None" not in help_text, invocation
        takes_value = re.search(r"--[\w-]+ [A-Z{]", invocation) is not None
        if takes_value:
            assert "default" in help_text, f"{invocation} does not state its default"
        negatives = [f for f in re.findall(r"--[\w-]+", invocation) if f.startswith("--no-")]
        if negatives and len(re.findall(r"--[\w-]+", invocation)) == 1:  # a lone --no-x flag
            assert "default: True" not in help_text, f"{invocation}: contradictory default"
    assert "shared/" not in stdout  # no paths outside the repository
