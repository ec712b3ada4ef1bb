"""Tiny fake MNIST and CIFAR-10 datasets written in the real on-disk formats (for tests).

* MNIST: raw idx files (big-endian magic ``0x00000803`` / ``0x00000801``, then the dimensions as big-endian
  int32, then ``uint8`` data) under ``root/MNIST/raw/``, the layout torchvision reads.
* CIFAR-10: python pickles under ``root/cifar-10-batches-py/``: ``data_batch_1..5`` and ``test_batch`` hold
  ``{"data": uint8 (n, 3072) in CHW order, "labels": list[int], ...}``, ``batches.meta`` holds
  ``{"label_names": [...]}``.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _strokes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Black 28x28 images with one white vertical bar (a "1") at a random column: MNIST-like statistics."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for image, col in zip(images, rng.integers(9, 16, size=n), strict=True):
        image[4:24, col : col + 4] = 255
    return images


def write_fake_mnist(
    root: Path, n_train: int = 64, n_test: int = 16, seed: int = 0, strokes: bool = False
) -> np.ndarray:
    """Write MNIST idx files; returns the training images ``(n, 28, 28)``.

    The images are uniform noise, or with ``strokes`` one white bar on black (:func:`_strokes`).
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if strokes:
        train, test = _strokes(rng, n_train), _strokes(rng, n_test)
    else:
        train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
        test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train)
    _write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, size=n_train, dtype=np.uint8))
    _write_idx(raw / "t10k-images-idx3-ubyte", test)
    _write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, size=n_test, dtype=np.uint8))
    return train


def write_fake_cifar10(root: Path, n_per_batch: int = 8, seed: int = 0) -> np.ndarray:
    """Write CIFAR-10 pickle batches; returns the training images ``(5 * n_per_batch, 32, 32, 3)`` (HWC)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{i}.png" for i in labels],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        if name != "test_batch":
            train.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f)
    return np.concatenate(train)
