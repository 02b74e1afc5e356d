"""Where a model looks: Grad-CAM for convolutional nets, input-gradient saliency for the rest.

Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) weighs the feature maps of the last
convolution by the mean gradient of the class score over each map, keeps the positive part and scales it up
to the input. The layer is found by running the model: the last Conv2d executed whose output still has a
spatial extent (at least 2x2), so a torchvision backbone whose final maps are 1x1 on small inputs uses the
last layer that still knows "where". Saliency (Simonyan et al. 2013, https://arxiv.org/abs/1312.6034) is the
largest absolute input gradient over the channels. Works on any nn.Module; imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

METHODS = ("auto", "gradcam", "saliency")


@dataclass
class Explanation:
    """A heat-map over one image and the prediction it explains."""

    heatmap: torch.Tensor  # (H, W) in [0, 1], at the input's resolution
    method: str  # "Grad-CAM" or "saliency"
    target: int  # the class explained (the top prediction unless asked otherwise)
    probabilities: torch.Tensor  # (num_classes,) softmax of logits / temperature
    layer: str | None = None  # Grad-CAM: the module whose output was used
    feature_size: tuple[int, int] | None = None  # Grad-CAM: (h, w) of that output
    note: str | None = None  # why the method differs from the one asked for


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's Conv2d modules, in registration order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def explain(model: nn.Module, x: torch.Tensor, method: str = "auto", target: int | None = None,
            temperature: float | None = None) -> Explanation:
    """Explain one normalised image x (1, C, H, W): Grad-CAM when the model has convolutions, else saliency."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if method == "saliency":
        return saliency(model, x, target, temperature)
    if not conv_layer_names(model):
        result = saliency(model, x, target, temperature)
        result.note = f"{type(model).__name__} has no convolution layer: input-gradient saliency instead of Grad-CAM"
        return result
    return grad_cam(model, x, target, temperature)


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None,
             temperature: float | None = None) -> Explanation:
    """Grad-CAM on the last executed Conv2d with an output of at least 2x2 (the last one if none is)."""
    recorded: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            recorded.append((name, output))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        logits, target = _forward(model, x, target, temperature)
    finally:
        for handle in handles:
            handle.remove()
    if not recorded:
        raise ValueError(f"{type(model).__name__} ran no Conv2d layer: Grad-CAM needs one")
    spatial = [(n, a) for n, a in recorded if a.dim() == 4 and min(a.shape[-2:]) >= 2]
    name, activation = (spatial or recorded)[-1]
    # After an in-place ReLU the recorded tensor holds the ReLU's output, and autograd.grad follows it: the
    # activations and gradients below always belong to the same tensor.
    grads = torch.autograd.grad(logits[0, target], activation)[0]  # (1, K, h, w)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1): how much each map matters for the class
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True)).detach()  # (1, 1, h, w)
    heatmap = nn.functional.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return Explanation(_unit(heatmap[0, 0]), "Grad-CAM", target, _probabilities(logits, temperature), name,
                       (int(activation.shape[-2]), int(activation.shape[-1])))


def saliency(model: nn.Module, x: torch.Tensor, target: int | None = None,
             temperature: float | None = None) -> Explanation:
    """Input-gradient saliency: max over channels of |d score / d pixel|."""
    x = x.detach().clone().requires_grad_(True)
    logits, target = _forward(model, x, target, temperature, leaf=x)
    grads = torch.autograd.grad(logits[0, target], x)[0]  # (1, C, H, W)
    return Explanation(_unit(grads.abs().amax(dim=1)[0].detach()), "saliency", target,
                       _probabilities(logits, temperature))


def _forward(model: nn.Module, x: torch.Tensor, target: int | None, temperature: float | None,
             leaf: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Logits (1, num_classes) with autograd on, in eval mode; the class to explain (the top one by default)."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"explain one image at a time: expected (1, C, H, W), got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # Inputs that require grad keep a graph even through frozen (requires_grad=False) backbones.
            inputs = leaf if leaf is not None else x.detach().clone().requires_grad_(True)
            logits = model(inputs).float()  # (1, C, H, W) -> (1, num_classes)
    finally:
        model.train(was_training)
    if target is None:
        target = int(logits[0].argmax())
    return logits, target


def _probabilities(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    scaled = logits.detach()[0] / (temperature or 1.0)
    return torch.softmax(scaled.double(), dim=0).float().cpu()


def _unit(heatmap: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by the maximum (an all-zero map stays zero)."""
    heatmap = heatmap.float().cpu()
    top = heatmap.max()
    return heatmap / top if top > 0 else torch.zeros_like(heatmap)
