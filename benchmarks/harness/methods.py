r"""The 2D methods by name: ``METHODS[name](task, config, seed) -> Sampler``, and the settings they share.

Every method trains from scratch on a task (:mod:`torchcfm_nsgf.datasets`) within the budget of a
:class:`BenchConfig` (``train_steps`` optimiser steps, or ``time_budget_s`` seconds of its ``clock``), with the
same MLP width, batch, Adam learning rate and seeded data draws, and returns an object with
``sample(x0, nfe, solver) -> (samples, nfe_used)`` and ``train_time_s`` (:class:`~harness.loop.Sampler`).
With ``config.ema`` the returned sampler integrates EMA weights; with ``config.snapshot_every`` (the
torchcfm-loop methods) it also holds snapshots of them during training.

A new method is one registration::

    register("name", "label in tables", nfes=(1,))(fn)  # fn(task, config, seed) -> Sampler

or, for a function in another benchmarks module (imported at the first call, so that module may import this
one)::

    register("drift", "SinkhornDrift (one step)", nfes=(1,))(lazy("one_step", "train_drift"))

A *family* answers every name ``prefix:arg`` (``nsgf:1024`` is NSGF with flows of 1024 particles,
:func:`register_family`).
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torchcfm.conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
)

from torchcfm_nsgf import (
    NSGFPlusPlus,
    NSGFPlusPlusOptions,
    SinkhornCouplingMatcher,
    SinkhornFlowMatcher,
    SinkhornOptions,
    euler_sample,
)
from torchcfm_nsgf._deprecation import rename_keywords
from torchcfm_nsgf._validation import check_positive
from torchcfm_nsgf.datasets import ConditionalTask, Task
from torchcfm_nsgf.networks import TimePredictorMLP, VelocityMLP
from torchcfm_nsgf.nsgfpp import DEFAULT_PHASE2

from .loop import (
    EMA,
    Sampler,
    StepClock,
    TrainedField,
    check_stop_rule,
    make_conditional_model,
    make_model,
    train_flow_matching,
)

__all__ = [
    "FAMILIES",
    "LABELS",
    "METHODS",
    "NFES_OF",
    "BenchConfig",
    "NotApplicable",
    "label_of",
    "lazy",
    "method_fn",
    "register",
    "register_family",
    "train_nsgf",
    "train_nsgfpp",
]


@dataclass(frozen=True)
class BenchConfig:
    """Shared training settings. Exactly one of ``train_steps`` and ``time_budget_s`` is set.

    ``time_budget_s`` is measured on ``clock``: ``"cpu"`` (``time.process_time``, training only) or ``"wall"``.
    ``ema``: the EMA decay of the evaluated weights (None: the last weights). ``snapshot_every``: keep the
    evaluated weights every this many steps too (curves from one run). ``nsgf`` holds the
    :class:`SinkhornFlowMatcher` arguments (``sinkhorn`` as a dict of :class:`SinkhornOptions` fields); empty
    means the matcher's defaults. ``extra`` holds settings of methods registered elsewhere (by name).
    """

    train_steps: int | None = 1000
    time_budget_s: float | None = None
    clock: str = "wall"
    ema: float | None = None
    snapshot_every: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    width: int = 64
    sigma: float = 0.1  # I-CFM, OT-CFM, FM
    sb_sigma: float = 0.5  # SB-CFM (torchcfm default ot_method="exact")
    reflow_pairs: int = 10_000  # 2-RF: pairs (x0, 1-RF(x0)) generated with 100 Euler steps
    nsgf: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_stop_rule(self.train_steps, self.time_budget_s)

    def __getattr__(self, name: str) -> object:
        """A setting of a method registered elsewhere, by name, from ``extra`` (e.g. ``config.drift``)."""
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"BenchConfig has no field or extra setting {name!r}")

    @property
    def ema_decay(self) -> float | None:
        """The name under which some method functions read :attr:`ema`."""
        return self.ema

    def loop_kwargs(self) -> dict:
        """The keyword arguments of :func:`~harness.loop.train_flow_matching` this config sets."""
        return {name: getattr(self, name) for name in LOOP_FIELDS}


#: The fields of :class:`BenchConfig` that torchcfm's loop takes as they are.
LOOP_FIELDS = ("train_steps", "batch_size", "lr", "time_budget_s", "clock", "ema", "snapshot_every")


class NotApplicable(Exception):
    """The method does not apply to the task or budget (FM needs a Gaussian source)."""


MethodFn = Callable[[Task, BenchConfig, int], Sampler]
METHODS: dict[str, MethodFn] = {}
LABELS: dict[str, str] = {}
#: The NFEs a method is evaluated at when a study does not say (absent: the study's own list).
NFES_OF: dict[str, tuple[int, ...]] = {}
#: ``prefix -> (factory(arg) -> MethodFn, label format with {arg})``: the names ``prefix:arg``.
FAMILIES: dict[str, tuple[Callable[[str], MethodFn], str]] = {}


def register(name: str, label: str, *, nfes: tuple[int, ...] | None = None) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(task, config, seed) -> Sampler`` as ``name`` (``label`` in tables; ``nfes``: its default
    evaluation NFEs, e.g. ``(1,)`` for a one-step generator)."""
    if ":" in name or "@" in name:
        raise ValueError(f"a method name cannot hold ':' or '@', got {name!r}")

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        LABELS[name] = label
        if nfes is not None:
            NFES_OF[name] = tuple(nfes)
        return fn

    return add


