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
WHITENED_HEAD_SCALE = 1 / 9  # the same for WhitenedNet (airbench's)
BIAS_LR_SCALE = 64.0  # WhitenedNet's BatchNorm shifts train at this times the learning rate


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


class _FixedScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the shift trains), with fast-moving running statistics: the
    speed-run nets' choice, since the following GELU and the next conv make a learned scale redundant."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias whose first in_channels filters start as the identity (the rest random)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[: min(in_channels, out_channels)])


class WhitenedNet(nn.Module):
    """airbench-style net: a frozen patch-whitening conv, then blocks of conv -> max-pool -> BN -> GELU -> conv ->
    BN -> GELU, a global max-pool and a scaled bias-free linear head.

    The whitening conv (2x2 patches, no padding) gets its weights from the training images themselves
    (init_from_images): the eigenvectors of their patch covariance scaled by 1/sqrt(eigenvalue), and their
    negatives, so the first layer sees decorrelated inputs from the first step. Those weights never train; its
    bias does. Before init_from_images the stem is a random conv, and a model loaded from a weights file gets it
    from the file.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: Sequence[int], widths: Sequence[int],
                 kernel: int = 2) -> None:
        super().__init__()
        self.kernel = kernel if min(image_size) > kernel else 1
        width = 2 * in_channels * self.kernel**2
        self.whiten = nn.Conv2d(in_channels, width, self.kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        height, size = image_size[0] - self.kernel + 1, image_size[1] - self.kernel + 1
        layers: list[nn.Module] = [nn.GELU()]
        channels = width
        for out in widths:
            layers.append(_Conv(channels, out))
            if min(height, size) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, size = height // 2, size // 2
            layers += [_FixedScaleBatchNorm(out), nn.GELU(), _Conv(out, out), _FixedScaleBatchNorm(out), nn.GELU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes, bias=False)

    def lr_scaled_parameters(self) -> tuple[float, list[nn.Parameter]]:
        """The BatchNorm shifts, which train at BIAS_LR_SCALE times the learning rate: with their scale fixed at 1
        they would otherwise move far slower than the convs' scale-free weights (airbench's bias scaler)."""
        return BIAS_LR_SCALE, [m.bias for m in self.modules() if isinstance(m, _FixedScaleBatchNorm)]

    def freeze_whitening_bias(self, frozen: bool) -> None:
        """Stop (or resume) training the whitening stem's bias: airbench trains it for the first epochs only."""
        self.whiten.bias.requires_grad_(not frozen)

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening weights from normalised training images (N, C, H, W), float; a few thousand do."""
        k = self.kernel
        x = images.float()
        channels = x.shape[1]
        # every k x k patch as a row of C*k*k values
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * k * k)
        covariance = (patches.T @ patches / len(patches)).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        order = eigenvalues.argsort(descending=True)
        filters = (eigenvectors[:, order].T / (eigenvalues[order].clamp_min(0) + eps).sqrt()[:, None])
        filters = filters.reshape(-1, channels, k, k).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.whiten(x))  # (B, C, H, W) -> (B, widths[-1], H', W')
        x = torch.amax(x, dim=(2, 3))  # -> (B, widths[-1])
        return self.head(x) * WHITENED_HEAD_SCALE  # -> (B, num_classes)



def build_airnet(num_classes: int, in_channels: int, image_size: Sequence[int]) -> WhitenedNet:
    """airbench94's shape: whitening stem, blocks of 64/256/256."""
    return WhitenedNet(num_classes, in_channels, image_size, widths=(64, 256, 256))


def build_airnet_small(num_classes: int, in_channels: int, image_size: Sequence[int]) -> WhitenedNet:
    """The same with blocks of 32/64/128: about 1/9 of the FLOPs, for 28x28 grey images."""
    return WhitenedNet(num_classes, in_channels, image_size, widths=(32, 64, 128))
