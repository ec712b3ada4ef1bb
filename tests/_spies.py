"""Test doubles shared by the test modules (independent of the code under test)."""

from __future__ import annotations

import torch
from torch import nn


class LabelSpy(nn.Module):
    """Records the labels ``y`` of every call of ``net`` and forwards the call (without ``y`` when None)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.labels: list[torch.Tensor | None] = []

    def forward(self, *args, y=None, **kwargs):
        self.labels.append(y)
        return self.net(*args, y=y) if y is not None else self.net(*args)
