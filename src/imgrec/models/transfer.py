"""TransferModel: a backbone that turns images into feature vectors, and a new linear head for the data's classes.

It owns what transfer learning needs from a model and nothing about where weights come from:
  set_frozen(True)   the backbone stops learning: no gradients, and it stays in eval mode (BatchNorm keeps its
                     running statistics, dropout inside it is off), whatever train() the trainer calls;
  parameter_groups   the head at the full learning rate, earlier backbone layers at lower ones (discriminative
                     learning rates, as fastai's `slice(lo, hi)`);
  load_backbone_state  weights of a torchvision model or of another TransferModel into the backbone; the head
                     stays new, so any class count fits.
Imports: torch and imgrec.errors only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from imgrec.errors import ImgrecError

MIN_INPUT_SIZE = 32  # five 2x downsamplings (VGG's pools, ConvNeXt's stem and stages) need at least 32 px
STAGE_GROUPS = 4  # the backbone's blocks are split into this many learning-rate groups


class TransferModel(nn.Module):
    """backbone: (B, C, H, W) -> (B, feature_dim); head: (B, feature_dim) -> (B, num_classes)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head_name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.head_name = head_name  # where the original classifier sat, e.g. "fc": its weights are never loaded
        self.frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature vectors; inputs under 32 px are upsampled so that every backbone accepts them."""
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            scale = MIN_INPUT_SIZE / min(x.shape[-2:])
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        # A frozen backbone needs no autograd graph: only the head learns.
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.backbone(x)  # (B, C, H, W) -> (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, feature_dim) -> (B, num_classes)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the backbone: requires_grad off and eval mode (BatchNorm statistics kept) when frozen."""
        self.frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferModel:
        """As nn.Module.train, but a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def parameter_groups(self, lr: float, backbone_mult: float) -> list[dict[str, Any]]:
        """Optimiser groups: the head at lr, then the backbone's blocks in four groups, earliest first.

        Group k of n (k = 0 the earliest) trains at lr * mult^((n - k) / n): with mult 0.1, the first blocks at
        0.1 lr, the last at 0.56 lr.
        """
        groups: list[dict[str, Any]] = [{"params": list(self.head.parameters()), "lr": lr, "name": "head"}]
        chunks = _split_evenly(backbone_blocks(self.backbone), STAGE_GROUPS)
        named = dict(self.backbone.named_parameters())
        for k, blocks in enumerate(chunks):  # k = 0: the earliest blocks
            params = [named[n] for n in named if _block_of(n) in blocks]
            groups.append({"params": params, "lr": lr * backbone_mult ** ((len(chunks) - k) / len(chunks)),
                           "name": f"backbone.{k}"})
        return groups


def backbone_blocks(backbone: nn.Module) -> list[str]:
    """The backbone's blocks that hold parameters, in forward order: conv1, bn1, layer1.. or features.0, features.1.."""
    blocks: list[str] = []
    for name, _ in backbone.named_parameters():
        block = _block_of(name)
        if block not in blocks:
            blocks.append(block)
    return blocks


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "features" and len(parts) > 2 else parts[0]


def _split_evenly(items: list[str], parts: int) -> list[list[str]]:
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def backbone_state_of(state: dict[str, torch.Tensor], head_name: str) -> dict[str, torch.Tensor]:
    """The backbone's part of a state dict: imgrec's (backbone.*) or torchvision's (everything but the classifier)."""
    if any(k.startswith("backbone.") for k in state):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith(head_name + ".")}


def state_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """What keeps `given` from loading into a module whose state is `own`, in a few words; None when it fits."""
    # BatchNorm fills a missing num_batches_tracked itself (files saved before PyTorch 0.4.1 lack it)
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    wrong = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        return f"{k} has shape {tuple(given[k].shape)} but the model's is {tuple(own[k].shape)}"
    if missing:
        return f"{len(missing)} tensors missing (first: {missing[0]})"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})"
    return None


def load_backbone_state(model: TransferModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the backbone's weights from a torchvision or imgrec state dict; a mismatch is a one-line error."""
    given = backbone_state_of(state, model.head_name)
    problem = state_mismatch(model.backbone.state_dict(), given)
    if problem:
        raise ImgrecError(f"the weights in {source} do not fit this backbone: {problem}")
    model.backbone.load_state_dict(given)
