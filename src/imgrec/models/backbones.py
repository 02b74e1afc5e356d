"""torchvision's classification networks as TransferModels: which ones, how to cut off their classifier, and what
their published ImageNet weights expect (file, input size, mean/std), read from torchvision's weights enums.

Builders take (num_classes, in_channels, image_size) like every imgrec model and load no weights: where weights
come from (torch's cache, a file, an imgrec run) is decided outside the models package.
Imports: torch, torchvision, imgrec.errors and imgrec.models.transfer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imgrec.errors import ImgrecError
from imgrec.models.transfer import TransferModel, backbone_state_of, state_mismatch


@dataclass(frozen=True)
class Backbone:
    """A torchvision network: the path of its final Linear (the classifier the new head replaces) and first conv."""

    head: str
    first_conv: str
    description: str


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("fc", "conv1", "ResNet-18 (torchvision): 512 features"),
    "resnet50": Backbone("fc", "conv1", "ResNet-50 (torchvision): 2048 features"),
    "vgg16": Backbone("classifier.6", "features.0", "VGG-16 (torchvision): 4096 features"),
    "mobilenet_v3_small": Backbone("classifier.3", "features.0.0", "MobileNetV3-Small (torchvision): 1024 features"),
    "mobilenet_v3_large": Backbone("classifier.3", "features.0.0", "MobileNetV3-Large (torchvision): 1280 features"),
    "efficientnet_b0": Backbone("classifier.1", "features.0.0", "EfficientNet-B0 (torchvision): 1280 features"),
    "convnext_tiny": Backbone("classifier.2", "features.0.0", "ConvNeXt-Tiny (torchvision): 768 features"),
}


@dataclass(frozen=True)
class PretrainedWeights:
    """torchvision's default ImageNet weights of a backbone: where to get them and what input they expect."""

    enum: str  # e.g. ResNet18_Weights.IMAGENET1K_V1
    url: str
    file_name: str  # the name torch.hub gives the file in its cache: the URL's last part
    hash_prefix: str | None  # the start of the file's SHA-256, from its name (torch.hub's convention)
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    channels: int = 3


def build_backbone(name: str, num_classes: int, in_channels: int, image_size: Sequence[int]) -> TransferModel:
    """The torchvision network `name`, randomly initialised, its classifier replaced by a new head of num_classes.

    Any image size works (adaptive pooling; inputs under 32 px are upsampled); in_channels other than 3 get a new
    first conv of the same shape otherwise.
    """
    import torchvision

    spec = BACKBONES[name]
    net = torchvision.models.get_model(name)
    old_head = net.get_submodule(spec.head)
    assert isinstance(old_head, nn.Linear), f"{name}.{spec.head} is not the classifier"
    _replace(net, spec.head, nn.Identity())
    if in_channels != 3:
        conv = net.get_submodule(spec.first_conv)
        _replace(net, spec.first_conv, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                                 conv.padding, bias=conv.bias is not None))
    return TransferModel(net, old_head.in_features, num_classes, head_name=spec.head)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def pretrained_weights(name: str) -> PretrainedWeights:
    """What torchvision publishes for backbone `name`: its DEFAULT weights enum, read without downloading anything."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    preset = weights.transforms()
    file_name = weights.url.rsplit("/", 1)[-1]
    match = re.search(r"-([a-f0-9]+)\.", file_name)  # torch.hub's HASH_REGEX
    crop = int(preset.crop_size[0])
    return PretrainedWeights(f"{type(weights).__name__}.{weights.name}", weights.url, file_name,
                             match.group(1) if match else None, (crop, crop), list(preset.mean), list(preset.std))


def guess_backbone(state: dict[str, torch.Tensor]) -> str | None:
    """Which registered backbone (with 3 or 1 input channels) a state dict belongs to, if any."""
    for name, spec in BACKBONES.items():
        for channels in (3, 1):
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                own = build_backbone(name, 2, channels, (32, 32)).backbone.state_dict()
            if state_mismatch(own, backbone_state_of(state, spec.head)) is None:
                return name
    return None


def check_backbone_state(name: str, model: TransferModel, state: dict[str, torch.Tensor], source: str) -> None:
    """A one-line error when a state dict is not of backbone `name`, naming the backbone it is of when known."""
    problem = state_mismatch(model.backbone.state_dict(), backbone_state_of(state, model.head_name))
    if problem is None:
        return
    guess = guess_backbone(state)
    hint = f"; it holds a {guess}: use --model {guess}" if guess and guess != name else ""
    raise ImgrecError(f"{source} does not hold {name} weights ({problem}){hint}")
