"""Image datasets for the examples: torchvision's MNIST and CIFAR-10 as one uint8 tensor in memory.

The whole training split is held as a ``uint8`` tensor of shape ``(N, C, H, W)`` (MNIST: 47 MB, CIFAR-10:
150 MB) and converted to ``[-1, 1]`` floats one batch at a time (:func:`to_unit_range`). Indexing a tensor
with the indices of a :class:`~torch.utils.data.distributed.DistributedSampler` is all the data pipeline
needs, and keeps the data order a pure function of ``(seed, epoch, step)``: that is what makes an
interrupted run resume exactly. Random horizontal flips are applied to the batch by the training loop.

Every fact about a dataset is in its :class:`DatasetRecord` in :data:`DATASETS`: its files in torchvision's
layout under ``root``, image shape, classes, the UNet preset and horizontal flips of its training recipe,
the default run length of the command line, whether the Inception Score applies, and its reader. Adding a
dataset is adding a record (and a test):

* MNIST: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (raw idx files);
* CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (python pickles).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import datasets

__all__ = [
    "DATASETS",
    "NUM_CLASSES",
    "DatasetRecord",
    "ImageData",
    "dataset_record",
    "expected_files",
    "load_images",
    "to_unit_range",
]

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
        raise ValueError(f"name must be one of {tuple(DATASETS)}, got {name!r}")
    return key


def expected_files(name: str, root: str | os.PathLike) -> list[str]:
    """The files torchvision reads for dataset ``name`` under ``root`` (absolute paths)."""
    record = DATASETS[_check_name(name)]
    folder = os.path.join(os.fspath(root), record.folder)
    return [os.path.join(folder, f) for f in record.files]


class _CIFAR10NoChecksum(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with the md5 checks switched off (the files must still exist)."""

    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


#: ``read(root, train, download, verify_checksums) -> (images uint8 (N, C, H, W), labels int64 (N,))``.
Reader = Callable[[str, bool, bool, bool], "tuple[Tensor, Tensor]"]


def _read_idx(cls: type) -> Reader:
    """A reader of torchvision's idx-file datasets (MNIST and its relatives): one channel."""

    def read(root: str, train: bool, download: bool, verify_checksums: bool) -> tuple[Tensor, Tensor]:
        ds = cls(root, train=train, download=download)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()

    return read


def _read_cifar10(root: str, train: bool, download: bool, verify_checksums: bool) -> tuple[Tensor, Tensor]:
    cls = datasets.CIFAR10 if verify_checksums or download else _CIFAR10NoChecksum
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as err:  # torchvision's message does not say which file failed
        raise FileNotFoundError(
            f"cifar10 under root={root!r} failed torchvision's md5 check ({err}); expected the original files "
            + ", ".join(expected_files("cifar10", root))
            + " (or pass verify_checksums=False)"
        ) from err
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(
        ds.targets, dtype=torch.long
    )


@dataclass(frozen=True)
class DatasetRecord:
    """Everything the package knows about one image dataset.

    Attributes
    ----------
    name : str
        The key in :data:`DATASETS` (the example scripts' names).
    folder : str
        Folder of the files under torchvision's ``root``.
    files : tuple of str
        The files torchvision reads there.
    shape : (C, H, W)
        Shape of one image.
    classes : int
        Number of classes (class-conditional labels lie in ``[0, classes)``).
    unet_preset : str
        The UNet preset of its recipe (a key of ``torchcfm_nsgf.images.unet.UNET_PRESETS``).
    hflip : bool
        Whether its recipe flips images horizontally at random.
    default_steps : int
        Optimiser steps of a run when none are given (the command line's ``--train-steps``).
    inception_score : bool
        Whether the Inception Score is computed next to the FID (natural images of ImageNet-like classes).
    checksums : bool
        Whether torchvision can verify its files (the command line then offers ``--verify-checksums``).
    read : callable
        ``read(root, train, download, verify_checksums) -> (images, labels)``: uint8 ``(N, C, H, W)`` and
        int64 ``(N,)``.
    """

    name: str
    folder: str
    files: tuple[str, ...]
    shape: tuple[int, int, int]
    classes: int
    unet_preset: str
    hflip: bool
    default_steps: int
    inception_score: bool
    checksums: bool
    read: Reader


#: The datasets, by name.
DATASETS: dict[str, DatasetRecord] = {
    record.name: record
    for record in (
        DatasetRecord(
            "mnist",
            folder=os.path.join("MNIST", "raw"),
            files=_MNIST_FILES,
            shape=(1, 28, 28),
            classes=10,
            unet_preset="mnist",
            hflip=False,
            default_steps=20_000,
            inception_score=False,
            checksums=False,
            read=_read_idx(datasets.MNIST),
        ),
        DatasetRecord(
            "cifar10",
            folder="cifar-10-batches-py",
            files=_CIFAR_FILES,
            shape=(3, 32, 32),
            classes=10,
            unet_preset="cifar10",
            hflip=True,
            default_steps=400_000,
            inception_score=True,
            checksums=True,
            read=_read_cifar10,
        ),
    )
}
#: Classes of each dataset (the labels of class-conditional runs lie in ``[0, NUM_CLASSES[name])``).
NUM_CLASSES = {name: record.classes for name, record in DATASETS.items()}


def dataset_record(name: str) -> DatasetRecord:
    """The record of dataset ``name`` (case and dashes ignored); ``ValueError`` naming the choices otherwise."""
    return DATASETS[_check_name(name)]


def load_images(
    name: str,
    root: str | os.PathLike,
    *,
    train: bool = True,
    download: bool = False,
    verify_checksums: bool = True,
) -> ImageData:
    """Load a dataset of :data:`DATASETS` through torchvision (its record's reader).

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS` (``"mnist"``, ``"cifar10"``).
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
    images, labels = DATASETS[key].read(os.fspath(root), train, download, verify_checksums)
    return ImageData(images=images, labels=labels, name=key)


def to_unit_range(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Map ``uint8`` images ``(B, C, H, W)`` in ``[0, 255]`` to floats in ``[-1, 1]`` (same shape)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    return images.to(dtype) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of :func:`to_unit_range`: floats in ``[-1, 1]`` to ``uint8`` (values are clamped)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
