"""Image generation with NSGF, NSGF++ and torchcfm's baselines: data, one training loop, sampling, FID.

Modules: :mod:`.data` (torchvision MNIST / CIFAR-10 in memory), :mod:`.methods` (the method interface and
the UNet presets), :mod:`.training` (the shared loop, checkpoints, DDP), :mod:`.checkpoint` (atomic files, RNG
state), :mod:`.generation` (sampling, PNG grids), :mod:`.fid` (FID / IS and feature-space Fréchet distance),
:mod:`.cli` (the flags of ``examples/mnist.py`` and ``examples/cifar10.py``).
"""

from .checkpoint import CheckpointError
from .data import ImageData, load_images
from .fid import InceptionUnavailableError, feature_frechet_distance, inception_metrics
from .generation import generate, save_grid
from .methods import (
    FlowMatchingMethod,
    ImageMethod,
    NSGFSettings,
    available_methods,
    build_unet,
    make_method,
)
from .training import ConfigError, TrainConfig, TrainResult, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlowMatchingMethod",
    "ImageData",
    "ImageMethod",
    "InceptionUnavailableError",
    "NSGFSettings",
    "TrainConfig",
    "TrainResult",
    "available_methods",
    "build_unet",
    "feature_frechet_distance",
    "generate",
    "inception_metrics",
    "load_images",
    "make_method",
    "save_grid",
    "train",
]
