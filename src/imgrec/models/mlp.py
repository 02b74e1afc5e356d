"""The tutorial's naive fully-connected net: flatten, 125 and 65 hidden units with ReLU, then the classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten (C, H, W) -> hidden layers with ReLU -> num_classes logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size: Sequence[int], hidden: Sequence[int] = (125, 65)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size[0] * image_size[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, num_classes)
