r"""One GPU check in one command: image training throughput, the Sinkhorn engine at scale, MNIST at equal time.

Three parts, one results folder (``--out``): a JSON file per part and a ``README.md`` with the tables, the card,
the torch / CUDA versions, the date and the exact command. The whole run stays under ``--total-s`` (8 minutes
on a GPU): every part has a budget, skips what it predicts will not fit and says so, and a watchdog writes
the README and stops the process a few seconds before the total is spent.

(a) **Training throughput** on CIFAR-10-shaped batches (3x32x32, random uint8 images; only the Sinkhorn
    iteration count depends on their content), for every method :func:`~torchcfm_nsgf.images.available_methods`
    lists when it runs, and NSGF++ with its other network setting (``nsgfpp.network``: one network for both
    phases, or one per phase) beside the default. Each method runs the library's own loop (:func:`~torchcfm_nsgf.images.train`) twice:
    a warm-up run that writes a checkpoint at step ``warm`` (CUDA set-up, first kernels, NSGF's pool fill),
    then the timed run, resumed from that checkpoint, of ``window`` steps; the loop synchronises every step
    (it reads the loss) and ``torch.cuda.synchronize`` brackets each run. Network passes per
    training step are counted separately, by forward hooks on each of the method's networks over
    ``pass_steps`` calls of its loss after the pool fill: rows through any network divided by the batch
    (OT-CFM: 1; a network run on a quarter batch adds 0.25).
(b) **The engine at scale**: one Sinkhorn velocity solve (:meth:`SinkhornOptions.solve
    <torchcfm_nsgf.SinkhornOptions.solve>` with the image methods' settings and ``backend="auto"``) of 65 536
    and of 262 144 CIFAR-shaped particles (N(0, I)) against as many random images: time, the backend
    ``"auto"`` chose, ε-scaling levels and iterations, marginal error, peak GPU memory. A size whose predicted
    time (from the smaller solve: quadratic scaling, and the measured float32 matrix-product rate for the
    cost recomputed by the streaming backend) exceeds what is left of the part's budget is not started; the
    prediction is reported instead.
(c) **MNIST at equal wall time**: every method trains ``mnist_seconds`` (90 s) of wall time from scratch
    (``mnist`` UNet preset, batch 128, Adam 2e-4, warm-up 200, EMA 0.995, as BENCHMARKS §5b), all methods at
    the same time, one process each, on the one GPU; the EMA weights are scored at NFE 1, 2 and 10 (where the
    method accepts the NFE) by the MNIST benchmark's scorer (``benchmarks/harness/images.py``: classifier FID,
    k-NN precision and recall in the features of its seeded classifier, 10 000 generated against the 10 000
    test images; the floor is 10 000 training images against them). Without MNIST under ``--data-root``
    the part is skipped and the README says why.

``--smoke`` runs the same code at tiny sizes on the CPU (``tests/test_gpu_check.py``).

**On a GPU machine without network access** (e.g. one NVIDIA H100 or H200 with PyTorch only: no torchcfm,
torchdyn, torchcde, torchsde or POT, no MNIST), prepare
once, in the repository root, a git-ignored folder ``.gpu`` of wheels and gzipped MNIST (about 13 MB)::

    echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/whl .gpu/mnist
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl torchcfm==1.0.7 torchdyn==1.0.6 torchcde==0.2.5 torchsde==0.2.6 trampoline==0.1.2 \
        pot==0.9.6.post1
    for f in ../shared/data/MNIST/raw/*-ubyte; do gzip -c $f > .gpu/mnist/$(basename $f).gz; done
    python -c "import sys; sys.path.insert(0, 'benchmarks'); from harness.images import get_classifier; \
        get_classifier('benchmarks/results/mnist_classifier.pt', '../shared/data')"

The last line builds (or finds) the MNIST benchmark's seeded classifier, so that the GPU scores use the
classifier of the CPU tables; without it the run trains one while the MNIST methods train. Copy ``.gpu`` and
``benchmarks/results/mnist_classifier.pt`` (both git-ignored) with the working tree and run this one
command there, with ``$OUT`` a folder for the results, allowing it 10 minutes (the script stops itself
within 8)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && mkdir -p /tmp/data/MNIST/raw && for f in .gpu/mnist/*.gz; do gunzip -c $f > /tmp/data/MNIST/raw/$(basename $f .gz); done; nvidia-smi -L; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check --data-root /tmp/data 2>&1 | tee $OUT/gpu_check.log

The results are the four files of ``$OUT/gpu_check/`` and the log: copy the folder to ``benchmarks/results/``
and the README's tables, with the date and the card, to BENCHMARKS.md. On the CPU::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --smoke --out gpu_check_smoke --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from torchcfm_nsgf.images import (
    ImageData,
    NSGFSettings,
    TrainConfig,
    available_methods,
    generate,
    load_images,
    make_method,
    train,
)
from torchcfm_nsgf.images.data import expected_files, to_unit_range
from torchcfm_nsgf.sinkhorn import choose_backend

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = {
    "a": ("a_throughput.json", "(a) Training throughput, CIFAR-10-shaped"),
    "b": ("b_engine.json", "(b) The Sinkhorn engine at scale, CIFAR-shaped points"),
    "c": ("c_mnist.json", "(c) MNIST at equal wall time"),
}
#: The order the parts run in: the engine last, since one solve cannot be stopped halfway.
ORDER = ("a", "c", "b")
#: Methods timed first in part (a), so that the time guard never drops the comparison BENCHMARKS.md tracks.
FIRST = ("otcfm", "nsgf++")
#: Seconds before the total at which the watchdog writes the README and stops the process.
WATCHDOG_MARGIN_S = 5.0


@dataclass(frozen=True)
class Sizes:
    """Sizes and budgets of one run (:data:`GPU` or :data:`SMOKE`)."""

    device: str
    total_s: float
    # (a)
    budget_a_s: float
    batch: int
    preset: str
    warm: int
    window: int
    pass_steps: int
    # (b)
    engine_points: tuple[int, ...]
    # (c)
    mnist_seconds: float
    mnist_slack_s: float
    mnist_batch: int
    mnist_preset: str
    mnist_warmup: int
    mnist_ema: float
    n_eval: int
    nfes: tuple[int, ...]
    worker_threads: int
    mnist_workers: int | None  # None: one process per method

    @property
    def budget_c_s(self) -> float:
        return self.mnist_seconds + self.mnist_slack_s


GPU = Sizes(
    device="cuda",
    total_s=480.0,
    budget_a_s=230.0,
    batch=128,
    preset="cifar10",
    warm=10,
    window=40,
    pass_steps=20,
    engine_points=(65_536, 262_144),
    mnist_seconds=90.0,
    mnist_slack_s=50.0,
    mnist_batch=128,
    mnist_preset="mnist",
    mnist_warmup=200,
    mnist_ema=0.995,
    n_eval=10_000,
    nfes=(1, 2, 10),
    worker_threads=1,
    mnist_workers=None,
)
SMOKE = Sizes(
    device="cpu",
    total_s=300.0,
    budget_a_s=150.0,
    batch=4,
    preset="tiny",
    warm=1,
    window=1,
    pass_steps=2,
    engine_points=(128, 512),
    mnist_seconds=0.3,
    mnist_slack_s=100.0,
    mnist_batch=8,
    mnist_preset="tiny",
    mnist_warmup=200,
    mnist_ema=0.995,
    n_eval=8,
    nfes=(1, 2, 10),
    worker_threads=1,
    mnist_workers=1,
)


# ----------------------------------------------------------------------------------------------------------
# The run: results, budgets, files, watchdog


class Run:
    """The results of every part, their budgets, and the files they are written to."""

    def __init__(self, out: str, sizes: Sizes, command: str, device: str) -> None:
        self.out, self.sizes, self.command, self.device = out, sizes, command, device
        self.t0 = time.perf_counter() - process_age_s()  # the time guard counts the imports too
        self.lock = threading.RLock()
        self.parts: dict[str, dict[str, Any]] = {
            key: {"part": key, "title": title, "status": "not started", "rows": []}
            for key, (_, title) in PARTS.items()
        }
        self.deadlines: dict[str, float] = {}
        self.children: list[subprocess.Popen] = []
        self.environment = environment(device, command)
        os.makedirs(out, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def end_of_run(self) -> float:
        """Seconds from the start by which every part must be done (the watchdog fires a little later)."""
        return self.sizes.total_s - WATCHDOG_MARGIN_S - 5.0

    def open_part(self, key: str, budget_s: float) -> None:
        with self.lock:
            start = self.elapsed()
            self.deadlines[key] = min(start + budget_s, self.end_of_run())
            part = self.parts[key]
            part.update(status="running", started_s=start, budget_s=self.deadlines[key] - start)
            print(f"[{start:6.1f} s] part {key}: budget {part['budget_s']:.0f} s", flush=True)
            self.save(key)

    def left(self, key: str) -> float:
        """Seconds left in the part's budget."""
        return self.deadlines[key] - self.elapsed()

    def add_row(self, key: str, row: dict[str, Any]) -> None:
        with self.lock:
            self.parts[key]["rows"].append(row)
            self.save(key)

    def close_part(self, key: str, status: str = "done") -> None:
        with self.lock:
            part = self.parts[key]
            part.update(status=status, wall_s=self.elapsed() - part.get("started_s", self.elapsed()))
            self.save(key)

    def save(self, key: str) -> None:
        with self.lock:
            data = {
                "environment": self.environment,
                "sizes": dataclasses.asdict(self.sizes),
                **self.parts[key],
            }
            write_text(os.path.join(self.out, PARTS[key][0]), json.dumps(data, indent=1) + "\n")

    def finish(self, stopped_by_watchdog: str | None = None) -> None:
        """Write every part's JSON and the README."""
        with self.lock:
            if stopped_by_watchdog:
                for key, part in self.parts.items():
                    if part["status"] == "running":
                        part["status"] = f"stopped by the time guard ({stopped_by_watchdog})"
                    self.save(key)
            self.environment["total_wall_s"] = self.elapsed()
            for key in self.parts:
                self.save(key)
            write_text(os.path.join(self.out, "README.md"), readme(self))

    def start_watchdog(self) -> threading.Timer:
        """At ``total_s - WATCHDOG_MARGIN_S``: stop the workers, write what there is, end the process."""

        def fire() -> None:
            with self.lock:
                msg = f"the total of {self.sizes.total_s:.0f} s was nearly spent at {self.elapsed():.0f} s"
                print(f"time guard: {msg}; writing the results and stopping", flush=True)
                for proc in self.children:
                    if proc.poll() is None:
                        proc.kill()
                self.finish(stopped_by_watchdog=msg)
                sys.stdout.flush()
                os._exit(0)

        timer = threading.Timer(max(1.0, self.sizes.total_s - WATCHDOG_MARGIN_S - self.elapsed()), fire)
        timer.daemon = True
        timer.start()
        return timer


