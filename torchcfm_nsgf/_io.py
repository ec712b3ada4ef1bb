"""Atomic checkpoint writing shared by the trainers (private module).

A file ``NAME`` is written as the temporary ``.NAME.partial-XXXXXXXX.tmp`` in the same folder, then renamed:
an interrupted write (a crash, ``kill -9``) can leave that temporary behind, never a torn ``NAME``.
:func:`remove_stale_temps` deletes such leftovers.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

_TEMP_MARK = ".partial-"
_TEMP_SUFFIX = ".tmp"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: temp file in the same folder, fsync, :func:`os.replace`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = "." + os.path.basename(path) + _TEMP_MARK
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=_TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temps(folder: str | os.PathLike, name_prefix: str) -> list[str]:
    """Delete the temporaries that interrupted :func:`atomic_save` calls left for files named ``name_prefix*``.

    Only call it when no write to such a file is in flight. Returns the names removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        # ".NAME.partial-XXXX.tmp", and ".NAME.XXXX.tmp" of earlier versions
        if name.startswith("." + name_prefix) and name.endswith(_TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def check_writable_dir(path: str | os.PathLike) -> str | None:
    """Create the folder ``path`` if needed and write a probe file in it; the reason it fails, else None."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None
