r"""The paper's 2D tasks, the exact W2 metric and the training loop shared by ``examples/two_dim.py`` and
``benchmarks/two_dim.py``.

Tasks (Zhu et al., 2024, Sec. 5.1): a standard Gaussian to 8gaussians, moons, scurve or checkerboard, and
8gaussians to moons. 8gaussians and moons are torchcfm's samplers; scurve and checkerboard are defined here
(torchcfm has neither; written without scikit-learn so that every sampler takes a ``torch.Generator``).

Metric: the exact 2-Wasserstein distance between two point clouds with uniform weights,
:math:`W_2(\mu, \nu) = (\min_\pi \sum_{ij} \pi_{ij} \|x_i - y_j\|^2)^{1/2}`, by POT's network simplex
(``ot.emd2``) in float64.

Training: :func:`train_flow_matching` is torchcfm's loop, ``t, xt, ut = FM.sample_location_and_conditional_flow
(x0, x1); loss = mean((v(t, xt) - ut)^2)``, for any matcher, NSGF's :class:`~torchcfm_nsgf.SinkhornFlowMatcher`
included; :func:`train_nsgf` runs that loop with NSGF's matcher (Algorithm 1: flows into a trajectory pool).
:func:`train_nsgfpp` builds and trains NSGF++ (:class:`~torchcfm_nsgf.NSGFPlusPlus`, either variant) on a task
with the same MLP width: the one 2D NSGF++ setup of the benchmarks.

Class-conditional task: ``get_task("gaussian-8gaussians-conditional")`` (a :class:`ConditionalTask`) draws the
8gaussians target with its mode index as the label (:func:`sample_8gaussians_labelled`); the training loop then
takes torchcfm's guided targets, ``matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)``, and a
label-taking field ``v(t, x, y)`` (:func:`make_conditional_model`), and samples with ``extra_args={"y": y}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import ot
import torch
from torch import Tensor, nn
from torchcfm.models import MLP
from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
from tqdm.auto import tqdm

from ._validation import check_positive
from .matcher import SinkhornFlowMatcher
from .networks import TimePredictorMLP, VelocityMLP
from .nsgfpp import DEFAULT_PHASE2, PREDICTOR_VARIANTS, NSGFPlusPlus
from .sampling import odeint_sample
from .sinkhorn import SinkhornOptions

__all__ = [
    "CONDITIONAL_TASKS",
    "TASKS",
    "ConditionalTask",
    "Sampler",
    "Task",
    "TrainedField",
    "get_task",
    "make_conditional_model",
    "make_model",
    "sample_8gaussians_labelled",
    "sample_checkerboard",
    "sample_gaussian",
    "sample_scurve",
    "train_flow_matching",
    "train_nsgf",
    "train_nsgfpp",
    "w2",
]

SampleFn = Callable[[int, "torch.Generator | None"], Tensor]
LabelledSampleFn = Callable[[int, "torch.Generator | None"], "tuple[Tensor, Tensor]"]
#: ``sample_batch(n) -> (x0, x1)``, or ``(x0, x1, y1)`` for class-conditional training.
BatchFn = Callable[[int], "tuple[Tensor, ...]"]


# ---------------------------------------------------------------------------------------------- samplers
def sample_gaussian(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of the standard normal in 2D, shape (n, 2)."""
    return torch.randn(n, 2, generator=generator)


def sample_scurve(n: int, generator: torch.Generator | None = None, noise: float = 0.1) -> Tensor:
    r"""``n`` points on a 2D S-shaped curve, shape (n, 2), in about [-1.5, 1.5] x [-3, 3].

    With :math:`s \sim U(-\tfrac32\pi, \tfrac32\pi)`: :math:`1.5\,(\sin s,\ \mathrm{sign}(s)(\cos s - 1))`
    plus isotropic Gaussian noise of standard deviation ``noise`` (the (x, z) projection of the usual
    3D S-curve, scaled to the moons' size).
    """
    s = (torch.rand(n, generator=generator) - 0.5) * 3 * math.pi
    x = torch.stack([torch.sin(s), torch.sign(s) * (torch.cos(s) - 1)], dim=1) * 1.5
    return x + noise * torch.randn(n, 2, generator=generator)


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points uniform on the 8 black squares (side 2) of a 4 x 4 checkerboard on [-4, 4]², shape (n, 2)."""
    x = torch.rand(n, generator=generator) * 4 - 2
    row = torch.randint(0, 2, (n,), generator=generator) * 2
    y = torch.rand(n, generator=generator) - row + torch.floor(x).remainder(2)
    return torch.stack([x, y], dim=1) * 2


#: The 8 modes of torchcfm's ``sample_8gaussians``, in its order (the label of a mode is its index here).
_EIGHT_CENTRES = 5.0 * torch.tensor(
    [
        (1.0, 0.0),
        (-1.0, 0.0),
        (0.0, 1.0),
        (0.0, -1.0),
        (1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), 1.0 / math.sqrt(2)),
        (-1.0 / math.sqrt(2), -1.0 / math.sqrt(2)),
    ]
)


def sample_8gaussians_labelled(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` draws of torchcfm's 8gaussians with their mode: points (n, 2) and int64 labels (n,) in [0, 8).

    The distribution of torchcfm's ``sample_8gaussians``: a uniformly drawn mode of radius 5 plus Gaussian noise
    of covariance ``sqrt(0.1) I`` (torchcfm passes ``sqrt(var)`` as the covariance), drawn from ``generator``.
    """
    y = torch.randint(0, 8, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator) * 0.1**0.25
    return _EIGHT_CENTRES[y] + noise, y


