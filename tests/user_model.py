"""A model the zoo lacks, for the any-model tests (also loaded by `trady ... --model tests/user_model.py:build`).

Grouped conv, depthwise conv, a residual add, a Linear in the middle of the network and a head named
`head` (not `classifier`): what a user brings."""

from __future__ import annotations

import torch
from torch import nn


class UserNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.point = nn.Conv2d(8, 16, 1)
        self.act = nn.ReLU()
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.act(self.depthwise(self.grouped(x)))  # residual
        x = self.act(self.point(x)).mean((2, 3))
        return self.head(self.act(self.mid(x)))


def build(num_classes: int = 10) -> UserNet:
    torch.manual_seed(0)
    return UserNet(num_classes).eval()  # BatchNorm frozen, as the paper's recipe
