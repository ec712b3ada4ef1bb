"""Environment of the subprocesses that tests start (example scripts, torchrun workers)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pythonpath() -> str:
    """The repository ahead of the PYTHONPATH already set, which may hold the dependencies."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
