"""Image pipeline: data in the real formats, exact resume for every method, DDP, sampling, FID, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _env import ROOT, pythonpath
from _fake_datasets import write_fake_cifar10, write_fake_mnist
from PIL import Image
from torchcfm.models.unet.unet import UNetModelWrapper

from torchcfm_nsgf import SinkhornOptions
from torchcfm_nsgf.images import (
    CheckpointError,
    TrainConfig,
    available_methods,
    feature_frechet_distance,
    load_images,
    make_method,
    train,
)
from torchcfm_nsgf.images.checkpoint import atomic_save, load_checkpoint
from torchcfm_nsgf.images.fid import InceptionUnavailableError, check_inception_available

# the tiny runs here use ema_decay=0.9 over 4 steps on purpose (the EMA must differ from the weights)
pytestmark = [
    pytest.mark.filterwarnings("ignore:ema_decay=0.9 averages:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n_train=32, n_test=8)
    write_fake_cifar10(root, n_per_batch=6)
    return root


def _config(root: Path, method: str, dataset: str = "mnist", **kw) -> TrainConfig:
    base = dict(
        dataset=dataset,
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
        device="cpu",  # bit-identical resume is checked on the CPU (cuDNN kernels are not deterministic)
    )
    base.update(kw)
    return TrainConfig(**base)


def _tiny_nsgf(config: TrainConfig) -> TrainConfig:
    s = config.nsgf
    s.flow_steps, s.pool_capacity, s.refresh_every = 3, 64, 2
    s.nsgfpp = s.nsgfpp.replace(flow_steps=2)
    s.sinkhorn = SinkhornOptions(blur=5.0, relative_blur=False, scaling=0.5)
    return config


# --------------------------------------------------------------------------- data


def test_fake_files_load_through_torchvision(data_root):
    mnist_written = write_fake_mnist(data_root / "m2", n_train=5, n_test=3, seed=7)
    mnist = load_images("mnist", data_root / "m2")
    assert mnist.images.shape == (5, 1, 28, 28) and mnist.images.dtype == torch.uint8
    np.testing.assert_array_equal(mnist.images[:, 0].numpy(), mnist_written)
    cifar_written = write_fake_cifar10(data_root / "c2", n_per_batch=2, seed=3)
    cifar = load_images("cifar10", data_root / "c2", verify_checksums=False)
    assert cifar.images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(cifar.images.permute(0, 2, 3, 1).numpy(), cifar_written)
    # re-packed batches fail torchvision's md5 check unless it is switched off
    with pytest.raises(FileNotFoundError, match="md5"):
        load_images("cifar10", data_root / "c2")


@pytest.mark.parametrize(
    ("name", "expected"), [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")]
)
def test_missing_dataset_files_are_named(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match=expected) as info:
        load_images(name, tmp_path)
    assert "--download" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing created


# --------------------------------------------------------------------------- exact resume


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", available_methods())
def test_interrupted_run_resumes_exactly(data_root, tmp_path, method):
    dataset = "cifar10" if method in ("otcfm", "nsgf++") else "mnist"
    uninterrupted = train(_tiny_nsgf(_config(data_root, method, dataset, ckpt_dir=str(tmp_path / "a"))))
    init = make_method(method, uninterrupted.shape, preset="tiny").nets.state_dict()

    killed = train(
        _tiny_nsgf(_config(data_root, method, dataset, ckpt_dir=str(tmp_path / "b"), stop_after=3))
    )
    assert killed.step == 3
    assert (
        load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    )  # the last checkpoint before the kill
    resumed = train(
        _tiny_nsgf(_config(data_root, method, dataset, ckpt_dir=str(tmp_path / "b"), resume=True))
    )

    assert resumed.step == 4 and resumed.steps_this_run == 2
    assert resumed.losses == uninterrupted.losses[2:]
    assert _state_equal(resumed.method.nets.state_dict(), uninterrupted.method.nets.state_dict())
    assert _state_equal(resumed.ema.state_dict(), uninterrupted.ema.state_dict())
    # training moved the weights (so the equality above is not between untouched networks)
    assert not _state_equal(init, uninterrupted.method.nets.state_dict())
    # and the interrupted run itself was ahead of its checkpoint: resuming really replayed steps 3-4
    assert not _state_equal(killed.method.nets.state_dict(), uninterrupted.method.nets.state_dict())


def test_resume_with_other_settings_is_refused(data_root, tmp_path):
    train(_config(data_root, "icfm", train_steps=2, ckpt_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="batch_size"):
        train(_config(data_root, "icfm", train_steps=3, batch_size=2, ckpt_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("preset", ["tiny", "mnist"])
def test_unet_presets_see_the_time_and_the_label(preset):
    from torchcfm_nsgf.images.unet import build_unet

    torch.manual_seed(0)
    net = build_unet((1, 28, 28), preset, num_classes=10)
    with torch.no_grad():  # the output convolution starts at zero: give every weight a value
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(4, 1, 28, 28)
        y0, y5 = torch.zeros(4, dtype=torch.long), torch.full((4,), 5)
        out = net(torch.full((4,), 0.1), x, y=y0)
        other_time = net(torch.full((4,), 0.9), x, y=y0)
        other_label = net(torch.full((4,), 0.1), x, y=y5)
    scale = float(out.abs().mean())
    assert float((out - other_time).abs().mean()) > 1e-3 * scale
    assert float((out - other_label).abs().mean()) > 1e-3 * scale


def test_device_names_resolve_to_this_process_gpu(monkeypatch):
    # torch.cuda.set_device refuses a bare "cuda" (no index): the loop must name the process's GPU
    from torchcfm_nsgf.images.config import ConfigError
    from torchcfm_nsgf.images.distributed import resolve_device as _resolve_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert _resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    assert _resolve_device("cpu", local_rank=3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device(None, local_rank=2) == torch.device("cuda", 2)
    # more processes than GPUs: a clear error, not CUDA's "out of memory" at set_device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="process 1 on this machine has no GPU"):
        _resolve_device(None, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device(None, local_rank=2) == torch.device("cpu")


def test_time_budget_follows_the_chosen_clock(data_root, monkeypatch):
    from torchcfm_nsgf.images import config as training

    ticks = iter(range(1000))  # a clock that advances one second per reading
    monkeypatch.setitem(training.CLOCKS, "cpu", lambda: float(next(ticks)))
    # read once at the start, then once per step: step k reads k seconds, over 2.5 s at step 3
    result = train(_config(data_root, "icfm", train_steps=50, time_budget_s=2.5, budget_clock="cpu"))
    assert result.step == 3 and result.cpu_time_s > 0 and result.wall_time_s > 0
    with pytest.raises(ValueError, match="budget_clock must be one of"):
        _config(data_root, "icfm", budget_clock="gpu")


# --------------------------------------------------------------------------- errors, nothing overwritten


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fresh_run_never_overwrites_a_checkpoint(data_root, tmp_path):
    train(_config(data_root, "rf", train_steps=2, ckpt_dir=str(tmp_path)))
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(data_root, "rf", train_steps=2, ckpt_dir=str(tmp_path)))
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_written(data_root, tmp_path, damage):
    train(_config(data_root, "icfm", train_steps=2, ckpt_dir=str(tmp_path)))
    path = tmp_path / "checkpoint.pt"
    blob = path.read_bytes()
    path.write_bytes(b"not a checkpoint" if damage == "garbage" else blob[: len(blob) // 2])
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(_config(data_root, "icfm", train_steps=4, ckpt_dir=str(tmp_path), resume=True))
    assert _snapshot(tmp_path) == before


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"x": torch.ones(3)}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_unknown_method_is_a_clear_error(data_root, capsys):
    with pytest.raises(ValueError, match="method must be one of"):
        make_method("ddpm", (1, 28, 28), preset="tiny")
    with pytest.raises(ValueError, match="method must be one of"):
        train(_config(data_root, "ddpm"))
    mnist = _load_example("mnist")
    with pytest.raises(SystemExit) as info:
        mnist.main(["--method", "ddpm", "--data-root", str(data_root)])
    assert info.value.code == 2
    assert "invalid choice: 'ddpm'" in capsys.readouterr().err


# --------------------------------------------------------------------------- sampling, NFE, FID


def test_generate_samples_where_the_networks_are():
    # a trained result on a GPU samples there without a device argument (noise drawn on the CPU, moved)
    from torchcfm_nsgf.images import generate
    from torchcfm_nsgf.sampling import SampleResult

    seen = []

    class Method:
        def sample(self, nets, x0, nfe=None, solver="euler"):
            seen.append(x0.device)
            return SampleResult(samples=torch.zeros(x0.shape), nfe={"velocity": 1})

    nets = torch.nn.ModuleDict({"velocity": torch.nn.Linear(2, 2, device="meta")})
    out = generate(Method(), nets, 3, (1, 2, 2), batch_size=2)
    assert seen == [torch.device("meta")] * 2 and out.samples.shape == (3, 1, 2, 2)
    generate(Method(), nets, 1, (1, 2, 2), device="cpu")
    assert seen[-1] == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["nsgf", "nsgf++", "otcfm", "drift", "meanflow"])
def test_cuda_run_trains_and_samples_on_the_gpu(data_root, tmp_path, method):
    from torchcfm_nsgf.images import generate

    ckpt = str(tmp_path / "run")
    first = train(_tiny_nsgf(_config(data_root, method, device="cuda", ckpt_dir=ckpt, train_steps=2)))
    assert all(p.device.type == "cuda" for p in first.ema.parameters())
    resumed = train(_tiny_nsgf(_config(data_root, method, device="cuda", ckpt_dir=ckpt, resume=True)))
    assert resumed.step == 4 and all(math.isfinite(v) for v in resumed.losses)
    nfe = 1 if method == "drift" else 4  # the generator takes one step only
    out = generate(resumed.method, resumed.ema, 3, resumed.shape, nfe=nfe)  # no device: the nets' GPU
    assert out.samples.device.type == "cpu" and torch.isfinite(out.samples).all()


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SAMPLE_CASES = [("icfm", 7, 7), ("otcfm", 4, 4)]
if "nsgf" in available_methods():
    _SAMPLE_CASES.append(("nsgf", None, 3))  # default: T Euler steps
if "drift" in available_methods():
    _SAMPLE_CASES.append(("drift", None, 1))  # a one-step generator


@pytest.mark.parametrize(("method", "nfe", "expected"), _SAMPLE_CASES)
def test_sample_grid_size_and_printed_nfe_equals_network_calls(
    data_root, tmp_path, monkeypatch, capsys, method, nfe, expected
):
    mnist = _load_example("mnist")
    common = [
        "--method",
        method,
        "--tiny",
        "--data-root",
        str(data_root),
        "--batch-size",
        "4",
        "--ckpt-dir",
        str(tmp_path / "ck"),
        "--no-progress",
        "--train-steps",
        "2",
        "--flow-steps",
        "3",
        "--blur",
        "5",
        "--no-relative-blur",
        "--pool-capacity",
        "64",
        "--refresh-every",
        "2",
    ]
    mnist.main(common)  # train and checkpoint; the second call only samples
    calls = []
    original = UNetModelWrapper.forward

    def counting(self, t, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, t, x, *args, **kwargs)

    monkeypatch.setattr(UNetModelWrapper, "forward", counting)
    grid = tmp_path / "grid.png"
    budget = [] if nfe is None else ["--nfe", str(nfe)]
    out = mnist.main(
        common + ["--resume", "--sample", "--n-samples", "6", "--sample-out", str(grid)] + budget
    )
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NFE:")]
    assert printed and int(printed[-1].split()[1]) == len(calls) == expected == out["nfe"]
    assert calls == [6] * expected  # one batch of 6 images per evaluation
    # torchvision's grid: ceil(sqrt(6)) = 3 columns, 2 rows, 2-pixel padding around every 28x28 image
    with Image.open(grid) as im:
        assert im.size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)


def test_fid_without_inception_weights_is_a_clear_error(data_root, tmp_path, capsys):
    mnist = _load_example("mnist")
    argv = [
        "--method",
        "icfm",
        "--tiny",
        "--data-root",
        str(data_root),
        "--train-steps",
        "1",
        "--batch-size",
        "4",
        "--no-progress",
        "--fid",
        "--inception-weights",
        str(tmp_path / "missing.pth"),
    ]
    with pytest.raises(SystemExit) as info:  # before training, one line
        mnist.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception-weights" in err[0]
    with pytest.raises((InceptionUnavailableError, FileNotFoundError), match="--inception-weights"):
        check_inception_available(str(tmp_path / "missing.pth"))


def test_feature_frechet_distance_matches_a_scipy_reference():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 5, generator=gen, dtype=torch.float64)

    def features(x):
        return x.flatten(1).double() @ proj

    real = torch.randn(300, 3, 4, 4, generator=gen)
    fake = 0.7 * torch.randn(200, 3, 4, 4, generator=gen) + 0.3
    got = feature_frechet_distance(features, real.split(64), fake.split(50), num_features=5)

    fr, ff = features(real).numpy(), features(fake).numpy()
    mu_r, mu_f = fr.mean(0), ff.mean(0)
    cov_r, cov_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_r @ cov_f).real
    expected = float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean))
    assert expected > 1.0  # the two sets really differ
    assert math.isclose(got, expected, rel_tol=1e-4)
    same = feature_frechet_distance(features, real.split(64), real.split(64), num_features=5)
    assert abs(same) < 1e-6


# --------------------------------------------------------------------------- several processes


_DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torchcfm_nsgf import SinkhornOptions
    from torchcfm_nsgf.images import NSGFSettings, TrainConfig, train
    root, out, method = sys.argv[1], sys.argv[2], sys.argv[3]

    def cfg(ckpt, **kw):
        sinkhorn = SinkhornOptions(blur=5.0, relative_blur=False, scaling=0.5)
        nsgf = NSGFSettings(flow_steps=3, sinkhorn=sinkhorn, pool_capacity=64, refresh_every=2)
        return TrainConfig(dataset="cifar10", data_root=root, method=method, train_steps=4, batch_size=3,
                           preset="tiny", warmup=2, ckpt_every=2, progress=False, verify_checksums=False,
                           ema_decay=0.9, ckpt_dir=os.path.join(out, ckpt), nsgf=nsgf, device="cpu", **kw)

    a = train(cfg("a"))
    train(cfg("b", stop_after=3))
    b = train(cfg("b", resume=True))
    flat = lambda r: torch.cat([p.detach().flatten() for p in r.method.nets.parameters()])
    pa, pb = flat(a), flat(b)
    gathered = [torch.zeros_like(pa) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, pa)
    report = {
        "resume_exact": bool(torch.equal(pa, pb)),
        "ranks_in_sync": all(bool(torch.equal(g, gathered[0])) for g in gathered),
        "loss": a.losses,
        "pool_x0": b.method.matcher.pool.sample(1)[1].flatten()[:8].tolist() if method == "nsgf" else None,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    # skip the interpreter's teardown, where gloo's threads were seen to abort a loaded process after
    # everything above had finished (both reports written)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
    """
)


