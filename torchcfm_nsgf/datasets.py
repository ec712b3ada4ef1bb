r"""The paper's 2D tasks as seeded samplers (Zhu et al., 2024, Sec. 5.1).

Tasks: a standard Gaussian to 8gaussians, moons, scurve or checkerboard, and 8gaussians to moons.
8gaussians and moons are torchcfm's samplers; scurve and checkerboard are defined here (torchcfm has
neither; written without scikit-learn so that every sampler takes a ``torch.Generator``).

Class-conditional task: ``get_task("gaussian-8gaussians-conditional")`` (a :class:`ConditionalTask`) draws the
8gaussians target with its mode index as the label (:func:`sample_8gaussians_labelled`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchcfm.utils import sample_8gaussians, sample_moons

__all__ = [
    "CONDITIONAL_TASKS",
    "TASKS",
    "ConditionalTask",
    "Task",
    "get_task",
    "sample_8gaussians_labelled",
    "sample_checkerboard",
    "sample_gaussian",
    "sample_scurve",
]

SampleFn = Callable[[int, "torch.Generator | None"], Tensor]
LabelledSampleFn = Callable[[int, "torch.Generator | None"], "tuple[Tensor, Tensor]"]


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