def register_family(prefix: str, label: str, factory: Callable[[str], MethodFn]) -> None:
    """Answer every name ``prefix:arg`` with ``factory(arg)``; ``label`` may hold ``{arg}``."""
    FAMILIES[prefix] = (factory, label)


def lazy(module: str, attr: str) -> MethodFn:
    """A method function ``module.attr`` of another benchmarks module, imported at its first call."""

    def fn(task: Task, config: BenchConfig, seed: int) -> Sampler:
        return getattr(importlib.import_module(module), attr)(task, config, seed)

    fn.__qualname__ = f"{module}.{attr}"
    return fn


def method_fn(name: str) -> MethodFn:
    """The registered function of ``name`` (a method, or a family member ``prefix:arg``)."""
    if name in METHODS:
        return METHODS[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in FAMILIES:
        return FAMILIES[prefix][0](arg)
    raise ValueError(f"unknown method {name!r}; registered: {known()}")


def label_of(name: str) -> str:
    """The table label of ``name`` (a family member's from its family's format; else the name itself)."""
    if name in LABELS:
        return LABELS[name]
    prefix, _, arg = name.partition(":")
    return FAMILIES[prefix][1].format(arg=arg) if prefix in FAMILIES else name


def known() -> list[str]:
    """Every registered name, families as ``prefix:ARG``."""
    return [*METHODS, *(f"{p}:ARG" for p in FAMILIES)]


# ---------------------------------------------------------------------------------------------- helpers
def _batches(task: Task | ConditionalTask, generator: torch.Generator):
    if isinstance(task, ConditionalTask):
        return lambda bs: (task.source(bs, generator), *task.target(bs, generator))
    return lambda bs: (task.source(bs, generator), task.target(bs, generator))


def _model(task: Task | ConditionalTask, width: int):
    if isinstance(task, ConditionalTask):
        return make_conditional_model(task.num_classes, width)
    return make_model(width)


def train_torchcfm(
    matcher,
    task: Task | ConditionalTask,
    config: BenchConfig,
    seed: int,
    desc: str = "training",
    **loop: object,
) -> TrainedField:
    """torchcfm's loop with ``matcher`` on ``task``: torch's and NumPy's global RNGs seeded with ``seed`` (the
    MLP's initial weights, torchcfm's t and noise draws, its OT pairing), the data drawn from a generator of
    ``seed``; ``loop``: further arguments of :func:`~harness.loop.train_flow_matching`."""
    torch.manual_seed(seed)  # MLP initialisation (and torchcfm's t, noise draws)
    np.random.seed(seed)  # noqa: NPY002 - torchcfm's OT pairing draws from NumPy's global generator
    generator = torch.Generator().manual_seed(seed)
    return train_flow_matching(
        _model(task, config.width),
        matcher,
        _batches(task, generator),
        desc=desc,
        **config.loop_kwargs(),
        **loop,
    )


def _child_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


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
    **loop: object,
) -> TrainedField:
    """Train NSGF on ``task`` with torchcfm's loop and a :class:`SinkhornFlowMatcher` (its defaults if None).

    Every call of the loop draws a fresh ``(x0, x1)`` batch of the task; the matcher simulates flows from
    those batches into its pool and serves the regression batches (Algorithm 1). ``train_time_s`` includes
    all simulation. The field is returned in eval mode. A :class:`ConditionalTask` trains the class-conditional
    field :func:`make_conditional_model` on guided targets (one Sinkhorn flow per class); sample it with
    ``y``. ``loop``: further arguments of :func:`~harness.loop.train_flow_matching` (``clock``, ``ema``, ...).
    """
    if matcher is None:
        matcher = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(_child_seed(generator)))
    return train_flow_matching(
        _model(task, width),
        matcher,
        _batches(task, generator),
        train_steps=train_steps,
        batch_size=batch_size,
        lr=lr,
        time_budget_s=time_budget_s,
        progress=progress,
        desc="NSGF",
        **loop,
    )