def test_torchrun_two_cpu_processes_train_checkpoint_and_resume(data_root, tmp_path):
    method = "nsgf" if "nsgf" in available_methods() else "otcfm"  # nsgf: one pool shard per rank
    worker = tmp_path / "worker.py"
    worker.write_text(_DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(data_root),
        str(tmp_path),
        method,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["resume_exact"] for r in reports)
    assert all(r["ranks_in_sync"] for r in reports)  # DDP averaged the gradients: one model on both ranks
    assert reports[0]["loss"] != reports[1]["loss"]  # each rank trained on its own data shard and noise
    for ckpt in ("a", "b"):
        names = sorted(os.listdir(tmp_path / ckpt))
        assert names == ["checkpoint.pt", "rank0-step4.pt", "rank1-step4.pt"]
        state = load_checkpoint(tmp_path / ckpt / "checkpoint.pt")
        assert state["world_size"] == 2 and state["step"] == 4
    if method == "nsgf":  # each rank simulated its own flows into its own pool
        assert reports[0]["pool_x0"] != reports[1]["pool_x0"]
        shards = [load_checkpoint(tmp_path / "b" / f"rank{r}-step4.pt")["method"]["pool"] for r in range(2)]
        assert all(s["n_added"] > 0 for s in shards)
        assert not torch.equal(shards[0]["xt"], shards[1]["xt"])
