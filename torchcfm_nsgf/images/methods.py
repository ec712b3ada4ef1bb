"""Training methods for the image examples, behind one small interface used by the shared training loop.

A *method* owns the networks it trains and knows two things:

* :meth:`ImageMethod.loss` — given a source batch ``x0 ~ N(0, I)`` and a data batch ``x1`` (both
  ``(B, C, H, W)``), the training loss. Flow-matching methods draw ``(t, x_t, u_t)`` from a torchcfm-style
  matcher (``sample_location_and_conditional_flow``) and regress ``v_θ(t, x_t) ≈ u_t``;
* :meth:`ImageMethod.sample` — generate from noise with a given step budget, and return the exact number of
  network evaluations (NFE), counted from real calls.

Baselines are torchcfm's own matchers (no re-implementation): ``icfm`` = ``ConditionalFlowMatcher(σ)``,
``otcfm`` = ``ExactOptimalTransportConditionalFlowMatcher(σ)``, ``fm`` = ``TargetConditionalFlowMatcher(σ)``
(Lipman et al.; Gaussian source), ``rf`` = ``ConditionalFlowMatcher(0)`` (rectified flow, 1-RF).

Class-conditional methods (``num_classes``): the networks take the labels (torchcfm's UNet with
``class_cond=True``), ``loss(nets, x0, x1, y1)`` trains on the data's labels and ``sample(..., y=labels)``
generates the asked classes. Matchers with torchcfm's ``guided_sample_location_and_conditional_flow`` (OT-CFM,
NSGF) return the label of every served row; for the others (I-CFM, FM, RF: independent pairs) the labels stay
with ``x1``. Classifier-free guidance: ``cfg_dropout > 0`` trains with label dropout towards the null label
``num_classes`` (the UNet then has ``num_classes + 1`` classes), and ``sample(..., guidance_scale=w)`` guides
(:class:`~torchcfm_nsgf.guidance.CFGField`; a guided evaluation counts two network calls in the NFE).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
)
from torchcfm.models.unet.unet import UNetModelWrapper

from .._validation import check_non_negative
from ..guidance import CFGField, drop_labels
from ..sampling import SampleResult, odeint_sample, solver_spec
from ..sinkhorn import HIGH_DIM_BLUR, SinkhornOptions

__all__ = [
    "BASELINE_METHODS",
    "UNET_PRESETS",
    "FlowMatchingMethod",
    "ImageMethod",
    "NSGFSettings",
    "available_methods",
    "build_unet",
    "make_method",
]

BASELINE_METHODS = ("otcfm", "icfm", "fm", "rf")

# torchcfm's UNet normalises with GroupNorm(32, ·): every width must be a multiple of 32.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # torchcfm's CIFAR-10 recipe (examples/images/cifar10/train_cifar10.py)
    "cifar10": dict(
        num_channels=128,
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
    ),
    # MNIST 28x28: levels at 28, 14, 7; attention at 7. The narrow presets condition by scale and shift after
    # the GroupNorm (use_scale_shift_norm): at 32 channels GroupNorm(32, .) normalises every channel on its
    # own and removes the per-channel shift torchcfm's default adds, so the network would not see t or y.
    "mnist": dict(
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2, 2],
        num_heads=1,
        num_head_channels=-1,
        attention_resolutions="7",
        dropout=0.0,
        use_scale_shift_norm=True,
    ),
    # tests and smoke runs: three narrow levels, attention only in the middle block (always there)
    "tiny": dict(
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 1, 1],
        num_heads=1,
        num_head_channels=-1,
        attention_resolutions="-1",
        dropout=0.0,
        use_scale_shift_norm=True,
    ),
}


def build_unet(
    shape: tuple[int, int, int], preset: str = "cifar10", num_classes: int | None = None, **overrides: Any
) -> UNetModelWrapper:
    """torchcfm's ``UNetModelWrapper`` for images of ``shape = (C, H, W)`` from a named preset.

    ``attention_resolutions="-1"`` means no attention layer outside the middle block (the ``tiny`` preset).
    ``num_classes``: class-conditional (``class_cond=True``), ``forward(t, x, y)`` with labels in
    ``[0, num_classes)``.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset must be one of {sorted(UNET_PRESETS)}, got {preset!r}")
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    cfg = {**UNET_PRESETS[preset], **overrides}
    if cfg["attention_resolutions"] == "-1":
        # torchcfm turns resolutions into downsampling factors image_size // res; a factor that the
        # network never reaches disables attention
        cfg["attention_resolutions"] = str(2 * shape[-1])  # factor 0: never reached
    if num_classes is not None:
        cfg.update(class_cond=True, num_classes=num_classes)
    return UNetModelWrapper(dim=tuple(shape), **cfg)