def build_nsgfpp(
    task: Task | ConditionalTask,
    options: NSGFPlusPlusOptions,
    *,
    generator: torch.Generator,
    lr: float = 1e-3,
    width: int = 64,
    sinkhorn: SinkhornOptions | None = None,
    progress: bool = False,
) -> NSGFPlusPlus:
    """NSGF++ for ``task`` with MLPs of ``width``, initialised from torch's global RNG (seed it before)."""
    k = task.num_classes if isinstance(task, ConditionalTask) else None
    return NSGFPlusPlus(
        VelocityMLP(2, width, num_classes=k),
        TimePredictorMLP(2, width, num_classes=k) if options.uses_predictor else None,
        VelocityMLP(2, width, num_classes=k),
        options,
        sinkhorn=sinkhorn,
        lr=lr,
        generator=generator,
        progress=progress,
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
    **changes: object,
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
    model = build_nsgfpp(
        task, options, generator=generator, lr=lr, width=width, sinkhorn=sinkhorn, progress=progress
    )
    model.fit(
        lambda n: task.source(n, generator), lambda n: task.target(n, generator), train_steps, batch_size
    )
    return model


# ---------------------------------------------------------------------------------------------- methods
@register("nsgf", "NSGF")
def nsgf(task: Task, config: BenchConfig, seed: int) -> Sampler:
    torch.manual_seed(seed)
    kwargs = dict(config.nsgf)
    if "sinkhorn" in kwargs:
        kwargs["sinkhorn"] = SinkhornOptions(**kwargs["sinkhorn"])
    matcher = SinkhornFlowMatcher(**kwargs, generator=torch.Generator().manual_seed(seed + 1))
    return train_flow_matching(
        _model(task, config.width),
        matcher,
        _batches(task, torch.Generator().manual_seed(seed)),
        desc="NSGF",
        **config.loop_kwargs(),
    )


@register("icfm", "I-CFM (σ=0.1)")
def icfm(task: Task, config: BenchConfig, seed: int) -> Sampler:
    return train_torchcfm(ConditionalFlowMatcher(sigma=config.sigma), task, config, seed, "I-CFM")


@register("otcfm", "OT-CFM (σ=0.1)")
def otcfm(task: Task, config: BenchConfig, seed: int) -> Sampler:
    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=config.sigma)
    return train_torchcfm(matcher, task, config, seed, "OT-CFM")


