"""Model names -> builders. Every builder takes (num_classes, in_channels, image_size) and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from imgrec.errors import ImgrecError, UsageError
from imgrec.models.backbones import BACKBONES, build_backbone
from imgrec.models.lenet import build_lenet
from imgrec.models.mlp import MLP
from imgrec.models.speednet import build_airnet, build_airnet_small, build_resnet8, build_speednet


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[[int, int, Sequence[int]], nn.Module]
    description: str
    pretrained: bool = False  # torchvision publishes ImageNet weights for it (--pretrained); it is a TransferModel


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(lambda n, c, s: MLP(n, c, s), "the tutorial's naive fully-connected net (hidden 125, 65)"),
    "lenet": ModelEntry(build_lenet, "the tutorial's CNN: conv 20/50 5x5 for grey, conv 16/32/64 3x3 for colour; fc 500"),
    "resnet8": ModelEntry(build_resnet8, "small residual speed-run net for 28x28 grey images: stem 16, residual groups "
                                         "32/64/128 with max-pooling, BN, GELU, scaled linear head (--recipe fast)"),
    "speednet": ModelEntry(build_speednet, "airbench/ResNet-9-style net for 32x32 colour images: stem 32, residual "
                                           "groups 64/192/256 with max-pooling, BN, GELU, scaled linear head "
                                           "(--recipe fast)"),
    "airnet": ModelEntry(build_airnet, "airbench94-style net: a 2x2 patch-whitening stem fitted to the training "
                                       "images, blocks of 64/256/256 with max-pooling, BN, GELU, scaled linear head"),
    "airnet-small": ModelEntry(build_airnet_small, "airnet with blocks of 32/64/128, for 28x28 grey images "
                                                   "(--recipe fast)"),
    **{name: ModelEntry(partial(build_backbone, name), spec.description, pretrained=True)
       for name, spec in BACKBONES.items()},
}


# Models written in Python by the user, by "<module>.<class>" name, while a run of theirs trains or loads
# (user_model). A weights file records only that name: imgrec never imports code named in a file.
USER_MODELS: dict[str, Callable[[int, int, Sequence[int]], nn.Module]] = {}


@contextmanager
def user_model(name: str, builder: Callable[[int, int, Sequence[int]], nn.Module]) -> Iterator[None]:
    """Make build_model(name, ...) call builder while the block runs."""
    before = USER_MODELS.get(name)
    USER_MODELS[name] = builder
    try:
        yield
    finally:
        if before is None:
            USER_MODELS.pop(name, None)
        else:
            USER_MODELS[name] = before


def is_user_model(name: str) -> bool:
    """A model written in Python ("<module>.<class>"), not a registry name."""
    return name not in MODELS and "." in name


def build_model(name: str, num_classes: int, in_channels: int, image_size: Sequence[int]) -> nn.Module:
    """Build a registered model (or a user's model, see user_model) for the data's class count, channels and (H, W)."""
    if name in USER_MODELS:
        return USER_MODELS[name](num_classes, in_channels, tuple(image_size))
    if is_user_model(name):
        module, _, cls = name.rpartition(".")
        raise ImgrecError(f"the weights hold a model defined in Python ({cls} from {module}); imgrec never imports "
                          f"it from a file: pass it, e.g. imgrec.load(run, model={cls})")
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}: use one of {', '.join(MODELS)} (`imgrec models` lists them)")
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    return MODELS[name].builder(num_classes, in_channels, tuple(image_size))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_size(name: str, num_classes: int, in_channels: int, image_size: Sequence[int]) -> int:
    """Parameters of a model as build_model makes it, counted on the meta device (instant even for VGG-16)."""
    with torch.device("meta"):
        return count_parameters(build_model(name, num_classes, in_channels, image_size))
