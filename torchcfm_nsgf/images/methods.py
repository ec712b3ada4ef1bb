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
from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
)

from .._deprecation import moved
from .._validation import check_non_negative
from ..guidance import CFGField, drop_labels
from ..sampling import SampleResult, default_steps, odeint_sample

__all__ = ["BASELINE_METHODS", "FlowMatchingMethod", "ImageMethod", "baseline_matcher"]

BASELINE_METHODS = ("otcfm", "icfm", "fm", "rf")


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
        steps = default_steps(solver, nfe, self.default_steps)
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


def baseline_matcher(name: str, sigma: float) -> ConditionalFlowMatcher:
    """torchcfm's matcher of the baseline ``name`` with path width ``sigma`` (``rf``: always 0)."""
    if name == "icfm":
        return ConditionalFlowMatcher(sigma=sigma)
    if name == "otcfm":
        return ExactOptimalTransportConditionalFlowMatcher(sigma=sigma)
    if name == "fm":
        return TargetConditionalFlowMatcher(sigma=sigma)
    if name == "rf":
        return ConditionalFlowMatcher(sigma=0.0)
    raise ValueError(f"unknown baseline {name!r}")


def _moved(module: str, name: str) -> Any:
    def load() -> tuple[Any, str]:
        import importlib

        return getattr(
            importlib.import_module(f"torchcfm_nsgf.images.{module}"), name
        ), f"torchcfm_nsgf.images.{module}"

    return load


# names that lived here before the registry broke the methods <-> NSGF methods import circle
__getattr__ = moved(
    __name__,
    {
        "UNET_PRESETS": _moved("unet", "UNET_PRESETS"),
        "build_unet": _moved("unet", "build_unet"),
        "unet_classes": _moved("unet", "unet_classes"),
        "NSGFSettings": _moved("settings", "NSGFSettings"),
        "available_methods": _moved("registry", "available_methods"),
        "make_method": _moved("registry", "make_method"),
    },
)
