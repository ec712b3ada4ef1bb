"""Progress bars that stay out of logs (private module)."""

from __future__ import annotations


def bar_disable(progress: bool) -> bool | None:
    """tqdm's ``disable`` for the switch ``progress``: True when it is off; None when it is on, so that tqdm
    draws the bar on a terminal and writes nothing when its stream is a file or a pipe (a scheduler's log
    would otherwise receive every carriage-return frame)."""
    return None if progress else True
