"""torchcfm's UNet for the image methods, from named presets."""

from __future__ import annotations

from typing import Any

from torchcfm.models.unet.unet import UNetModelWrapper

__all__ = ["UNET_PRESETS", "build_unet", "unet_classes"]

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


def unet_classes(num_classes: int | None, cfg_dropout: float) -> int | None:
    """Classes of a conditional UNet: the data's, plus the null label when training with label dropout."""
    if num_classes is None:
        return None
    return num_classes + (1 if cfg_dropout > 0 else 0)
