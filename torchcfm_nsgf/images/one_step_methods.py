r"""The one-step image methods behind the :class:`~torchcfm_nsgf.images.methods.ImageMethod` interface.

``drift``: a generator :math:`G(x_0)`, torchcfm's UNet at the fixed time 0, trained by
:class:`~torchcfm_nsgf.SinkhornDrift` (each generated batch moves one Sinkhorn-flow step towards the data batch,
and :math:`G` regresses the moved batch). Its Sinkhorn options and step :math:`\eta` are NSGF's
(``NSGFSettings.sinkhorn`` and ``step_size``: the flags ``--blur``, ``--scaling``, ``--step-size``, ...); the
self term is ``NSGFSettings.drift_self_term`` (``--drift-self-term``, default
:data:`~torchcfm_nsgf.images.settings.IMAGE_DRIFT_SELF_TERM`). Class-conditional: :math:`G(x_0, y)` for the data batch's labels,
each generated image moved towards the data of its class only.

``meanflow``: MeanFlow's average velocity :math:`u(z, s, t)` (:class:`~torchcfm_nsgf.MeanFlow` with the paper's
CIFAR-10 settings, :data:`IMAGE_MEANFLOW`), a UNet with a second time embedding for :math:`t - s`
(:class:`AverageVelocityUNet`); sampling takes ``nfe`` jumps (default one).

Both sample with exactly ``nfe`` network calls (the generator: always one), counted from the calls made.
Classifier-free guidance is not offered (``cfg_dropout`` must be 0): neither objective trains for it here.
Randomness (the independent self batch, MeanFlow's times) comes from the process's global generators, which
the checkpoints save.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torchcfm.models.unet.nn import timestep_embedding

from ..drift import SinkhornDrift
from ..meanflow import MeanFlow, meanflow_sample
from ..sampling import SampleResult
from .methods import ImageMethod
from .settings import IMAGE_DRIFT_SELF_TERM, NSGFSettings
from .unet import build_unet

__all__ = [
    "IMAGE_DRIFT_SELF_TERM",
    "IMAGE_MEANFLOW",
    "AverageVelocityUNet",
    "DriftMethod",
    "MeanFlowMethod",
    "make_drift",
    "make_meanflow",
]

#: MeanFlow's settings on images: the paper's CIFAR-10 (pixel-space UNet) configuration, 75 % of the pairs with
#: s != t, times logit-normal (-2, 2) in the paper's clock (t = 1 noise), i.e. ``logit_mean=+2`` here, and the
#: adaptive weight's p = 0.75 (its ImageNet ablation's best, :class:`~torchcfm_nsgf.MeanFlow`'s defaults, were
#: 25 %, (-0.4, 1) and p = 1). On the 2D tasks these settings also scored better at one step.
IMAGE_MEANFLOW: dict[str, float] = dict(unequal_share=0.75, logit_mean=2.0, logit_std=2.0, weight_power=0.75)


def _no_guidance(name: str, cfg_dropout: float) -> None:
    if cfg_dropout:
        raise ValueError(f"{name} does not train for classifier-free guidance: cfg_dropout must be 0")


class _OneStep(ImageMethod):
    def _check_train_labels(self, y1: Tensor | None) -> None:
        if y1 is None and self.num_classes is not None:
            raise ValueError(f"y1 is required: {self.name} is class-conditional")
        if y1 is not None and self.num_classes is None:
            raise ValueError(f"y1 must be None: {self.name} was built without num_classes")

    def _check_nfe(self, nfe: int | None, solver: str, allowed: str) -> None:
        if solver != "euler":
            raise ValueError(f"{self.name} samples by its own jumps: solver must be 'euler', got {solver!r}")
        if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1):
            raise ValueError(f"nfe must be a positive int, got {nfe!r}")
        if allowed == "one" and nfe not in (None, 1):
            raise ValueError(f"{self.name} is a one-step generator: nfe must be 1 (or None), got {nfe}")


class DriftMethod(_OneStep):
    """A one-step generator ``nets["generator"](0, x0[, y])`` trained by :class:`~torchcfm_nsgf.SinkhornDrift`.

    Parameters
    ----------
    drift : SinkhornDrift
    net : nn.Module
        ``forward(t, x)`` (``forward(t, x, y)`` when class-conditional), called at ``t = 0``.
    num_classes : int, optional
    """

    def __init__(self, drift: SinkhornDrift, net: nn.Module, num_classes: int | None = None) -> None:
        self.name = "drift"
        self.drift = drift
        self.nets = nn.ModuleDict({"generator": net})
        self.num_classes = num_classes

    @staticmethod
    def generate(net: nn.Module, x0: Tensor, y: Tensor | None = None) -> Tensor:
        """``G(x0)``: the network at the fixed time 0, shape of ``x0``."""
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        return net(t, x0) if y is None else net(t, x0, y=y)

    def loss(self, nets: nn.ModuleDict, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        """``drift.loss(G(x0, y1), x1)``: labelled images move towards the data of their class."""
        self._check_train_labels(y1)
        net = nets["generator"]
        x = self.generate(net, x0, y1)
        kw: dict[str, Any] = {}
        if self.drift.self_term == "independent":
            with torch.no_grad():
                kw["x_self"] = self.generate(net, torch.randn_like(x0), y1)
            if y1 is not None:
                kw["y_self"] = y1
        if y1 is not None:
            kw.update(y=y1, y1=y1)
        return self.drift.loss(x, x1, **kw)

    def default_nfe(self) -> int:
        return 1

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
        """``G(x0[, y])``: one network call (``nfe`` must be None or 1)."""
        y = self._check_labels(y, x0, guidance_scale)
        self._check_nfe(nfe, solver, "one")
        with torch.no_grad():
            samples = self.generate(nets["generator"], x0, y)
        return SampleResult(samples=samples, nfe={"generator": 1})

    def state_dict(self) -> dict[str, Any]:
        """The drift's step counter."""
        return self.drift.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drift.load_state_dict(state)