def _seeded(sampler: Callable[[int], Tensor]) -> SampleFn:
    """Make a torchcfm sampler reproducible from a ``torch.Generator``.

    torchcfm's samplers draw from the global RNGs (8gaussians: torch's; moons: NumPy's, via torchdyn's
    ``generate_moons``). They run here under both global states seeded from the generator, and both are
    restored afterwards, so the caller's global RNG streams are left untouched. The rows are shuffled:
    ``generate_moons`` returns the upper moon first, so a prefix of its output would not be a sample.
    """

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        if generator is None:
            return sampler(n).float()[torch.randperm(n)]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        # torchdyn draws from NumPy's legacy global RNG: pinning and restoring its state is the only handle.
        numpy_state = np.random.get_state()  # noqa: NPY002
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)  # noqa: NPY002
                return sampler(n).float()[torch.randperm(n)]
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002

    return sample


@dataclass(frozen=True)
class Task:
    """A 2D transport task: draw ``source(n, generator)`` and ``target(n, generator)``, each (n, 2).

    ``gaussian_source`` says whether the source is the standard normal (torchcfm's
    ``TargetConditionalFlowMatcher``, "FM", needs one).
    """

    name: str
    label: str
    source: SampleFn
    target: SampleFn
    gaussian_source: bool


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "gaussian-8gaussians", "N(0, I) → 8gaussians", sample_gaussian, _seeded(sample_8gaussians), True
        ),
        Task("gaussian-moons", "N(0, I) → moons", sample_gaussian, _seeded(sample_moons), True),
        Task("gaussian-scurve", "N(0, I) → scurve", sample_gaussian, sample_scurve, True),
        Task("gaussian-checkerboard", "N(0, I) → checkerboard", sample_gaussian, sample_checkerboard, True),
        Task(
            "8gaussians-moons", "8gaussians → moons", _seeded(sample_8gaussians), _seeded(sample_moons), False
        ),
    )
}


@dataclass(frozen=True)
class ConditionalTask:
    """A class-conditional 2D task: ``source(n, generator)`` (n, 2) and ``target(n, generator) -> (x, y)``,
    points (n, 2) with int64 labels (n,) in ``[0, num_classes)``."""

    name: str
    label: str
    source: SampleFn
    target: LabelledSampleFn
    num_classes: int
    gaussian_source: bool = True


CONDITIONAL_TASKS: dict[str, ConditionalTask] = {
    task.name: task
    for task in (
        ConditionalTask(
            "gaussian-8gaussians-conditional",
            "N(0, I) → 8gaussians | mode",
            sample_gaussian,
            sample_8gaussians_labelled,
            8,
        ),
    )
}


def get_task(name: str) -> Task | ConditionalTask:
    """The task called ``name`` (a key of :data:`TASKS` or :data:`CONDITIONAL_TASKS`); ``ValueError`` naming
    the choices otherwise."""
    if name in TASKS:
        return TASKS[name]
    if name in CONDITIONAL_TASKS:
        return CONDITIONAL_TASKS[name]
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS) + sorted(CONDITIONAL_TASKS)}")


