"""Grad-CAM and saliency: they light the evidence a model uses, on models whose evidence is known."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from imgrec.evaluation.explain import conv_layer_names, explain, grad_cam, saliency
from imgrec.models.registry import build_model

SIZE = 16


def _corner_images(n: int, corner: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images (n, 1, 16, 16); class 1 has a bright 5x5 square in the given corner, class 0 has none."""
    x = torch.rand(n, 1, SIZE, SIZE, generator=gen) * 0.3
    y = torch.arange(n) % 2
    rows, cols = CORNERS[corner]
    x[(y == 1).nonzero().flatten()[:, None, None], 0, rows[:, None], cols[None, :]] = 1.0
    return x, y


CORNERS = {"top-left": (torch.arange(0, 5), torch.arange(0, 5)),
           "bottom-right": (torch.arange(SIZE - 5, SIZE), torch.arange(SIZE - 5, SIZE))}


def _train_corner_cnn(corner: str) -> nn.Module:
    """A tiny CNN trained for a few steps to tell images with the square in that corner from plain noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        x, y = _corner_images(32, corner, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _corner_images(64, corner, gen)
    assert (model(x).argmax(1) == y).float().mean() == 1.0  # it learned the task
    return model


def _quadrant_share(heatmap: torch.Tensor, top: bool, left: bool) -> float:
    half = SIZE // 2
    rows = slice(0, half) if top else slice(half, SIZE)
    cols = slice(0, half) if left else slice(half, SIZE)
    return float(heatmap[rows, cols].sum() / heatmap.sum())


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_grad_cam_lights_the_corner_that_holds_the_evidence(corner: str) -> None:
    model = _train_corner_cnn(corner)
    x, _ = _corner_images(2, corner, torch.Generator().manual_seed(7))
    e = explain(model, x[1:2])  # a class-1 image: the square is its evidence
    assert e.method == "Grad-CAM" and e.target == 1 and e.note is None
    assert e.layer == "2" and e.feature_size == (SIZE, SIZE)  # the last conv, found by running the model
    assert e.heatmap.shape == (SIZE, SIZE) and float(e.heatmap.max()) == pytest.approx(1.0)
    top_left = corner == "top-left"
    assert _quadrant_share(e.heatmap, top=top_left, left=top_left) > 0.6
    row, col = divmod(int(e.heatmap.argmax()), SIZE)
    assert (row < 6 and col < 6) if top_left else (row >= SIZE - 6 and col >= SIZE - 6)
    assert float(e.probabilities.sum()) == pytest.approx(1.0, abs=1e-5) and e.probabilities[1] > 0.5


def test_saliency_lights_the_one_pixel_a_linear_model_reads() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight[1, 1 * 64 + 2 * 8 + 5] = 4.0  # class 1 reads channel 1, pixel (2, 5)
    x = torch.zeros(1, 3, 8, 8)
    x[0, 1, 2, 5] = 1.0
    e = explain(model, x)  # no convolution: saliency, and it says so
    assert e.method == "saliency" and e.target == 1
    assert "no convolution layer" in e.note and "saliency instead of Grad-CAM" in e.note
    assert divmod(int(e.heatmap.argmax()), 8) == (2, 5)
    assert float(e.heatmap.sum()) == pytest.approx(1.0)  # nothing else matters to this model


def test_saliency_of_the_registry_mlp_and_explicit_methods() -> None:
    torch.manual_seed(0)
    mlp = build_model("mlp", 10, 1, (28, 28))
    x = torch.randn(1, 1, 28, 28)
    e = explain(mlp, x, method="gradcam")  # asked for Grad-CAM: falls back, with a note
    assert e.method == "saliency" and e.note and e.heatmap.shape == (28, 28)
    lenet = build_model("lenet", 10, 1, (28, 28))
    assert explain(lenet, x, method="saliency").method == "saliency"
    assert explain(lenet, x, target=3).target == 3
    with pytest.raises(ValueError, match="unknown method"):
        explain(lenet, x, method="lime")
    with pytest.raises(ValueError, match="one image at a time"):
        saliency(lenet, torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="ran no Conv2d"):
        grad_cam(mlp, x)


@pytest.mark.parametrize("size,layer,feature", [(64, "layer4.1.conv2", (2, 2)), (32, "layer3.1.conv2", (2, 2))])
def test_grad_cam_on_a_torchvision_resnet18_without_weights(size: int, layer: str, feature: tuple[int, int]) -> None:
    """A transfer-learning backbone: the last conv with a spatial map (layer4's maps are 1x1 at 32 px)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    for p in model.parameters():  # a frozen backbone still explains: the input carries the graph
        p.requires_grad_(False)
    e = explain(model, torch.randn(1, 3, size, size))
    assert e.method == "Grad-CAM" and e.layer == layer and e.feature_size == feature
    assert e.heatmap.shape == (size, size) and float(e.heatmap.min()) >= 0 and float(e.heatmap.max()) <= 1
    assert "layer4.1.conv2" in conv_layer_names(model) and len(conv_layer_names(model)) == 20


def test_explaining_leaves_the_model_as_it_was() -> None:
    model = build_model("lenet", 4, 3, (32, 32))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, torch.randn(1, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    hooks = [m._forward_hooks for m in model.modules()]
    assert all(not h for h in hooks)  # the recording hooks are gone