@register("sbcfm", "SB-CFM (σ=0.5, exact plan)")
def sbcfm(task: Task, config: BenchConfig, seed: int) -> Sampler:
    matcher = SchrodingerBridgeConditionalFlowMatcher(sigma=config.sb_sigma, ot_method="exact")
    return train_torchcfm(matcher, task, config, seed, "SB-CFM")


@register("fm", "FM (σ=0.1)")
def fm(task: Task, config: BenchConfig, seed: int) -> Sampler:
    if not task.gaussian_source:
        raise NotApplicable("FM needs a Gaussian source")
    return train_torchcfm(TargetConditionalFlowMatcher(sigma=config.sigma), task, config, seed, "FM")


_ONE_RF: dict[tuple, TrainedField] = {}


def _one_rf(task: Task, config: BenchConfig, seed: int) -> TrainedField:
    key = (task.name, json.dumps(asdict(config), sort_keys=True), seed)
    if key not in _ONE_RF:  # 2-RF reuses the 1-RF of the same run
        _ONE_RF.clear()
        _ONE_RF[key] = train_torchcfm(ConditionalFlowMatcher(sigma=0.0), task, config, seed, "1-RF")
    return _ONE_RF[key]


def clear_caches() -> None:
    """Forget the 1-RF kept for the 2-RF of the same (task, config, seed)."""
    _ONE_RF.clear()


@register("1rf", "1-RF (I-CFM σ=0)")
def one_rf(task: Task, config: BenchConfig, seed: int) -> Sampler:
    return _one_rf(task, config, seed)


@register("2rf", "2-RF (one reflow)")
def two_rf(task: Task, config: BenchConfig, seed: int) -> Sampler:
    """1-RF (``train_steps``), then ``train_steps`` more steps on pairs (x0, 1-RF(x0)) from the 1-RF's
    evaluated weights (its EMA with ``config.ema``); its time includes 1-RF's training and the pair
    generation. With a time budget: half for 1-RF, the rest for the pairs and the reflow."""
    base_config = replace(config, snapshot_every=None)
    if config.time_budget_s is not None:
        base_config = replace(base_config, time_budget_s=config.time_budget_s / 2)
    base = _one_rf(task, base_config, seed)
    timer = StepClock(config.clock, base.train_time_s)
    generator = torch.Generator().manual_seed(seed + 7919)
    with timer:
        x0 = task.source(config.reflow_pairs, generator)
        with torch.no_grad():
            x1 = euler_sample(base.field, x0, n_steps=100).samples
    torch.manual_seed(seed)
    model = copy.deepcopy(base.field.model).train().requires_grad_(True)

    def pairs(bs: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x0), (bs,), generator=generator)
        return x0[idx], x1[idx]

    return train_flow_matching(
        model,
        ConditionalFlowMatcher(sigma=0.0),
        pairs,
        time_offset_s=timer.spent(),
        desc="2-RF",
        **config.loop_kwargs(),
    )


@dataclass
class NSGFPlusPlusSampler:
    """NSGF++ behind the ``Sampler`` protocol: ``nfe`` is the phase-2 budget (Euler steps of the straight
    flow after the T NSGF steps (T = 2 by default) and, for ``phase2="paper"``, the predictor call); the
    returned NFE counts all networks. With ``ema_state`` the networks' EMA weights are sampled."""

    model: NSGFPlusPlus
    train_time_s: float
    n_opt_steps: int
    ema_state: dict | None = None

    def sample(self, x0: Tensor, nfe: int | None, solver: str = "euler") -> tuple[Tensor, int]:
        if self.ema_state is None:
            out = self.model.sample(x0, solver=solver, straight_steps=nfe)
            return out.samples, out.total_nfe
        last = copy.deepcopy(self.model.nets.state_dict())
        self.model.nets.load_state_dict(self.ema_state)
        try:
            out = self.model.sample(x0, solver=solver, straight_steps=nfe)
        finally:
            self.model.nets.load_state_dict(last)
        return out.samples, out.total_nfe