class ImageMethod(ABC):
    """What the training loop needs from a method. Subclasses own their networks (``self.nets``)."""

    name: str
    #: The networks trained by the loop, in one ModuleDict (EMA, checkpoints and DDP see them together).
    nets: nn.ModuleDict
    #: Number of data classes of a class-conditional method (None: unconditional).
    num_classes: int | None = None
    #: Label-dropout probability of classifier-free guidance (0: none, and no null label).
    cfg_dropout: float = 0.0

    @property
    def null_label(self) -> int | None:
        """The "no class" label of classifier-free guidance (``num_classes``), None without label dropout."""
        return self.num_classes if self.num_classes is not None and self.cfg_dropout > 0 else None

    @abstractmethod
    def loss(self, nets: nn.ModuleDict, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        """Scalar training loss for source ``x0`` and data ``x1``, both ``(B, C, H, W)``, and the data's
        labels ``y1`` ``(B,)`` for a class-conditional method.

        ``nets`` is ``self.nets`` or a copy of it with the same keys (the loop passes the DDP-wrapped one).
        """

    @abstractmethod
    def sample(
        self,
        nets: nn.ModuleDict,
        x0: Tensor,
        *,
        nfe: int | None = None,
        solver: str = "euler",
        y: Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SampleResult:
        """Generate from the source batch ``x0`` ``(B, C, H, W)`` with about ``nfe`` evaluations, of the classes
        ``y`` ``(B,)`` for a class-conditional method (classifier-free guided with ``guidance_scale``).

        Returns ``samples`` ``(B, C, H, W)`` and ``nfe``, the network calls along one trajectory per network
        (a batch evaluation counts once, a guided one twice).
        """

    def _check_labels(self, y: Tensor | None, x0: Tensor, guidance_scale: float | None) -> Tensor | None:
        """Labels for sampling: required (shape ``(B,)``) by a class-conditional method, refused otherwise."""
        if self.num_classes is None:
            if y is not None or guidance_scale is not None:
                raise ValueError(
                    f"y and guidance_scale need a class-conditional {self.name} (built with num_classes)"
                )
            return None
        if not isinstance(y, Tensor) or y.shape != (x0.shape[0],) or y.dtype.is_floating_point:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"y must be integer labels of shape ({x0.shape[0]},) for the class-conditional {self.name}, "
                f"got {shape}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"y must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if guidance_scale is not None and self.null_label is None:
            raise ValueError("guidance_scale needs a method trained with label dropout (cfg_dropout > 0)")
        return y.to(x0.device)

    def _train_labels(self, y: Tensor | None) -> Tensor | None:
        """The labels a network is trained on: label dropout towards :attr:`null_label` (global RNG)."""
        if y is None or self.null_label is None:
            return y
        return drop_labels(y, self.cfg_dropout, self.null_label)

    def default_nfe(self) -> int:
        """The NFE used when none is asked for."""
        return 100

    def prepare(  # noqa: B027 - optional
        self, batch_fn: Callable[[], tuple[Tensor, Tensor | None]], progress: bool = False
    ) -> None:
        """Called once before a fresh run with a function that returns a data batch and its labels
        (``None`` for an unconditional method): the pool warm-up."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that is not network weights (pools, counters); stored per rank in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""


class FlowMatchingMethod(ImageMethod):
    """A single velocity network ``v_θ(t, x)`` trained with a torchcfm-style matcher.

    Parameters
    ----------
    name : str
    matcher : ConditionalFlowMatcher
        Anything with ``sample_location_and_conditional_flow(x0, x1) -> (t, xt, ut)``.
    net : nn.Module
        ``forward(t, x)`` with ``t`` of shape ``(B,)`` (``forward(t, x, y)`` when class-conditional).
    default_steps : int
        Euler steps used by :meth:`sample` when ``nfe`` is not given.
    num_classes : int, optional
        Class-conditional on this many data classes.
    cfg_dropout : float
        Label-dropout probability (classifier-free guidance; ``net`` then has ``num_classes + 1`` classes).
    """

    def __init__(
        self,
        name: str,
        matcher: ConditionalFlowMatcher,
        net: nn.Module,
        default_steps: int = 100,
        num_classes: int | None = None,
        cfg_dropout: float = 0.0,
    ) -> None:
        self.name = name
        self.matcher = matcher
        self.nets = nn.ModuleDict({"velocity": net})
        self.default_steps = default_steps
        self.num_classes = num_classes
        self.cfg_dropout = _check_dropout(cfg_dropout, num_classes)

    def sample_location_and_conditional_flow(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, x_t, u_t)`` from the matcher: shapes ``(B,)``, ``(B, C, H, W)``, ``(B, C, H, W)``."""
        t, xt, ut = self.matcher.sample_location_and_conditional_flow(x0, x1)[:3]
        return t, xt, ut

    def guided_sample_location_and_conditional_flow(
        self, x0: Tensor, x1: Tensor, y1: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t, x_t, u_t, y)``: the matcher's guided targets and the label of each served row when it has
        torchcfm's guided method, else its plain targets with ``y1`` (independent pairs keep their rows)."""
        guided = getattr(self.matcher, "guided_sample_location_and_conditional_flow", None)
        if guided is None:
            t, xt, ut = self.sample_location_and_conditional_flow(x0, x1)
            return t, xt, ut, y1
        t, xt, ut, _, y = guided(x0, x1, y1=y1)[:5]
        return t, xt, ut, y

    def loss(self, nets: nn.ModuleDict, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        if y1 is None:
            if self.num_classes is not None:
                raise ValueError(f"y1 is required: {self.name} is class-conditional")
            t, xt, ut = self.sample_location_and_conditional_flow(x0, x1)
            return torch.mean((nets["velocity"](t, xt) - ut) ** 2)
        if self.num_classes is None:
            raise ValueError(f"y1 must be None: {self.name} was built without num_classes")
        t, xt, ut, y = self.guided_sample_location_and_conditional_flow(x0, x1, y1)
        return torch.mean((nets["velocity"](t, xt, y=self._train_labels(y)) - ut) ** 2)

    def default_nfe(self) -> int:
        return self.default_steps

    def sample(
        self,
        nets: nn.ModuleDict,
        x0: Tensor,
        *,
        nfe: int | None = None,
        solver: str = "euler",
        y: Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SampleResult:
        """:func:`~torchcfm_nsgf.odeint_sample` of ``nets["velocity"]``: a fixed-step ``solver`` takes ``nfe``
        steps (default ``default_steps``), an adaptive one runs to its tolerance and ignores ``nfe``. With
        ``guidance_scale`` each step is a classifier-free-guided evaluation (two network calls in ``nfe``)."""
        y = self._check_labels(y, x0, guidance_scale)
        steps = None if solver_spec(solver).adaptive else (self.default_steps if nfe is None else nfe)
        field = nets["velocity"]
        if guidance_scale is not None:
            field = CFGField(field, guidance_scale, self.null_label)
        extra = None if y is None else {"y": y}
        out = odeint_sample(field, x0, solver=solver, n_steps=steps, extra_args=extra)
        return SampleResult(samples=out.samples, nfe={"velocity": out.nfe["field"]})


def _check_dropout(cfg_dropout: object, num_classes: int | None) -> float:
    p = check_non_negative(cfg_dropout, "cfg_dropout")
    if p >= 1:
        raise ValueError(f"cfg_dropout must lie in [0, 1), got {p}")
    if p > 0 and num_classes is None:
        raise ValueError("cfg_dropout needs a class-conditional method (num_classes)")
    return p


def unet_classes(num_classes: int | None, cfg_dropout: float) -> int | None:
    """Classes of a conditional UNet: the data's, plus the null label when training with label dropout."""
    if num_classes is None:
        return None
    return num_classes + (1 if cfg_dropout > 0 else 0)


def _baseline_matcher(name: str, sigma: float) -> ConditionalFlowMatcher:
    if name == "icfm":
        return ConditionalFlowMatcher(sigma=sigma)
    if name == "otcfm":
        return ExactOptimalTransportConditionalFlowMatcher(sigma=sigma)
    if name == "fm":
        return TargetConditionalFlowMatcher(sigma=sigma)
    if name == "rf":
        return ConditionalFlowMatcher(sigma=0.0)
    raise ValueError(f"unknown baseline {name!r}")


def available_methods() -> tuple[str, ...]:
    """The method names :func:`make_method` accepts in this installation (NSGF ones need their modules)."""
    names = list(BASELINE_METHODS)
    from . import _nsgf_methods

    return tuple(_nsgf_methods.available() + names)


@dataclass
class NSGFSettings:
    """Settings of the NSGF and NSGF++ methods.

    Attributes
    ----------
    sinkhorn : SinkhornOptions
        Sinkhorn settings (default: blur 0.05 of the target's scale, what ``SinkhornFlowMatcher()`` uses on
        images: at 0.1 a quarter of NSGF's MNIST targets are blends of digits, BENCHMARKS.md §5).
    flow_steps, step_size, path : int, float, str
        T, η and served path of the simulated flow for ``nsgf`` (``SinkhornFlowMatcher``'s defaults).
    phase1_steps, phase1_step_size : int, float
        T and η of the NSGF phase of ``nsgf++`` (1, 0.5: on MNIST T = 1 beat T = 2, and η = 0.5 beat 0.25, 0.4,
        0.6 and 1.0, BENCHMARKS.md §5a). A full step (η = 1) of the network contracts the noise onto a cloud
        far narrower than the data, which the straight flow cannot spread out again; half a step keeps half
        of the noise. The 2D ``NSGFPlusPlus`` keeps T = 2, η = 1 (§4).
    phase2 : {"paper", "ot", "ot-source", "ot-predictor"}
        Where ``nsgf++``'s straight flow is trained from (:class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`):
        noise, with a time predictor, or the phase-1 end points paired with the data by exact OT.
    phase1_batch_fraction : float
        Share of each batch the NSGF network of ``nsgf++`` is trained on
        (:class:`~torchcfm_nsgf.nsgfpp.NSGFPlusPlusObjective`); the straight flow takes the whole batch.
        0.25 leaves most of each step to the straight flow: on MNIST at equal training time it beat the whole
        batch (BENCHMARKS.md §5a).
    endpoints : {"simulated", "network"}
        Where the ``"ot"`` variants' end points :math:`X_T` come from: the simulated Sinkhorn flow, or ``T``
        Euler steps of the NSGF network being trained (what phase 2 meets at sampling; the default here:
        on MNIST it is far better than the simulated end points, BENCHMARKS.md §5).
    pool_capacity : int
        Items of the trajectory pool, per process (each DDP rank holds its own shard).
    pool_max_bytes : int, optional
        Hard bound on the pool's bytes, per process.
    pool_dtype : {"float16", "bfloat16", "float32"}
        Storage dtype of the pool (float16 halves the memory).
    pool_storage : {"memory", "disk"}
        RAM, or memory-mapped files under ``pool_path`` (``rank{r}`` sub-folders).
    pool_path : str, optional
    refresh_every : int
        Simulate a new flow batch into the pool every ``refresh_every`` training batches.
    """

    sinkhorn: SinkhornOptions = field(default_factory=lambda: SinkhornOptions(blur=HIGH_DIM_BLUR))
    flow_steps: int = 2
    step_size: float = 1.0
    path: str = "straight"
    phase1_steps: int = 1
    phase1_step_size: float = 0.5
    phase2: str = "ot"
    phase1_batch_fraction: float = 0.25
    endpoints: str = "network"
    pool_capacity: int = 200_000
    pool_max_bytes: int | None = None
    pool_dtype: str = "float16"
    pool_storage: str = "memory"
    pool_path: str | None = None
    refresh_every: int = 10


def make_method(
    name: str,
    shape: tuple[int, int, int],
    *,
    preset: str = "cifar10",
    sigma: float = 0.0,
    sample_steps: int = 100,
    nsgf: NSGFSettings | None = None,
    rank: int = 0,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> ImageMethod:
    """Build the method ``name`` with fresh networks for images of ``shape = (C, H, W)``.

    Parameters
    ----------
    name : str
        One of :func:`available_methods`.
    shape : (C, H, W)
    preset : str
        UNet preset (:data:`UNET_PRESETS`).
    sigma : float
        σ of the I-CFM / OT-CFM / FM probability paths (ignored by ``rf`` and the NSGF methods).
    sample_steps : int
        Default Euler steps of the baselines' sampler.
    nsgf : NSGFSettings, optional
        Settings of ``nsgf`` and ``nsgf++`` (ignored by the baselines).
    rank : int
        Process rank (names the pool shard of a disk pool).
    num_classes : int, optional
        Class-conditional on this many data classes (module docstring).
    cfg_dropout : float
        Label-dropout probability of classifier-free guidance (needs ``num_classes``).
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"method must be one of {methods}, got {name!r}")
    sigma = check_non_negative(sigma, "sigma")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    cfg_dropout = _check_dropout(cfg_dropout, num_classes)
    if name in BASELINE_METHODS:
        matcher = _baseline_matcher(name, sigma)
        net = build_unet(shape, preset, num_classes=unet_classes(num_classes, cfg_dropout))
        return FlowMatchingMethod(name, matcher, net, sample_steps, num_classes, cfg_dropout)
    from . import _nsgf_methods

    return _nsgf_methods.make(
        name,
        shape,
        preset=preset,
        settings=nsgf or NSGFSettings(),
        rank=rank,
        num_classes=num_classes,
        cfg_dropout=cfg_dropout,
    )