# ---------------------------------------------------------------------------------------------- metric
def w2(x: Tensor, y: Tensor) -> float:
    r"""Exact 2-Wasserstein distance between the uniform empirical measures on ``x`` (n, d) and ``y`` (m, d).

    Solved by POT's network simplex (``ot.emd2``) on the squared Euclidean cost in float64; returns
    :math:`W_2` (not its square). Exact, hence :math:`O(n^3)`-ish: about 0.4 s for n = m = 1000 on one core.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (n, d) and (m, d) clouds, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x64 = x.detach().cpu().double()
    y64 = y.detach().cpu().double()
    if not bool(torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        return math.inf
    cost = ot.dist(x64, y64).numpy()
    value = ot.emd2(ot.unif(len(x64)), ot.unif(len(y64)), cost, numItermax=10_000_000)
    return math.sqrt(max(float(value), 0.0))


# ---------------------------------------------------------------------------------------------- fields
def make_model(width: int = 64, dim: int = 2) -> nn.Module:
    """torchcfm's time-varying ``MLP(dim, w=width)``: input ``cat([x, t[:, None]], -1)``, output (n, dim)."""
    return MLP(dim=dim, w=width, time_varying=True)


def make_conditional_model(num_classes: int, width: int = 64, dim: int = 2) -> nn.Module:
    """A class-conditional field ``v(t, x, y)``: torchcfm's MLP with a label embedding in the input
    (:class:`~torchcfm_nsgf.networks.VelocityMLP` with ``num_classes``)."""
    return VelocityMLP(dim, width, num_classes=num_classes)


class Sampler(Protocol):
    """What the benchmark asks of a trained method (NSGF++ plugs in with the same two members)."""

    train_time_s: float

    def sample(self, x0: Tensor, nfe: int | None, solver: str = "euler") -> tuple[Tensor, int]: ...


@dataclass
class TrainedField:
    """A learned velocity field ``field(t, x)`` integrated from t = 0 to 1, and what training it cost.

    Attributes
    ----------
    field : nn.Module
        ``field(t, x) -> dx/dt`` (torchcfm's ``torch_wrapper`` around the trained MLP), x of shape (n, 2); for
        a class-conditional model ``field(t, x, y=labels)``.
    train_time_s : float
        Wall-clock seconds of training, simulation (NSGF) or pair generation (2-RF) included.
    n_opt_steps : int
        Optimiser steps taken.
    losses : list of float
        The training loss at every step.
    """

    field: nn.Module
    train_time_s: float
    n_opt_steps: int
    losses: list[float]

    def sample(
        self, x0: Tensor, nfe: int | None, solver: str = "euler", y: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """Integrate ``x0`` (n, 2) with ``nfe`` steps of a fixed-step ``solver``, or with an adaptive one
        (``nfe=None``), by :func:`~torchcfm_nsgf.odeint_sample`; labels ``y`` (n,) for a conditional field.

        Returns the samples (n, 2) and the number of field evaluations actually used.
        """
        extra = None if y is None else {"y": y}
        result = odeint_sample(self.field, x0, solver=solver, n_steps=nfe, extra_args=extra)
        return result.samples, result.total_nfe


# ---------------------------------------------------------------------------------------------- training
def train_flow_matching(
    model: nn.Module,
    matcher,
    sample_batch: BatchFn,
    *,
    train_steps: int | None,
    batch_size: int = 256,
    lr: float = 1e-3,
    time_budget_s: float | None = None,
    time_offset_s: float = 0.0,
    progress: bool = False,
    desc: str = "training",
) -> TrainedField:
    """torchcfm's training loop: ``t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)``,
    ``vt = model(cat([xt, t[:, None]], -1))``, ``loss = mean((vt - ut)^2)``, Adam.

    Class-conditional when ``sample_batch`` returns ``(x0, x1, y1)``: ``t, xt, ut, _, y =
    matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)`` (a matcher without that method, e.g.
    ``ConditionalFlowMatcher``, keeps ``y = y1`` with its independent pairs) and ``vt = model(t, xt, y=y)``.

    Parameters
    ----------
    model : nn.Module
        torchcfm's time-varying MLP (see :func:`make_model`), or a field ``model(t, x, y)`` for
        class-conditional training (:func:`make_conditional_model`); trained in place.
    matcher
        Any torchcfm matcher (``sample_location_and_conditional_flow``), NSGF's included.
    sample_batch : callable
        ``sample_batch(batch_size) -> (x0, x1)``, each (batch_size, 2), or ``(x0, x1, y1)`` with labels
        ``y1`` (batch_size,).
    train_steps : int or None
        Number of optimiser steps; None trains until ``time_budget_s`` instead.
    batch_size, lr : int, float
        Minibatch size and Adam learning rate.
    time_budget_s : float, optional
        Stop once the wall-clock time (``time_offset_s`` included) reaches it; exactly one of ``train_steps`` and
        ``time_budget_s`` must be given.
    time_offset_s : float
        Seconds already spent before this loop (2-RF's first rectified flow), added to ``train_time_s``.
    progress : bool
        Show a tqdm bar.
    """
    if (train_steps is None) == (time_budget_s is None):
        raise ValueError("give exactly one of train_steps and time_budget_s")
    if train_steps is not None and train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    start = time.perf_counter() - time_offset_s
    total = train_steps
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        while True:
            batch = sample_batch(batch_size)
            conditional = len(batch) == 3
            if conditional:
                x0, x1, y1 = batch
                guided = getattr(matcher, "guided_sample_location_and_conditional_flow", None)
                if guided is None:
                    t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
                    y = y1
                else:
                    t, xt, ut, _, y = guided(x0, x1, y1=y1)[:5]
                vt = model(t, xt, y=y)
            else:
                x0, x1 = batch
                t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
                vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3g}")
            elapsed = time.perf_counter() - start
            if train_steps is not None and len(losses) >= train_steps:
                break
            if time_budget_s is not None and elapsed >= time_budget_s:
                break
    model.eval()
    return TrainedField(
        field=model if conditional else torch_wrapper(model),
        train_time_s=elapsed,
        n_opt_steps=len(losses),
        losses=losses,
    )


