"""The tutorial's CNNs.

Grey images: LeNet-style conv 20 and 50 (5x5), each followed by ReLU and 2x2 max-pooling, then fc 500 with
dropout 0.5. Colour images: the tutorial's CIFAR-10 variant, conv 16/32/64 (3x3, padded) with pooling, then
fc 500 with dropout 0.5. Both adapt to any image size: small images get padded convs, and pooling stops
before the feature map would vanish.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_stack(in_channels: int, image_size: Sequence[int], widths: Sequence[int], kernel: int, padding: int) -> tuple[nn.Sequential, int]:
    """conv -> maxpool -> ReLU blocks (= conv -> ReLU -> maxpool); returns the stack and its flattened output size."""
    layers: list[nn.Module] = []
    height, width = image_size
    channels = in_channels
    for out in widths:
        pad = padding if min(height, width) + 2 * padding - kernel + 1 >= 1 else kernel // 2
        layers.append(nn.Conv2d(channels, out, kernel, padding=pad))
        height, width = height + 2 * pad - kernel + 1, width + 2 * pad - kernel + 1
        # max-pooling before the ReLU computes exactly what the tutorial's ReLU-then-pool does (the ReLU is
        # monotone), on a quarter of the values; the layer indices, and so the weights' names, stay the same
        if min(height, width) >= 2:
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            height, width = height // 2, width // 2
        else:
            layers.append(nn.ReLU(inplace=True))
        channels = out
    return nn.Sequential(*layers), channels * height * width


_BITS = 62  # random bits used from each int64 draw (a draw's low 62 bits are uniform)


class Dropout(nn.Dropout):
    """nn.Dropout that, at p = 0.5, takes each keep/drop coin from one bit of a random int64 instead of one
    Bernoulli draw per value: the same distribution (every value kept with probability 1/2, the rest scaled by 2)
    at about 1/62 of the random numbers, which on a CPU is most of dropout's cost. Other p: nn.Dropout's way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p != 0.5 or self.inplace:
            return super().forward(x)
        n = x.numel()
        words = torch.randint(-(2**62), 2**62, (-(-n // _BITS), 1), dtype=torch.int64, device=x.device)
        shifts = torch.arange(_BITS, dtype=torch.int64, device=x.device)
        keep = ((words >> shifts) & 1).view(-1)[:n].view_as(x)  # (words, 62) bits -> x's shape
        return x * (keep * 2).to(x.dtype)


class LeNet(nn.Module):
    """Conv feature stack -> fc 500 -> dropout -> num_classes logits."""

    def __init__(self, num_classes: int, in_channels: int, image_size: Sequence[int], widths: Sequence[int] = (20, 50),
                 kernel: int = 5, padding: int = 0, hidden: int = 500, dropout: float = 0.5) -> None:
        super().__init__()
        # Inputs smaller than 16 px (8x8 digits) keep their size through "same" padding.
        if min(image_size) < 16:
            padding = kernel // 2
        self.features, flat = _conv_stack(in_channels, image_size, widths, kernel, padding)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True), Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)


def build_lenet(num_classes: int, in_channels: int, image_size: Sequence[int]) -> LeNet:
    """The tutorial's CNN for the data at hand: 2 convs of 5x5 for grey, 3 convs of 3x3 for colour."""
    if in_channels == 1:
        return LeNet(num_classes, in_channels, image_size, widths=(20, 50), kernel=5, padding=0)
    return LeNet(num_classes, in_channels, image_size, widths=(16, 32, 64), kernel=3, padding=1)
