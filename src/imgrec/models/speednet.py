"""Small residual nets in the spirit of the CIFAR-10 speed runs (ResNet-9, airbench), sized for CPU training.

A stem conv, then groups of conv -> 2x2 max-pool -> BatchNorm -> GELU followed by a residual conv -> BatchNorm ->
GELU whose output is added back; a global max-pool and a bias-free linear head whose logits are scaled down (a
fixed temperature that speed-run nets use so that label smoothing and a high learning rate stay stable).
`resnet8` (stem 16, groups 32/64/128) is sized for 28x28 grey images, `speednet` (stem 32, groups 64/192/256)
for 32x32 colour; both take any channels, image size and class count. Imports: torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

HEAD_SCALE = 0.125  # logits = head(features) * HEAD_SCALE


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.GELU()]


class _Residual(nn.Module):
    """x + GELU(BN(conv3x3(x))): the residual half of a group."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Group(nn.Sequential):
    """conv3x3 -> max-pool 2x2 (while the map is at least 2 px) -> BN -> GELU -> residual conv."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(out_channels), nn.GELU(), _Residual(out_channels)]
        super().__init__(*layers)


class SpeedNet(nn.Module):
    """Stem conv -> residual groups (each halving the map) -> global max-pool -> scaled linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: Sequence[int], stem: int,
                 widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn(in_channels, stem)
        height, width = image_size
        channels = stem
        for out in widths:
            pool = min(height, width) >= 2
            layers.append(_Group(channels, out, pool))
            if pool:
                height, width = height // 2, width // 2
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, H, W) -> (B, widths[-1], H', W')
        x = torch.amax(x, dim=(2, 3))  # -> (B, widths[-1])
        return self.head(x) * HEAD_SCALE  # -> (B, num_classes)


def build_resnet8(num_classes: int, in_channels: int, image_size: Sequence[int]) -> SpeedNet:
    """8 weight layers (stem, 3 groups of 2 convs, head): the grey-image speed net."""
    return SpeedNet(num_classes, in_channels, image_size, stem=16, widths=(32, 64, 128))


def build_speednet(num_classes: int, in_channels: int, image_size: Sequence[int]) -> SpeedNet:
    """The colour-image speed net: stem 32, groups 64/192/256."""
    return SpeedNet(num_classes, in_channels, image_size, stem=32, widths=(64, 192, 256))