def _nsgfpp(phase2: str) -> MethodFn:
    def fn(task: Task, config: BenchConfig, seed: int) -> Sampler:
        """NSGF++ at its defaults (T = 2 NSGF steps of η = 1) with ``config.nsgf``'s Sinkhorn options, every
        network stepped once per training step. With a step count the pool refreshes every
        ``train_steps // 6`` steps (``train_nsgfpp``); with a time budget at the options' default cadence."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        sinkhorn = SinkhornOptions(**config.nsgf.get("sinkhorn", {}))
        if config.time_budget_s is None and config.ema is None:
            timer = StepClock(config.clock)
            with timer:
                model = train_nsgfpp(
                    task,
                    phase2=phase2,
                    train_steps=config.train_steps,
                    generator=generator,
                    batch_size=config.batch_size,
                    lr=config.lr,
                    width=config.width,
                    sinkhorn=sinkhorn,
                )
            return NSGFPlusPlusSampler(model, timer.spent(), config.train_steps)
        changes = {"phase2": phase2}
        if config.train_steps is not None:
            changes["refresh_every"] = max(1, config.train_steps // 6)
        options = NSGFPlusPlusOptions().replace(**changes)
        model = build_nsgfpp(
            task, options, generator=generator, lr=config.lr, width=config.width, sinkhorn=sinkhorn
        )
        averaged = None if config.ema is None else EMA(model.nets, config.ema)
        timer = StepClock(config.clock)
        steps = 0
        while True:  # one step per fit call, so that the EMA and the budget see every step
            with timer:
                model.fit(
                    lambda n: task.source(n, generator),
                    lambda n: task.target(n, generator),
                    1,
                    config.batch_size,
                )
                if averaged is not None:
                    averaged.update(model.nets)
            steps += 1
            if config.train_steps is not None and steps >= config.train_steps:
                break
            if config.time_budget_s is not None and timer.spent() >= config.time_budget_s:
                break
        ema_state = None if averaged is None else averaged.module.state_dict()
        return NSGFPlusPlusSampler(model, timer.spent(), steps, ema_state)

    return fn


_PREDICTOR = " + 1 predictor" if DEFAULT_PHASE2 == "paper" else ""
register("nsgf++", f"NSGF++, phase2={DEFAULT_PHASE2!r} (NFE n = 2 NSGF{_PREDICTOR} + n straight)")(
    _nsgfpp(DEFAULT_PHASE2)
)
register("nsgf++paper", "NSGF++, phase2='paper' (NFE n = 2 NSGF + 1 predictor + n straight)")(
    _nsgfpp("paper")
)


# ------------------------------------------------------------------------------------ flow-size family
def _sized(kind: str) -> Callable[[str], MethodFn]:
    """``nsgf:N`` / ``coupling:N``: :class:`SinkhornFlowMatcher` / :class:`SinkhornCouplingMatcher` with flows
    of N particles (N = 256, one batch, is the default matcher), its generator seeded ``seed + 1000``."""
    cls = SinkhornFlowMatcher if kind == "nsgf" else SinkhornCouplingMatcher

    def factory(arg: str) -> MethodFn:
        try:
            n = int(arg)
        except ValueError:
            raise ValueError(f"{kind}:N needs an integer flow size N, got {arg!r}") from None

        def fn(task: Task, config: BenchConfig, seed: int) -> Sampler:
            g = torch.Generator().manual_seed(seed + 1000)
            matcher = cls(flow_size=None if n == 256 else n, generator=g)
            return train_torchcfm(matcher, task, config, seed, f"{kind}:{n}")

        return fn

    return factory


register_family("nsgf", "NSGF, flows of {arg}", _sized("nsgf"))
register_family("coupling", "large coupling of {arg}", _sized("coupling"))

# ------------------------------------------------------------------------------------ one-step methods
register("drift", "SinkhornDrift (one step)", nfes=(1,))(lazy("one_step", "train_drift"))
register("meanflow", "MeanFlow", nfes=(1,))(lazy("one_step", "train_meanflow"))
