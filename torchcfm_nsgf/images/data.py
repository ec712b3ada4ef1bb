"""Image datasets for the examples: torchvision's MNIST and CIFAR-10 as one uint8 tensor in memory.

The whole training split is held as a ``uint8`` tensor of shape ``(N, C, H, W)`` (MNIST: 47 MB, CIFAR-10:
150 MB) and converted to ``[-1, 1]`` floats one batch at a time (:func:`to_unit_range`). Indexing a tensor
with the indices of a :class:`~torch.utils.data.distributed.DistributedSampler` is all the data pipeline
needs, and keeps the data order a pure function of ``(seed, epoch, step)``: that is what makes an
interrupted run resume exactly. Random horizontal flips are applied to the batch by the training loop.

Files are looked for in torchvision's own layout under ``root``:

* MNIST: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (raw idx files);
* CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (python pickles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import datasets

__all__ = ["DATASETS", "NUM_CLASSES", "ImageData", "expected_files", "load_images", "to_unit_range"]

DATASETS = ("mnist", "cifar10")
#: Classes of each dataset (the labels of class-conditional runs lie in ``[0, NUM_CLASSES[name])``).
NUM_CLASSES = {"mnist": 10, "cifar10": 10}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass(frozen=True)
class ImageData:
    """A dataset held in memory.

    Attributes
    ----------
    images : Tensor
        ``uint8``, shape ``(N, C, H, W)``, values in ``[0, 255]``.
    labels : Tensor
        ``int64``, shape ``(N,)``.
    name : str
        ``"mnist"`` or ``"cifar10"``.
    """

    images: Tensor
    labels: Tensor
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "")
    if key not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return key


def expected_files(name: str, root: str | os.PathLike) -> list[str]:
    """The files torchvision reads for dataset ``name`` under ``root`` (absolute paths)."""
    key = _check_name(name)
    if key == "mnist":
        folder = os.path.join(os.fspath(root), "MNIST", "raw")
        return [os.path.join(folder, f) for f in _MNIST_FILES]
    folder = os.path.join(os.fspath(root), "cifar-10-batches-py")
    return [os.path.join(folder, f) for f in _CIFAR_FILES]


class _CIFAR10NoChecksum(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with the md5 checks switched off (the files must still exist)."""

    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def load_images(
    name: str,
    root: str | os.PathLike,
    *,
    train: bool = True,
    download: bool = False,
    verify_checksums: bool = True,
) -> ImageData:
    """Load MNIST or CIFAR-10 through torchvision.

    Parameters
    ----------
    name : {"mnist", "cifar10"}
    root : path
        The ``root`` torchvision is given (the folder that holds ``MNIST/`` or ``cifar-10-batches-py/``).
    train : bool
        Training split (60000 / 50000 images) or test split (10000).
    download : bool
        Let torchvision download missing files into ``root``.
    verify_checksums : bool
        CIFAR-10 only: check the md5 sums torchvision knows (re-packed batches fail this check).

    Returns
    -------
    ImageData
        ``images`` of shape ``(N, 1, 28, 28)`` (MNIST) or ``(N, 3, 32, 32)`` (CIFAR-10), ``uint8``.

    Raises
    ------
    FileNotFoundError
        When files are missing and ``download`` is false; the message lists the missing paths.
    """
    key = _check_name(name)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    if not download:
        missing = [p for p in expected_files(key, root) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{key} not found under root={os.fspath(root)!r}: missing "
                + ", ".join(missing)
                + ". Pass --download (download=True) or point --data-root at the folder that holds them."
            )
    if key == "mnist":
        ds = datasets.MNIST(os.fspath(root), train=train, download=download)
        images = ds.data.unsqueeze(1).contiguous()
        labels = ds.targets.long()
    else:
        cls = datasets.CIFAR10 if verify_checksums or download else _CIFAR10NoChecksum
        try:
            ds = cls(os.fspath(root), train=train, download=download)
        except RuntimeError as err:  # torchvision's message does not say which file failed
            raise FileNotFoundError(
                f"cifar10 under root={os.fspath(root)!r} failed torchvision's md5 check ({err}); expected the "
                "original files " + ", ".join(expected_files(key, root)) + " (or pass verify_checksums=False)"
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return ImageData(images=images, labels=labels, name=key)


def to_unit_range(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Map ``uint8`` images ``(B, C, H, W)`` in ``[0, 255]`` to floats in ``[-1, 1]`` (same shape)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    return images.to(dtype) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of :func:`to_unit_range`: floats in ``[-1, 1]`` to ``uint8`` (values are clamped)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
