"""The optional methods a model may offer training: one Protocol, and the helpers that call them.

A model is any nn.Module; these methods are extras that the registry's models, transfer models and a user's own
module may implement, any subset of them. Training never asks a model what it has anywhere else: it calls the
helpers below, which do what the model offers, or the plain thing for a model without the method.

  init_from_images(images)     data-dependent first layers fitted to normalised training images (N, C, H, W)
                               before training (airnet's whitening stem); not called for a model whose weights come
                               from elsewhere (--pretrained, --weights, a resumed state)
  set_frozen(frozen)           stop (True) or restart (False) the backbone's learning (--freeze, --freeze-epochs)
  parameter_groups(lr, backbone_mult)
                               the optimiser's parameter groups, each with its own "lr" (lower rates for earlier
                               layers of a pretrained backbone)
  lr_scaled_parameters()       (scale, parameters): parameters trained at lr * scale, with weight decay / scale
                               (the same decay per step); ignored when the model has parameter_groups
  freeze_whitening_bias(frozen)
                               stop (True) or restart (False) training a whitened stem's bias
                               (--whiten-bias-epochs)

Imports: torch only (the engine uses this module, and nothing else of imgrec.models).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class FitsToImages(Protocol):
    def init_from_images(self, images: torch.Tensor) -> None: ...


@runtime_checkable
class Freezable(Protocol):
    def set_frozen(self, frozen: bool) -> None: ...


@runtime_checkable
class GroupsParameters(Protocol):
    def parameter_groups(self, lr: float, backbone_mult: float) -> list[dict[str, Any]]: ...


@runtime_checkable
class ScalesParameters(Protocol):
    def lr_scaled_parameters(self) -> tuple[float, list[nn.Parameter]]: ...


@runtime_checkable
class FreezesWhiteningBias(Protocol):
    def freeze_whitening_bias(self, frozen: bool) -> None: ...


ModelHooks = (FitsToImages, Freezable, GroupsParameters, ScalesParameters, FreezesWhiteningBias)  # every optional method, one Protocol each


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze the model's backbone; nothing for a model without one."""
    if isinstance(model, Freezable):
        model.set_frozen(frozen)


def freeze_whitening_bias(model: nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze a whitened stem's bias; nothing for a model without one."""
    if isinstance(model, FreezesWhiteningBias):
        model.freeze_whitening_bias(frozen)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_mult: float) -> Any:
    """What the optimiser trains: the model's own groups (parameter_groups); for a model with lr_scaled_parameters
    (a WhitenedNet's BatchNorm shifts), those at lr * scale with weight decay / scale (the same decay per step);
    else all parameters at lr. Frozen parameters are left out."""
    if isinstance(model, GroupsParameters):
        return model.parameter_groups(lr, backbone_mult)
    if not isinstance(model, ScalesParameters):
        return [p for p in model.parameters() if p.requires_grad]
    scale, fast = model.lr_scaled_parameters()
    chosen = {id(p) for p in fast}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return [{"params": rest}, {"params": list(fast), "lr": lr * scale, "weight_decay": weight_decay / scale}]