def process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def environment(device: str, command: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    try:
        commit = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "card": torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit or None,
        "command": command,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory(device: str) -> None:
    """Return the device memory of the last step's objects to the driver (on a GPU only: a full garbage
    collection of this process costs 0.3 s)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------------------------------------
# (a) Training throughput


def synthetic_cifar(n: int, seed: int = 0) -> ImageData:
    """``n`` random uint8 images of CIFAR-10's shape (3x32x32) with random labels."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return ImageData(images=images, labels=torch.randint(0, 10, (n,), generator=gen), name="cifar10")


def throughput(
    name: str, data: ImageData, sizes: Sizes, device: str, budget_s: float, nsgf: NSGFSettings | None = None
) -> dict[str, Any]:
    """Images per second of ``name`` in the library's loop, over ``window`` steps after ``warm`` steps.

    The timed run resumes from the checkpoint of a warm-up run, so its wall time holds the window's steps
    alone. Should resuming fail, the window is timed as the difference of two fresh runs (``warm`` and
    ``warm + window`` steps, after one more ``warm``-step run that loads the kernels), as
    ``benchmarks/throughput.py`` does, and the row says why.
    """
    ram = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # checkpoints are not what is timed
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_", dir=ram) as ckpt:
        base = dict(
            dataset="cifar10",
            data_root=ckpt,
            method=name,
            train_steps=sizes.warm + sizes.window,
            batch_size=sizes.batch,
            preset=sizes.preset,
            warmup=0,
            ema_decay=0.999,
            device=device,
            progress=False,
            log_every=10**9,
            seed=0,
            **({} if nsgf is None else {"nsgf": nsgf}),
        )

        def run(**changes: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r"ema_decay="
                )  # the EMA of these runs is never used
                sync(device)
                result = train(TrainConfig(**{**base, **changes}), data=data)
                sync(device)
            out = (result.step, result.wall_time_s)
            del result
            free_memory(device)
            return out

        def left() -> float:
            left = budget_s - (time.perf_counter() - t_start)
            if left <= 0:
                raise TimeoutError(f"the part's budget ran out after {budget_s - left:.0f} s of warm-up runs")
            return left

        note = None
        t = time.perf_counter()
        # checkpoint at step `warm`, stop one step later (before any further checkpoint)
        run(ckpt_dir=ckpt, ckpt_every=sizes.warm, stop_after=sizes.warm + 1)
        warm_s = time.perf_counter() - t
        try:
            step, wall = run(
                ckpt_dir=ckpt, ckpt_every=10**9, resume=True, stop_after=sizes.window, time_budget_s=left()
            )
            steps = step - sizes.warm
        except TimeoutError:
            raise
        except Exception as err:  # noqa: BLE001 - timed another way below, and the row says why
            note = f"resume failed ({error_text(err)}): timed as the difference of two fresh runs"
            run(train_steps=sizes.warm)  # loads the kernels the short run would otherwise pay for
            _, short = run(train_steps=sizes.warm)
            step, long = run(time_budget_s=left())
            steps, wall = step - sizes.warm, long - short
    if steps < 1 or not wall > 0:
        raise RuntimeError(f"no timed window: {steps} steps in {wall:.3f} s ({note or 'resumed run'})")
    row: dict[str, Any] = {
        "images_per_s": steps * sizes.batch / wall,
        "steps_per_s": steps / wall,
        "timed_steps": steps,
        "timed_s": wall,
        "warmup_run_s": warm_s,
    }
    if steps < sizes.window:
        note = (note + "; " if note else "") + f"window cut to {steps} of {sizes.window} steps by the budget"
    if note:
        row["note"] = note
    return row


def network_passes(
    name: str, data: ImageData, sizes: Sizes, device: str, nsgf: NSGFSettings | None = None
) -> dict[str, Any]:
    """Forward passes per training step, counted by hooks on each network over ``pass_steps`` loss calls.

    A pass is ``batch`` rows through one network; the networks of ``method.nets`` are hooked, so the passes
    that refresh NSGF++'s end points count, and the optimiser and EMA (no forward passes) do not.
    """
    torch.manual_seed(0)
    method = make_method(name, data.shape, preset=sizes.preset, nsgf=nsgf or NSGFSettings())
    nets = method.nets.to(device).train()
    rows = dict.fromkeys(nets.keys(), 0)
    calls = dict.fromkeys(nets.keys(), 0)

    def counter(key: str):
        def hook(module, args, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            rows[key] += int(out.shape[0]) if isinstance(out, torch.Tensor) and out.ndim else 1
            calls[key] += 1

        return hook

    def batch() -> tuple[torch.Tensor, None]:
        idx = torch.randint(len(data), (sizes.batch,))
        return to_unit_range(data.images[idx]).to(device), None

    method.prepare(batch)
    handles = [net.register_forward_hook(counter(key)) for key, net in nets.items()]
    try:
        for _ in range(sizes.pass_steps):
            x1, _ = batch()
            loss = method.loss(nets, torch.randn_like(x1), x1)
            nets.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    steps = sizes.pass_steps
    result = {
        "passes_per_step": sum(rows.values()) / (steps * sizes.batch),
        "calls_per_step": sum(calls.values()) / steps,
        "passes_by_network": {k: v / (steps * sizes.batch) for k, v in rows.items()},
        "pass_steps": steps,
    }
    del method, nets, loss
    free_memory(device)
    return result


def part_throughput(run: Run) -> None:
    sizes, device = run.sizes, run.device
    run.open_part("a", sizes.budget_a_s)
    data = synthetic_cifar(max(1024, 8 * sizes.batch))
    registered = available_methods()
    methods = [m for m in FIRST if m in registered] + [m for m in registered if m not in FIRST]
    run.parts["a"]["methods"] = list(registered)
    rows: list[tuple[str, str, NSGFSettings | None]] = [(name, name, None) for name in methods]
    if "nsgf++" in methods:  # NSGF++ with its other network setting, beside the default
        default = NSGFSettings()
        other = "separate" if default.nsgfpp.network == "shared" else "shared"
        variant = dataclasses.replace(default, nsgfpp=default.nsgfpp.replace(network=other))
        rows.insert(methods.index("nsgf++") + 1, (f"nsgf++ network={other}", "nsgf++", variant))
    slowest = 0.0
    for label, name, nsgf in rows:
        row: dict[str, Any] = {"method": label}
        left = run.left("a")
        if left < 1.5 * slowest or left <= 0:
            row["note"] = (
                f"not run: {left:.0f} s left of the part's budget, the slowest method so far took {slowest:.0f} s"
            )
            run.add_row("a", row)
            print(f"[{run.elapsed():6.1f} s] (a) {label}: {row['note']}", flush=True)
            continue
        t = time.perf_counter()
        try:
            row.update(throughput(name, data, sizes, device, budget_s=left, nsgf=nsgf))
            row.update(network_passes(name, data, sizes, device, nsgf=nsgf))
        except Exception as err:  # noqa: BLE001 - a method that fails is reported; the others still run
            row["error"] = error_text(err)
            row["traceback"] = traceback.format_exc(limit=-4)
            free_memory(device)
        row["wall_s"] = time.perf_counter() - t
        slowest = max(slowest, row["wall_s"])
        run.add_row("a", row)
        print(f"[{run.elapsed():6.1f} s] (a) {label}: {summary_a(row)}", flush=True)
    run.close_part("a")


def summary_a(row: dict[str, Any]) -> str:
    if "images_per_s" in row:
        return (
            f"{row['images_per_s']:.1f} images/s, {row.get('passes_per_step', float('nan')):.2f} passes/step"
        )
    return row.get("error") or row.get("note", "")


# ----------------------------------------------------------------------------------------------------------
# (b) The engine at scale


def matmul_rate(device: str, n: int) -> float:
    """Measured float32 matrix-product rate (flop/s) at the engine's shapes: (n, 3072) @ (3072, n)."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, 3072, generator=gen, device=device)
    b = torch.randn(3072, n, generator=gen, device=device)
    a @ b  # first call: library set-up
    sync(device)
    t, reps = time.perf_counter(), 3
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2.0 * n * n * 3072 / (time.perf_counter() - t)


def part_engine(run: Run) -> None:
    device = run.device
    run.open_part("b", run.end_of_run() - run.elapsed())
    options = dataclasses.replace(NSGFSettings().sinkhorn, backend="auto")  # the image methods' settings
    run.parts["b"]["options"] = dataclasses.asdict(options)
    cuda = device.startswith("cuda")
    previous: dict[str, Any] | None = None
    rate = None
    for n in run.sizes.engine_points:
        row: dict[str, Any] = {"points": n, "dim": 3072}
        row["auto_backend_predicted"] = choose_backend(n, n, 3072, device, torch.float32)
        if run.left("b") <= 0:
            row["note"] = "not run: no time left in the run"
            run.add_row("b", row)
            continue
        if previous is not None and "time_s" not in previous:
            row["note"] = f"not run: the solve of {previous['points']} points did not finish"
            run.add_row("b", row)
            print(f"[{run.elapsed():6.1f} s] (b) {n} points: {row['note']}", flush=True)
            continue
        if previous is not None:
            ratio = (n / previous["points"]) ** 2
            predicted = previous["time_s"] * ratio
            if row["auto_backend_predicted"] != previous["backend"]:
                if rate is None:
                    rate = matmul_rate(device, min(8192, previous["points"]))
                    run.parts["b"]["float32_matmul_tflops"] = rate / 1e12
                # every pass of the streaming backend recomputes the n x n x 3072 cost products
                passes = 3 * (previous["n_anneal"] + previous["n_iter"])
                predicted = max(predicted, passes * 2.0 * n * n * 3072 / rate)
            row["predicted_s"] = predicted
            left = run.left("b")
            if predicted > left:
                row["note"] = f"not run: predicted {predicted:.0f} s, {left:.0f} s left of the part's budget"
                run.add_row("b", row)
                print(f"[{run.elapsed():6.1f} s] (b) {n} points: {row['note']}", flush=True)
                continue
        try:
            row.update(engine_solve(n, options, device))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: reported, the run goes on
            row["error"] = error_text(err)
            free_memory(device)
        if not cuda:
            row["peak_memory_note"] = "CPU: not measured"
        run.add_row("b", row)
        previous = row
        print(f"[{run.elapsed():6.1f} s] (b) {n} points: {summary_b(row)}", flush=True)
    run.close_part("b")


def engine_solve(n: int, options: Any, device: str) -> dict[str, Any]:
    """One velocity solve of ``n`` N(0, I) particles against ``n`` random CIFAR-shaped images."""
    gen = torch.Generator(device).manual_seed(n)
    x = torch.randn(n, 3, 32, 32, generator=gen, device=device)
    y = to_unit_range(torch.randint(0, 256, (n, 3, 32, 32), generator=gen, device=device, dtype=torch.uint8))
    blur = options.absolute_blur(y)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = options.solve(x, y, blur=blur)
    sync(device)
    row = {
        "time_s": time.perf_counter() - t,
        "backend": sol.backend,
        "blur": blur,
        "n_anneal": sol.n_anneal,
        "n_iter": sol.n_iter,
        "marginal_error": sol.marginal_error,
        "converged": sol.converged,
        "velocity_rms": float(sol.velocity.float().square().mean().sqrt()),
        "warnings": [str(w.message) for w in caught],
    }
    if cuda:
        row["inputs_gib"] = before / 2**30
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del x, y, sol
    free_memory(device)
    return row


def summary_b(row: dict[str, Any]) -> str:
    if "time_s" in row:
        return (
            f"{row['time_s']:.2f} s, {row['backend']}, {row['n_anneal']}+{row['n_iter']} iterations, "
            f"marginal error {row['marginal_error']:.2e}"
        )
    return row.get("error") or row.get("note", "")


# ----------------------------------------------------------------------------------------------------------
# (c) MNIST at equal wall time


def scorer_tools() -> tuple[Any, Any, str | None]:
    """The MNIST benchmark's scorer (``benchmarks/harness/images.py``: ``get_classifier``, ``FeatureScorer``),
    or None, None and the reason it cannot be used."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        from harness.images import FeatureScorer, get_classifier
    except Exception as err:  # noqa: BLE001 - the part then trains and reports steps without scores
        return None, None, f"benchmarks/harness/images.py's scorer could not be imported ({error_text(err)})"
    return get_classifier, FeatureScorer, None


def make_scorer(feature_scorer: Any, classifier: Any, real: torch.Tensor, device: str) -> Any:
    """``FeatureScorer`` of the classifier's features computed on ``device`` in float32 (cuDNN's TF32
    convolutions would shift them): ``scorer(images) -> {classifier_fid, precision, recall}``."""
    classifier = classifier.to(device)

    def features(x: torch.Tensor) -> torch.Tensor:
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return classifier.features(x.to(device))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    return feature_scorer(features, real)


class MnistWorkers:
    """The processes that train part (c)'s methods, one group of methods each. They start with the run, so
    that their imports and data loading overlap part (a), and wait for :meth:`go` (or :meth:`stop`)."""

    def __init__(self, run: Run, data_root: str) -> None:
        self.work = tempfile.mkdtemp(prefix="gpu_check_mnist_")
        methods = available_methods()
        n = min(run.sizes.mnist_workers or len(methods), len(methods))
        self.groups = [methods[i::n] for i in range(n)]
        self.procs = []
        for group in self.groups:
            cmd = [sys.executable, os.path.abspath(__file__), "--mnist-worker", self.work]
            cmd += ["--methods", ",".join(group), "--data-root", data_root]
            proc = subprocess.Popen(cmd)
            with run.lock:
                run.children.append(proc)
            self.procs.append(proc)

    def go(self, spec: dict[str, Any]) -> None:
        write_text(os.path.join(self.work, "spec.json"), json.dumps(spec))

    def wait(self, timeout_s: float) -> None:
        """Wait for every worker until ``timeout_s`` from now; kill those still running then."""
        end = time.perf_counter() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, end - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, reason: str) -> None:
        """Tell waiting workers to exit; kill those that do not within a few seconds; remove the folder."""
        if not os.path.isdir(self.work):
            return
        if not os.path.isfile(os.path.join(self.work, "spec.json")):
            self.go({"cancel": reason})
        self.wait(5.0)
        shutil.rmtree(self.work, ignore_errors=True)


def mnist_available(data_root: str) -> bool:
    return all(os.path.isfile(path) for path in expected_files("mnist", data_root))


def part_mnist(run: Run, data_root: str, classifier_path: str, workers: MnistWorkers | None) -> None:
    sizes, device = run.sizes, run.device
    run.open_part("c", sizes.budget_c_s)
    part = run.parts["c"]
    methods = available_methods()
    part.update(methods=list(methods), data_root=os.path.abspath(data_root), classifier=classifier_path)
    missing = [path for path in expected_files("mnist", data_root) if not os.path.isfile(path)]
    # the same training time for every method, shortened only if earlier parts left less than the budget
    seconds = min(sizes.mnist_seconds, run.left("c") - sizes.mnist_slack_s)
    if missing:
        part["skipped"] = (
            f"MNIST was not found under --data-root {data_root!r} (missing {', '.join(missing)}), so part "
            "(c) did not run"
        )
    elif seconds < 0.25 * sizes.mnist_seconds:
        part["skipped"] = f"not run: {run.left('c'):.0f} s left in the run, too little to train and score"
    elif workers is None:
        part["skipped"] = "not run: no worker processes were started"
    if "skipped" in part:
        print(f"(c) skipped: {part['skipped']}", flush=True)
        if workers is not None:
            workers.stop(part["skipped"])
        run.close_part("c", status="skipped")
        return
    part.update(train_seconds=seconds, processes=len(workers.groups))
    spec = {
        "classifier": os.path.abspath(classifier_path),
        "classifier_failed": os.path.join(workers.work, "classifier.failed"),
        "device": device,
        "sizes": dataclasses.asdict(sizes),
        "train_seconds": seconds,
        # wall-clock time (time.time) by which a worker stops scoring and writes what it has
        "deadline": time.time() + run.left("c") - 3.0,
    }
    workers.go(spec)
    # while the workers train: the classifier (trained once if not cached) and the floor
    train_set = load_images("mnist", data_root)
    test_set = load_images("mnist", data_root, train=False)
    part["n_eval"] = n_eval = min(sizes.n_eval, len(train_set), len(test_set))
    get_classifier, feature_scorer, why_not = scorer_tools()
    if get_classifier is not None:
        try:
            t = time.perf_counter()
            classifier, accuracy = get_classifier(classifier_path, data_root)
            part.update(classifier_accuracy=accuracy, classifier_s=time.perf_counter() - t)
            scorer = make_scorer(feature_scorer, classifier, to_unit_range(test_set.images[:n_eval]), device)
            part["floor_scores"] = scorer(to_unit_range(train_set.images[:n_eval]))
            part["floor"] = part["floor_scores"]["classifier_fid"]
        except Exception as err:  # noqa: BLE001 - reported; the workers then train without scoring
            why_not = f"the classifier could not be built ({error_text(err)})"
    if why_not is not None:
        part["unscored"] = why_not
        write_text(spec["classifier_failed"], why_not)
    run.save("c")
    workers.wait(run.left("c"))
    for method in methods:
        path = os.path.join(workers.work, f"{slug(method)}.json")
        if os.path.isfile(path):
            with open(path) as f:
                row = json.load(f)
        else:
            row = {"method": method, "error": "its worker wrote no result"}
        if row.get("status") != "done":
            row.setdefault("note", f"incomplete: the worker stopped at {row.get('status', 'start')}")
        run.add_row("c", row)
        print(f"[{run.elapsed():6.1f} s] (c) {method}: {summary_c(row)}", flush=True)
    workers.stop("done")
    run.close_part("c")


def slug(method: str) -> str:
    return method.replace("+", "p")


def summary_c(row: dict[str, Any]) -> str:
    if "steps" not in row:
        return row.get("error") or row.get("note", "")
    scores = ", ".join(
        f"NFE {k}: {v['classifier_fid']:.2f}" if "classifier_fid" in v else f"NFE {k}: {v.get('note', '-')}"
        for k, v in row.get("scores", {}).items()
    )
    return f"{row['steps']} steps; {scores}"


def mnist_worker(work: str, methods: list[str], data_root: str) -> None:
    """Load MNIST, wait for the run's go (``work/spec.json``), then train each of ``methods`` for the same
    wall time and score its EMA weights. Exits if the run cancels it or its parent process ends."""
    parent = os.getppid()
    logging.basicConfig(level=logging.WARNING)
    train_set = load_images("mnist", data_root)
    test_images = load_images("mnist", data_root, train=False).images
    spec_path = os.path.join(work, "spec.json")
    while not os.path.isfile(spec_path):
        if os.getppid() != parent:
            return
        time.sleep(0.1)
    with open(spec_path) as f:
        spec = json.load(f)
    if "cancel" in spec:
        return
    spec["data_root"] = data_root
    sizes = Sizes(**{**spec["sizes"], "engine_points": tuple(spec["sizes"]["engine_points"])})
    torch.set_num_threads(sizes.worker_threads)
    spec["n_eval"] = min(sizes.n_eval, len(train_set), len(test_images))  # as the parent computes it
    real = to_unit_range(test_images[: spec["n_eval"]])
    scorer = None
    for method in methods:
        path = os.path.join(work, f"{slug(method)}.json")
        row: dict[str, Any] = {"method": method, "status": "training"}
        write_text(path, json.dumps(row))
        try:
            config = TrainConfig(
                dataset="mnist",
                data_root=spec["data_root"],
                method=method,
                train_steps=10**9,
                batch_size=sizes.mnist_batch,
                preset=sizes.mnist_preset,
                warmup=sizes.mnist_warmup,
                ema_decay=sizes.mnist_ema,
                time_budget_s=spec["train_seconds"],
                budget_clock="wall",
                device=spec["device"],
                progress=False,
                log_every=10**9,
                seed=0,
            )
            result = train(config, data=train_set)
            row.update(steps=result.step, train_wall_s=result.wall_time_s, status="scoring", scores={})
            write_text(path, json.dumps(row))
            if scorer is None:
                scorer, why_not = wait_for_scorer(spec, real)
                if scorer is None:
                    row["unscored"] = why_not
            for nfe in sorted(sizes.nfes, reverse=True):  # NFE 10 first: the one most worth its time
                if time.time() > spec["deadline"]:
                    row["scores"][str(nfe)] = {"note": "not scored: the part's budget was spent"}
                    continue
                row["scores"][str(nfe)] = score(result, nfe, scorer, spec)
                write_text(path, json.dumps(row))
            row["status"] = "done"
        except Exception as err:  # noqa: BLE001 - reported in the table; the next method still runs
            row.update(error=error_text(err), traceback=traceback.format_exc(limit=-4))
        write_text(path, json.dumps(row))
        result = None
        free_memory(spec["device"])


def wait_for_scorer(spec: dict[str, Any], real: torch.Tensor) -> tuple[Any, str | None]:
    """The scorer of the classifier the parent process builds (once it is written), or None and why."""
    get_classifier, feature_scorer, why_not = scorer_tools()
    while get_classifier is not None:
        if os.path.isfile(spec["classifier_failed"]):
            with open(spec["classifier_failed"]) as f:
                return None, f.read()
        if os.path.isfile(spec["classifier"]):
            classifier = get_classifier(spec["classifier"], spec["data_root"])[0]
            return make_scorer(feature_scorer, classifier, real, spec["device"]), None
        if time.time() > spec["deadline"]:
            return None, "the classifier was not ready within the part's budget"
        time.sleep(0.2)
    return None, why_not


def score(result: Any, nfe: int, scorer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Classifier FID, precision and recall of ``n_eval`` EMA samples at ``nfe``; a method that refuses the
    NFE says why."""
    t = time.perf_counter()
    try:
        gen = generate(
            result.method,
            result.ema,
            spec["n_eval"],
            result.shape,
            nfe=nfe,
            batch_size=500,
            seed=1,
            device=spec["device"],
        )
    except ValueError as err:  # e.g. NSGF++ needs T + 1 calls at least
        return {"note": f"not applicable: {err}"}
    out: dict[str, Any] = {"nfe": gen.total_nfe, "breakdown": gen.nfe}
    if scorer is not None:
        out.update(scorer(gen.samples))
    out["sample_and_score_s"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------------------------------------
# The README


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def readme(run: Run) -> str:
    env, sizes = run.environment, run.sizes
    lines = [
        "# GPU check: training throughput, the Sinkhorn engine at scale, MNIST at equal wall time",
        "",
        f"- card: **{env['card']}**"
        + (f" ({env['gpu_memory_gib']:.0f} GiB)" if env["gpu_memory_gib"] else ""),
        f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}, "
        f"{env['cpu_count']} CPU cores, commit {env['commit']}",
        f"- date: {env['date']}; total wall time {env.get('total_wall_s', run.elapsed()):.0f} s "
        f"(guard {sizes.total_s:.0f} s)",
        "- command:",
        "",
        f"      {env['command']}",
        "",
    ]
    lines += readme_a(run.parts["a"], sizes) + readme_b(run.parts["b"]) + readme_c(run.parts["c"], sizes)
    return "\n".join(lines) + "\n"


def status_line(part: dict[str, Any]) -> list[str]:
    wall = f", {part['wall_s']:.0f} s" if "wall_s" in part else ""
    budget = f" of a {part['budget_s']:.0f} s budget" if "budget_s" in part else ""
    return [f"Status: {part['status']}{wall}{budget}.", ""]


def readme_a(part: dict[str, Any], sizes: Sizes) -> list[str]:
    lines = [
        f"## {part['title']}",
        "",
        f"Every registered method ({', '.join(part.get('methods', []))}), the library's training loop, UNet "
        f"preset `{sizes.preset}`, batch {sizes.batch}, fp32, random uint8 images of shape 3x32x32. Timed: "
        f"{sizes.window} steps resumed from the checkpoint a warm-up run wrote at step {sizes.warm} (CUDA set-up, "
        "first kernels and the pool fill excluded), synchronised. Network passes per step: rows through any of "
        f"the method's networks per batch row, counted by forward hooks over {sizes.pass_steps} loss calls "
        "after the pool fill (OT-CFM: 1; a forward-mode JVP, as in MeanFlow, counts as one pass).",
        "",
    ]
    lines += status_line(part)
    lines += [
        "| method | images/s | steps/s | network passes / step | forward calls / step | passes by network | "
        "warm-up run (s) | note |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in part["rows"]:
        by_net = ", ".join(f"{k} {v:.2f}" for k, v in r.get("passes_by_network", {}).items())
        lines.append(
            f"| {r['method']} | {fmt(r.get('images_per_s'), 1)} | {fmt(r.get('steps_per_s'))} | "
            f"{fmt(r.get('passes_per_step'))} | {fmt(r.get('calls_per_step'))} | {by_net or '—'} | "
            f"{fmt(r.get('warmup_run_s'), 1)} | {r.get('error') or r.get('note', '')} |"
        )
    return lines + [""]


def readme_b(part: dict[str, Any]) -> list[str]:
    opts = part.get("options", {})
    lines = [
        f"## {part['title']}",
        "",
        f"One velocity solve (`SinkhornOptions.solve`, the image methods' settings: relative blur "
        f"{opts.get('blur')}, scaling {opts.get('scaling')}, tol {opts.get('tol')}, backend `auto`) of n "
        "N(0, I) particles against n random images in [-1, 1], d = 3072, float32. Iterations: ε-scaling levels "
        "+ iterations at the final ε.",
        "",
    ]
    lines += status_line(part)
    if "float32_matmul_tflops" in part:
        lines += [f"Measured float32 matrix-product rate: {part['float32_matmul_tflops']:.1f} TFLOP/s.", ""]
    lines += [
        "| points | backend (auto) | time (s) | iterations | marginal error | converged | peak memory (GiB) | "
        "note |",
        "|---:|---|---:|---|---:|---|---:|---|",
    ]
    for r in part["rows"]:
        iters = f"{r['n_anneal']} + {r['n_iter']}" if "n_iter" in r else "—"
        err = f"{r['marginal_error']:.2e}" if "marginal_error" in r else "—"
        note = (
            r.get("error")
            or r.get("note")
            or "; ".join(r.get("warnings", []))
            or r.get("peak_memory_note", "")
        )
        if "predicted_s" in r and "time_s" in r:
            note = (note + "; " if note else "") + f"predicted {r['predicted_s']:.1f} s"
        lines.append(
            f"| {r['points']} | {r.get('backend', r['auto_backend_predicted'])} | {fmt(r.get('time_s'))} | "
            f"{iters} | {err} | {fmt(r.get('converged'))} | {fmt(r.get('peak_memory_gib'))} | {note} |"
        )
    return lines + [""]


def floor_text(scores: dict[str, float] | None) -> str:
    if not scores:
        return "—"
    return f"FID {scores['classifier_fid']:.2f}; P {scores['precision']:.2f} / R {scores['recall']:.2f}"


def readme_c(part: dict[str, Any], sizes: Sizes) -> list[str]:
    lines = [f"## {part['title']}", ""]
    if "skipped" in part:
        return lines + [f"**Skipped**: {part['skipped']}", ""]
    lines += [
        f"Every registered method trained {fmt(part.get('train_seconds'), 1)} s of wall time (pool warm-up included) from "
        f"scratch, all at the same time ({part.get('processes', '?')} process(es) on one device); UNet preset "
        f"`{sizes.mnist_preset}`, batch {sizes.mnist_batch}, Adam 2e-4, warm-up {sizes.mnist_warmup}, EMA "
        f"{sizes.mnist_ema}. EMA weights, Euler sampling; scored by `benchmarks/harness/images.py` (the seeded "
        f"classifier of `benchmarks/mnist.py`, test accuracy {fmt(part.get('classifier_accuracy'), 4)}): "
        f"classifier FID (not FID), k-NN precision P and recall R of {part.get('n_eval')} generated against "
        f"{part.get('n_eval')} test images. Floor ({part.get('n_eval')} training against {part.get('n_eval')} "
        f"test images): {floor_text(part.get('floor_scores'))}. A cell reads FID (NFE breakdown); P / R.",
        "",
    ]
    if "unscored" in part:
        lines += [f"Not scored: {part['unscored']}.", ""]
    lines += status_line(part)
    nfes = [str(n) for n in sizes.nfes]
    lines += [
        "| method | steps | " + " | ".join(f"NFE {n}" for n in nfes) + " | note |",
        "|---|---:|" + "---:|" * len(nfes) + "---|",
    ]
    for r in part["rows"]:
        cells = []
        for n in nfes:
            s = r.get("scores", {}).get(n)
            if s is None:
                cells.append("—")
            elif "classifier_fid" in s:
                parts = list(s["breakdown"].values())
                detail = "" if len(parts) == 1 else " (" + "+".join(str(v) for v in parts) + ")"
                cells.append(f"{s['classifier_fid']:.2f}{detail}; {s['precision']:.2f} / {s['recall']:.2f}")
            else:
                cells.append(s.get("note", "—").split(":")[0])
        notes = [r.get("error"), r.get("note"), r.get("unscored")]
        notes += [f"NFE {n}: {s['note']}" for n, s in r.get("scores", {}).items() if "note" in s]
        lines.append(
            f"| {r['method']} | {fmt(r.get('steps'))} | "
            + " | ".join(cells)
            + f" | {'; '.join(x for x in notes if x)} |"
        )
    return lines + [""]


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (created; its JSON files and README.md are replaced)")
    p.add_argument(
        "--data-root", default=os.path.join(HERE, "..", "..", "shared", "data"), help="holds MNIST/raw"
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument(
        "--total-s", type=float, default=None, help="time guard of the whole run (default 480; smoke 300)"
    )
    p.add_argument(
        "--classifier",
        default=os.path.join(HERE, "results", "mnist_classifier.pt"),
        help="benchmarks/mnist.py's classifier cache (trained and written there when missing)",
    )
    p.add_argument("--mnist-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--methods", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mnist_worker:
        return mnist_worker(args.mnist_worker, args.methods.split(","), args.data_root)
    if not args.out:
        p.error("--out is required")
    sizes = SMOKE if args.smoke else GPU
    if args.total_s is not None:
        if not args.total_s > 0:
            p.error(f"--total-s must be positive, got {args.total_s}")
        sizes = dataclasses.replace(sizes, total_s=args.total_s)
    device = args.device or sizes.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --smoke (or --device cpu, which the budgets will cut short)")
    sizes = dataclasses.replace(sizes, device=device)
    logging.basicConfig(level=logging.WARNING)
    command = "python benchmarks/gpu_check.py " + shlex.join(argv)
    run = Run(args.out, sizes, command, device)
    print(
        f"gpu_check on {run.environment['card']}, torch {torch.__version__}; results in {args.out}",
        flush=True,
    )
    watchdog = run.start_watchdog()
    workers = MnistWorkers(run, args.data_root) if mnist_available(args.data_root) else None
    try:
        for key in ORDER:
            if key == "a":
                part_throughput(run)
            elif key == "c":
                part_mnist(run, args.data_root, args.classifier, workers)
            else:
                part_engine(run)
    finally:
        if workers is not None:
            workers.stop("the run ended")
    watchdog.cancel()
    run.finish()
    print(f"[{run.elapsed():6.1f} s] done: {os.path.join(args.out, 'README.md')}", flush=True)


if __name__ == "__main__":
    main()
