"""The speed-run nets: their architecture, and bf16 autocast training that learns a small problem made here.
(Shapes, gradients and channels-last for every size are covered with the other own models in test_models.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import class_image
from imgrec.models.registry import build_model
from imgrec.models.speednet import BIAS_LR_SCALE, HEAD_SCALE, SpeedNet, WhitenedNet


@pytest.mark.parametrize("name,channels,size,widths", [("resnet8", 1, (28, 28), [16, 32, 32, 64, 64, 128, 128]),
                                                       ("speednet", 3, (32, 32), [32, 64, 64, 192, 192, 256, 256])])
def test_architecture(name: str, channels: int, size: tuple[int, int], widths: list[int]) -> None:
    model = build_model(name, 10, channels, size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths and convs[0].in_channels == channels
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)  # BatchNorm follows every conv
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3  # 32 -> 16 -> 8 -> 4 (28 -> 14 -> 7 -> 3)
    assert isinstance(model, SpeedNet) and model.head.bias is None and model.head.out_features == 10


def test_the_residual_adds_its_input_and_the_head_is_scaled() -> None:
    model = SpeedNet(4, 1, (8, 8), stem=8, widths=(8,)).eval()
    residual = model.features[-1][-1]
    for p in residual.body.parameters():  # a residual branch of all zeros (BN bias 0, weight 0) passes x through
        nn.init.zeros_(p)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(residual(x), x + nn.functional.gelu(torch.zeros_like(x)))
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        features = torch.amax(model.features(images), dim=(2, 3))  # global max-pool
        torch.testing.assert_close(model(images), model.head(features) * HEAD_SCALE)
    assert HEAD_SCALE < 1


def test_pooling_stops_before_the_map_vanishes() -> None:
    model = SpeedNet(3, 3, (3, 3), stem=4, widths=(4, 4, 4))
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1  # 3 -> 1, then no more
    assert model(torch.randn(2, 3, 3, 3)).shape == (2, 3)


@pytest.mark.parametrize("name,channels", [("resnet8", 1), ("speednet", 3), ("airnet", 3)])
def test_bf16_autocast_training_learns_a_small_problem(name: str, channels: int) -> None:
    torch.manual_seed(0)
    num_classes, size = 4, 16
    images = np.stack([class_image(i % num_classes, num_classes, size, channels, seed=i) for i in range(32)])
    x = torch.from_numpy(images).float().div(255)
    x = (x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    y = torch.arange(32) % num_classes
    model = build_model(name, num_classes, channels, (size, size)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        assert logits.dtype == torch.bfloat16  # the convs and the head really ran in bf16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).float().mean() == 1.0


def test_the_whitened_net_has_airbench_shape() -> None:
    model = build_model("airnet", 10, 3, (32, 32))
    assert isinstance(model, WhitenedNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 64, 64, 256, 256, 256, 256]
    assert convs[0].kernel_size == (2, 2) and convs[0].padding == (0, 0) and not convs[0].weight.requires_grad
    assert convs[0].bias is not None and convs[0].bias.requires_grad  # the stem's shift trains, its filters do not
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3  # 31 -> 15 -> 7 -> 3
    assert model.head.bias is None and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_block_convs_start_as_the_identity_on_their_inputs() -> None:
    model = build_model("airnet", 10, 3, (32, 32))
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]  # 24 -> 64
    x = torch.randn(2, 24, 9, 9)
    with torch.no_grad():
        out = conv(x)
    torch.testing.assert_close(out[:, :24], x)  # dirac filters pass their input channel through


@pytest.mark.parametrize("channels", [1, 3])
def test_the_stem_whitens_the_patches_of_the_images_it_was_fitted_to(channels: int) -> None:
    torch.manual_seed(0)
    # correlated pixels and channels: smooth random images, channels mixed
    base = nn.functional.avg_pool2d(torch.randn(400, channels, 20, 20), 3, stride=1, padding=1) * 3 + 0.5
    images = base + 0.3 * base.mean(dim=1, keepdim=True)
    model = WhitenedNet(4, channels, (20, 20), widths=(8,))
    model.init_from_images(images)
    with torch.no_grad():
        out = model.whiten(images)  # (N, 2 * C * 4, 19, 19)
    half = out[:, : channels * 4].permute(0, 2, 3, 1).reshape(-1, channels * 4).double()
    covariance = half.T @ half / len(half)
    # unit variance along every eigen-direction (up to the eps that keeps tiny eigenvalues finite), no correlation
    torch.testing.assert_close(covariance, torch.eye(channels * 4, dtype=torch.float64), atol=0.02, rtol=0.02)
    torch.testing.assert_close(out[:, channels * 4 :], -out[:, : channels * 4])  # and their negatives
    assert (model.whiten.bias == 0).all()


def test_the_batchnorm_shifts_train_faster_with_the_same_decay_per_step() -> None:
    from imgrec.config import RunConfig
    from imgrec.engine.trainer import parameter_groups

    model = build_model("airnet", 10, 3, (32, 32))
    groups = parameter_groups(model, RunConfig(lr=0.4, weight_decay=1e-3))
    rest, fast = groups
    assert fast["lr"] == pytest.approx(0.4 * BIAS_LR_SCALE) and fast["weight_decay"] == pytest.approx(1e-3 / BIAS_LR_SCALE)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in fast["params"]} == {id(n.bias) for n in norms}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} | {id(p) for p in fast["params"]} == trainable
    assert not {id(p) for p in rest["params"]} & {id(p) for p in fast["params"]}
