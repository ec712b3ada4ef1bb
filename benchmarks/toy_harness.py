r"""The 2D training harness of ``benchmarks/`` (and of ``tests/test_toy.py``): torchcfm's loop for any matcher,
NSGF through it, and the one 2D NSGF++ setup.

:func:`train_flow_matching` is torchcfm's loop, ``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1);
loss = mean((v(t, xt) - ut)^2)``, for any matcher, NSGF's :class:`~torchcfm_nsgf.SinkhornFlowMatcher`
included, with a step count or a time budget; :func:`train_nsgf` runs it with NSGF's matcher (Algorithm 1:
flows into a trajectory pool); :func:`train_nsgfpp` builds and trains NSGF++
(:class:`~torchcfm_nsgf.NSGFPlusPlus`, any variant) on a task with the same MLP width. A trained method
answers what the benchmark asks (:class:`Sampler`). The tasks and the metric are the library's
(:mod:`torchcfm_nsgf.datasets`, :mod:`torchcfm_nsgf.metrics`).

Class-conditional tasks: the loop takes torchcfm's guided targets,
``matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)``, and a label-taking field
``v(t, x, y)`` (:func:`make_conditional_model`), and samples with ``extra_args={"y": y}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchcfm.models import MLP
from torchcfm.utils import torch_wrapper
from tqdm.auto import tqdm

from torchcfm_nsgf import NSGFPlusPlus, NSGFPlusPlusOptions, SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf._deprecation import rename_keywords
from torchcfm_nsgf._validation import check_positive
from torchcfm_nsgf.datasets import ConditionalTask, Task
from torchcfm_nsgf.networks import TimePredictorMLP, VelocityMLP
from torchcfm_nsgf.sampling import odeint_sample

__all__ = [
    "Sampler",
    "TrainedField",
    "make_conditional_model",
    "make_model",
    "train_flow_matching",
    "train_nsgf",
    "train_nsgfpp",
]

#: ``sample_batch(n) -> (x0, x1)``, or ``(x0, x1, y1)`` for class-conditional training.
BatchFn = Callable[[int], "tuple[Tensor, ...]"]


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
    with tqdm(total=total, desc=desc, disable=None if progress else True, leave=False) as bar:
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
    options: NSGFPlusPlusOptions | None = None,
    *,
    train_steps: int,
    generator: torch.Generator,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 64,
    sinkhorn: SinkhornOptions | None = None,
    progress: bool = False,
    **changes: Any,
) -> NSGFPlusPlus:
    """Build NSGF++ for ``task`` (MLPs of ``width``) and train it for ``train_steps`` steps; returns the model.

    Networks: :class:`~torchcfm_nsgf.networks.VelocityMLP` for the NSGF field and the straight flow,
    :class:`~torchcfm_nsgf.networks.TimePredictorMLP` for the predictor (variants with one); initialised from
    torch's global RNG (seed it before). Every step draws fresh task batches from ``generator``. ``options``
    (default ``NSGFPlusPlusOptions()``: T = 2, η = 1) with ``changes`` (its field names; ``n_steps`` is the
    deprecated name of ``flow_steps``), except that the pool's ``refresh_every`` defaults to
    ``max(1, train_steps // 6)`` here (about 6 flows in all) unless ``changes`` gives it. A
    :class:`ConditionalTask` builds the networks with ``num_classes`` and trains on the task's labelled target
    (``fit`` with a target function returning ``(x1, y1)``); sample it with ``y``.
    """
    check_positive(train_steps, "train_steps", integer=True)
    changes = rename_keywords(changes, {"n_steps": "flow_steps"}, "train_nsgfpp")
    if changes.get("refresh_every") is None:
        changes["refresh_every"] = max(1, train_steps // 6)
    options = (options or NSGFPlusPlusOptions()).replace(**changes)
    k = task.num_classes if isinstance(task, ConditionalTask) else None
    model = NSGFPlusPlus(
        VelocityMLP(2, width, num_classes=k),
        TimePredictorMLP(2, width, num_classes=k) if options.uses_predictor else None,
        VelocityMLP(2, width, num_classes=k),
        options,
        sinkhorn=sinkhorn,
        lr=lr,
        generator=generator,
        progress=progress,
    )
    model.fit(
        lambda n: task.source(n, generator), lambda n: task.target(n, generator), train_steps, batch_size
    )
    return model


def _child_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))
