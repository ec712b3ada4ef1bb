"""The image methods by name: one registry that builds any of them (torchcfm's baselines, NSGF, NSGF++, the large
coupling, the one-step generators).

It imports the method modules, which never import it or each other's builders, so there is no import
circle: :mod:`.methods` (the interface and the flow-matching baselines), :mod:`.nsgf_methods` (NSGF and
NSGF++) and :mod:`.one_step_methods` (the Sinkhorn drift and MeanFlow) sit side by side below this module.
"""

from __future__ import annotations

from collections.abc import Callable

from .._validation import check_non_negative
from .methods import BASELINE_METHODS, FlowMatchingMethod, ImageMethod, _check_dropout, baseline_matcher
from .nsgf_methods import make_coupling, make_nsgf, make_nsgfpp
from .one_step_methods import make_drift, make_meanflow
from .settings import NSGFSettings
from .unet import build_unet, unet_classes

__all__ = ["METHODS", "available_methods", "make_method"]

#: ``builder(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod``.
Builder = Callable[..., ImageMethod]


def _baseline(name: str) -> Builder:
    def build(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod:
        matcher = baseline_matcher(name, sigma)
        net = build_unet(shape, preset, num_classes=unet_classes(num_classes, cfg_dropout))
        return FlowMatchingMethod(name, matcher, net, sample_steps, num_classes, cfg_dropout)

    return build


def _nsgf(make: Callable[..., ImageMethod]) -> Builder:
    def build(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod:
        return make(
            shape,
            preset=preset,
            settings=nsgf or NSGFSettings(),
            rank=rank,
            num_classes=num_classes,
            cfg_dropout=cfg_dropout,
        )

    return build


def _coupling(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod:
    return make_coupling(
        shape,
        preset=preset,
        settings=nsgf or NSGFSettings(),
        rank=rank,
        sample_steps=sample_steps,
        num_classes=num_classes,
        cfg_dropout=cfg_dropout,
    )


def _drift(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod:
    return make_drift(
        shape,
        preset=preset,
        settings=nsgf or NSGFSettings(),
        num_classes=num_classes,
        cfg_dropout=cfg_dropout,
    )


def _meanflow(shape, *, preset, sigma, sample_steps, nsgf, rank, num_classes, cfg_dropout) -> ImageMethod:
    return make_meanflow(shape, preset=preset, num_classes=num_classes, cfg_dropout=cfg_dropout)


#: The methods, by name, in the order the command line lists them.
METHODS: dict[str, Builder] = {
    "nsgf": _nsgf(make_nsgf),
    "nsgf++": _nsgf(make_nsgfpp),
    "coupling": _coupling,
    **{name: _baseline(name) for name in BASELINE_METHODS},
    "drift": _drift,
    "meanflow": _meanflow,
}


def available_methods() -> tuple[str, ...]:
    """The method names :func:`make_method` accepts."""
    return tuple(METHODS)


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
        UNet preset (:data:`~torchcfm_nsgf.images.unet.UNET_PRESETS`).
    sigma : float
        σ of the I-CFM / OT-CFM / FM probability paths (ignored by ``rf`` and the NSGF methods).
    sample_steps : int
        Default Euler steps of the baselines' sampler.
    nsgf : NSGFSettings, optional
        Settings of ``nsgf``, ``nsgf++`` and ``coupling``, and the Sinkhorn options and step of ``drift``
        (ignored by torchcfm's baselines and ``meanflow``).
    rank : int
        Process rank (names the pool shard of a disk pool).
    num_classes : int, optional
        Class-conditional on this many data classes (:mod:`~torchcfm_nsgf.images.methods`).
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
    return METHODS[name](
        shape,
        preset=preset,
        sigma=sigma,
        sample_steps=sample_steps,
        nsgf=nsgf,
        rank=rank,
        num_classes=num_classes,
        cfg_dropout=cfg_dropout,
    )
