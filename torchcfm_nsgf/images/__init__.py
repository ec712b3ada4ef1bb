"""Image generation with NSGF, NSGF++ and torchcfm's baselines: data, one training loop, sampling, FID.

Modules: :mod:`.data` (one record per dataset; torchvision MNIST / CIFAR-10 in memory), :mod:`.unet` (the
UNet presets), :mod:`.methods` (the method interface and torchcfm's baselines), :mod:`.nsgf_methods` (NSGF and
NSGF++), :mod:`.one_step_methods` (the Sinkhorn drift's generator and MeanFlow), :mod:`.settings` (their
settings), :mod:`.registry` (every method by name), :mod:`.config` (the
run's settings), :mod:`.checkpointing` (the run's checkpoint files), :mod:`.distributed` (processes and
devices), :mod:`.training` (the shared loop), :mod:`.checkpoint` (atomic files, RNG state),
:mod:`.generation` (sampling, PNG grids), :mod:`.fid` (FID / IS and feature-space Fréchet distance),
:mod:`.cli` (the flags of ``examples/mnist.py`` and ``examples/cifar10.py``).
"""

from .checkpoint import CheckpointError
from .data import ImageData, load_images
from .fid import InceptionUnavailableError, feature_frechet_distance, inception_metrics
from .generation import generate, save_grid
from .methods import FlowMatchingMethod, ImageMethod
from .registry import available_methods, make_method
from .settings import NSGFSettings
from .training import ConfigError, TrainConfig, TrainResult, train
from .unet import build_unet

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