class AverageVelocityUNet(nn.Module):
    r"""torchcfm's UNet as MeanFlow's :math:`u(z, s, t)`: the time embedding of :math:`s` plus a second one of
    :math:`t - s` (the paper's two-time conditioning), then the UNet's blocks.

    The second embedding copies the architecture of the first and starts with a zero last layer, so that the
    untrained network is the UNet at time :math:`s`.

    Parameters
    ----------
    unet : UNetModelWrapper
        torchcfm's UNet (:func:`~torchcfm_nsgf.images.unet.build_unet`), class-conditional or not.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.gap_embed = copy.deepcopy(unet.time_embed)
        last = self.gap_embed[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, z: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``z`` (B, C, H, W), ``s`` and ``t`` (B,), labels ``y`` (B,) -> the average velocity (B, C, H, W)."""
        u = self.unet
        if (y is None) != (u.num_classes is None):
            raise ValueError("y must be given if and only if the UNet is class-conditional")
        emb = u.time_embed(timestep_embedding(s, u.model_channels))
        emb = emb + self.gap_embed(timestep_embedding(t - s, u.model_channels))
        if y is not None:
            emb = emb + u.label_emb(y)
        h, skips = z.type(u.dtype), []
        for block in u.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = u.middle_block(h, emb)
        for block in u.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return u.out(h.type(z.dtype))


class MeanFlowMethod(_OneStep):
    """MeanFlow on images: ``nets["average_velocity"](z, s, t[, y=y])`` trained by :class:`~torchcfm_nsgf.MeanFlow`,
    sampled by ``nfe`` jumps (:func:`~torchcfm_nsgf.meanflow_sample`, default one)."""

    def __init__(self, objective: MeanFlow, net: nn.Module, num_classes: int | None = None) -> None:
        self.name = "meanflow"
        self.objective = objective
        self.nets = nn.ModuleDict({"average_velocity": net})
        self.num_classes = num_classes

    def loss(self, nets: nn.ModuleDict, x0: Tensor, x1: Tensor, y1: Tensor | None = None) -> Tensor:
        self._check_train_labels(y1)
        kwargs = None if y1 is None else {"y": y1}
        return self.objective.loss(nets["average_velocity"], x0, x1, model_kwargs=kwargs)

    def default_nfe(self) -> int:
        return 1

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
        """``nfe`` jumps of the average velocity over a uniform grid (default one)."""
        y = self._check_labels(y, x0, guidance_scale)
        self._check_nfe(nfe, solver, "any")
        kwargs = None if y is None else {"y": y}
        out = meanflow_sample(nets["average_velocity"], x0, nfe or 1, model_kwargs=kwargs)
        return SampleResult(samples=out.samples, nfe={"average_velocity": out.nfe["field"]})


def make_drift(
    shape: tuple[int, int, int],
    *,
    preset: str,
    settings: NSGFSettings,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> DriftMethod:
    """``drift`` for images of ``shape``: the UNet ``preset`` as the generator; ``settings.sinkhorn`` and
    ``settings.step_size`` and ``settings.drift_self_term`` for :class:`~torchcfm_nsgf.SinkhornDrift`."""
    _no_guidance("drift", cfg_dropout)
    drift = SinkhornDrift(settings.step_size, sinkhorn=settings.sinkhorn, self_term=settings.drift_self_term)
    return DriftMethod(drift, build_unet(shape, preset, num_classes=num_classes), num_classes)


def make_meanflow(
    shape: tuple[int, int, int],
    *,
    preset: str,
    num_classes: int | None = None,
    cfg_dropout: float = 0.0,
) -> MeanFlowMethod:
    """``meanflow`` for images of ``shape``: :class:`AverageVelocityUNet` on the UNet ``preset``, the objective
    ``MeanFlow(**IMAGE_MEANFLOW)``."""
    _no_guidance("meanflow", cfg_dropout)
    net = AverageVelocityUNet(build_unet(shape, preset, num_classes=num_classes))
    return MeanFlowMethod(MeanFlow(**IMAGE_MEANFLOW), net, num_classes)