def train_nsgf(
    task: Task | ConditionalTask,
    matcher: SinkhornFlowMatcher | None = None,
    *,
    train_steps: int | None,
    generator: torch.Generator,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 64,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> TrainedField:
    """Train NSGF on ``task`` with torchcfm's loop and a :class:`SinkhornFlowMatcher` (its defaults if None).

    Every call of the loop draws a fresh ``(x0, x1)`` batch of the task; the matcher simulates flows from
    those batches into its pool and serves the regression batches (Algorithm 1). ``train_time_s`` includes
    all simulation. The field is returned in eval mode. A :class:`ConditionalTask` trains the class-conditional
    field :func:`make_conditional_model` on guided targets (one Sinkhorn flow per class); sample it with
    ``y``.
    """
    if matcher is None:
        matcher = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(_child_seed(generator)))
    if isinstance(task, ConditionalTask):
        model = make_conditional_model(task.num_classes, width)

        def sample_batch(bs: int) -> tuple[Tensor, ...]:
            return (task.source(bs, generator), *task.target(bs, generator))

    else:
        model = make_model(width)

        def sample_batch(bs: int) -> tuple[Tensor, ...]:
            return task.source(bs, generator), task.target(bs, generator)

    return train_flow_matching(
        model,
        matcher,
        sample_batch,
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        time_budget_s=time_budget_s,
        progress=progress,
        desc="NSGF",
    )


def train_nsgfpp(
    task: Task | ConditionalTask,
    *,
    phase2: str = DEFAULT_PHASE2,
    train_steps: int,
    generator: torch.Generator,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 64,
    n_steps: int = 2,
    step_size: float = 1.0,
    sinkhorn: SinkhornOptions | None = None,
    refresh_every: int | None = None,
    progress: bool = False,
    endpoints: str = "simulated",
) -> NSGFPlusPlus:
    """Build NSGF++ for ``task`` (MLPs of ``width``) and train it for ``train_steps`` steps; returns the model.

    Networks: :class:`~torchcfm_nsgf.networks.VelocityMLP` for the NSGF field and the straight flow,
    :class:`~torchcfm_nsgf.networks.TimePredictorMLP` for the predictor (``"paper"``, ``"ot-predictor"``);
    initialised from torch's global RNG (seed it before). Every step draws fresh task batches from ``generator``. The
    NSGF phase: ``n_steps`` Sinkhorn steps of ``step_size`` (T = 2, η = 1: the phase-1 sweep of BENCHMARKS.md
    §4), a new flow into the pool every ``refresh_every`` steps
    (default: about 6 flows in all). A :class:`ConditionalTask` builds the networks with ``num_classes`` and
    trains on the task's labelled target (``fit`` with a target function returning ``(x1, y1)``); sample it
    with ``y``. ``endpoints``: where the ``"ot"`` variants' phase-2 segments start
    (:class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`).
    """
    check_positive(train_steps, "train_steps", integer=True)
    k = task.num_classes if isinstance(task, ConditionalTask) else None
    model = NSGFPlusPlus(
        VelocityMLP(2, width, num_classes=k),
        TimePredictorMLP(2, width, num_classes=k) if phase2 in PREDICTOR_VARIANTS else None,
        VelocityMLP(2, width, num_classes=k),
        phase2=phase2,
        n_steps=n_steps,
        step_size=step_size,
        sinkhorn=sinkhorn,
        refresh_every=refresh_every if refresh_every is not None else max(1, train_steps // 6),
        lr=lr,
        generator=generator,
        progress=progress,
        endpoints=endpoints,
    )
    model.fit(
        lambda n: task.source(n, generator), lambda n: task.target(n, generator), train_steps, batch_size
    )
    return model


def _child_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))
