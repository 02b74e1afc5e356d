"""TransferModel and the torchvision backbones: new heads, freezing (parameters and BatchNorm statistics), learning-rate
groups, and loading torchvision's and imgrec's weights into the backbone.

Backbones are built without weights and fed small inputs (32x32 and less); shape-only checks build on the meta
device, so even VGG-16 costs nothing there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from imgrec.config import TRANSFER_MODELS, RunConfig
from imgrec.data.info import ArraySplit
from imgrec.data.loaders import TensorLoader
from imgrec.data.transforms import BatchTransform
from imgrec.engine.trainer import build_scheduler, fit
from imgrec.errors import ImgrecError
from imgrec.models.backbones import BACKBONES, check_backbone_state, guess_backbone, pretrained_weights
from imgrec.models.registry import MODELS, build_model, count_parameters
from imgrec.models.transfer import TransferModel, backbone_state_of, load_backbone_state, state_mismatch

BACKBONE_NAMES = list(BACKBONES)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _meta_model(name: str, num_classes: int = 5, channels: int = 3) -> TransferModel:
    with torch.device("meta"):
        model = build_model(name, num_classes, channels, (32, 32))
    assert isinstance(model, TransferModel)
    return model


def _backbone_snapshot(model: TransferModel) -> dict[str, torch.Tensor]:
    """Every backbone tensor: parameters and buffers (BatchNorm running statistics included)."""
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def _bn_buffers(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


# --- registry --------------------------------------------------------------------------------------------------


def test_config_and_registry_name_the_same_backbones() -> None:
    assert tuple(BACKBONES) == TRANSFER_MODELS
    assert [n for n, e in MODELS.items() if e.pretrained] == list(TRANSFER_MODELS)
    assert {"resnet18", "resnet50", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
            "convnext_tiny"} <= set(MODELS)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_pretrained_weights_come_from_torchvisions_enum(name: str) -> None:
    spec = pretrained_weights(name)
    default = torchvision.models.get_model_weights(name).DEFAULT
    assert spec.url == default.url and spec.url.endswith("/" + spec.file_name)
    assert spec.hash_prefix and len(spec.hash_prefix) >= 8 and spec.file_name.endswith(f"-{spec.hash_prefix}.pth")
    assert spec.input_size == (224, 224) and spec.channels == 3
    assert spec.mean == pytest.approx([0.485, 0.456, 0.406]) and spec.std == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_torchvision_state_dicts_fit_the_backbone(name: str) -> None:
    """A state dict of torchvision's own network (what its weights files hold) loads into the backbone, bar the head."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(name).state_dict()
    model = _meta_model(name)
    head = BACKBONES[name].head
    assert f"{head}.weight" in reference  # the head path names torchvision's classifier
    assert state_mismatch(model.backbone.state_dict(), backbone_state_of(reference, head)) is None
    assert guess_backbone(reference) == name


# --- new heads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONE_NAMES)
@pytest.mark.parametrize("num_classes", [2, 37])
def test_new_head_for_the_class_count(name: str, num_classes: int) -> None:
    model = build_model(name, num_classes, 3, (32, 32)).eval()
    assert isinstance(model, TransferModel) and isinstance(model.head, nn.Linear)
    assert model.head.out_features == num_classes
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()
    # the classifier torchvision had is gone from the backbone: it yields the head's input
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, model.head.in_features)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (8, 8)), (1, (5, 7)), (3, (64, 48))])
def test_any_channels_and_size(name: str, channels: int, size: tuple[int, int]) -> None:
    """Grey images get a 1-channel first conv; inputs under 32 px are upsampled inside the model."""
    model = build_model(name, 4, channels, size).train()
    x = torch.randn(3, channels, *size)
    assert model(x).shape == (3, 4)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels


@pytest.mark.parametrize("name", ["vgg16", "convnext_tiny"])
def test_backbones_that_need_32_px_take_smaller_inputs(name: str) -> None:
    model = build_model(name, 3, 3, (8, 8)).eval()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_channels_last_gives_the_same_logits() -> None:
    model = build_model("resnet18", 3, 3, (32, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- freezing ---------------------------------------------------------------------------------------------------


def _steps(model: nn.Module, steps: int = 3, lr: float = 0.01) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_set_frozen_stops_gradients_and_keeps_batchnorm_in_eval_mode() -> None:
    model = build_model("resnet18", 3, 3, (32, 32))
    model.set_frozen(True)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert count_parameters(model) == 512 * 3 + 3
    model.train()  # what the trainer calls: the frozen backbone must stay in eval mode
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    model.set_frozen(False)
    assert all(m.training for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_frozen_backbone_keeps_weights_and_batchnorm_statistics() -> None:
    model = build_model("resnet18", 3, 3, (32, 32))
    before, head_before = _backbone_snapshot(model), model.head.weight.detach().clone()
    model.set_frozen(True)
    _steps(model)
    after = _backbone_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.head.weight, head_before)  # the head did learn
    model.set_frozen(False)
    _steps(model)
    unfrozen = _backbone_snapshot(model)
    assert not torch.equal(unfrozen["conv1.weight"], before["conv1.weight"])
    assert all(not torch.equal(unfrozen[k], before[k]) for k in _bn_buffers(before))


def _tiny_loader(n: int = 24, size: int = 32) -> TensorLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 3
    return TensorLoader(ArraySplit(images, labels), 8, BatchTransform([0.5] * 3, [0.25] * 3), shuffle=True)


def _fit(tmp_path: Path, epochs: int, **options: Any) -> tuple[TransferModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 3, (32, 32))
    before = _backbone_snapshot(model)
    cfg = RunConfig(model="resnet18", weights="source.pt", epochs=epochs, device="cpu", **options)
    tmp_path.mkdir()
    fit(model, _tiny_loader(), None, cfg, tmp_path, {})
    return model, before


def test_fit_freezes_the_first_epochs_then_unfreezes(tmp_path: Path) -> None:
    """Through the trainer: one frozen epoch changes no backbone tensor; the next changes weights and BN statistics."""
    model, before = _fit(tmp_path / "a", epochs=1, freeze_epochs=1)
    after = _backbone_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    model, before = _fit(tmp_path / "b", epochs=2, freeze_epochs=1)
    after = _backbone_snapshot(model)
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert all(not torch.equal(after[k], before[k]) for k in _bn_buffers(before))
    assert not model.frozen and all(p.requires_grad for p in model.parameters())


def test_fit_with_freeze_never_unfreezes(tmp_path: Path) -> None:
    model, before = _fit(tmp_path / "run", epochs=2, freeze=True)
    after = _backbone_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- learning-rate groups ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_parameter_groups_cover_every_parameter_once(name: str) -> None:
    model = _meta_model(name)
    groups = model.parameter_groups(1e-3, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-3
    rates = [g["lr"] for g in groups[1:]]  # earliest blocks first
    assert len(rates) == 4
    assert rates[0] == pytest.approx(1e-4) and rates == sorted(rates) and rates[-1] < 1e-3


def test_the_earliest_layers_get_the_lowest_rate() -> None:
    model = build_model("resnet18", 3, 3, (32, 32))
    groups = model.parameter_groups(0.01, 0.2)
    rate_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert rate_of[id(model.backbone.conv1.weight)] == pytest.approx(0.002)
    assert rate_of[id(model.backbone.layer4[1].conv2.weight)] > rate_of[id(model.backbone.layer2[0].conv1.weight)]
    assert rate_of[id(model.head.weight)] == 0.01
    assert {g["lr"] for g in model.parameter_groups(0.01, 1.0)} == {0.01}


def test_onecycle_keeps_each_groups_rate() -> None:
    model = build_model("mobilenet_v3_small", 3, 3, (32, 32))
    optimizer = torch.optim.SGD(model.parameter_groups(0.1, 0.1), lr=0.1)
    cfg = RunConfig(model="mobilenet_v3_small", schedule="onecycle", lr=0.1, weights="w.pt")
    scheduler = build_scheduler(cfg, optimizer, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates[1] / rates[0] == pytest.approx(0.1)  # the earliest blocks stay at 0.1x the head's rate


# --- loading weights into the backbone ---------------------------------------------------------------------------


def test_a_torchvision_state_dict_loads_into_the_backbone_only() -> None:
    reference = torchvision.models.resnet18(num_classes=1000).state_dict()
    model = build_model("resnet18", 7, 3, (32, 32))
    head_before = model.head.weight.detach().clone()
    load_backbone_state(model, reference, "ref.pth")
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in own)
    assert torch.equal(model.head.weight, head_before) and model.head.out_features == 7


def test_an_imgrec_state_dict_loads_into_the_backbone_only() -> None:
    source = build_model("resnet18", 10, 3, (32, 32))
    target = build_model("resnet18", 2, 3, (32, 32))
    load_backbone_state(target, source.state_dict(), "runs/x/weights/best.pt")
    assert all(torch.equal(target.backbone.state_dict()[k], v) for k, v in source.backbone.state_dict().items())
    assert target.head.out_features == 2


def test_files_saved_before_num_batches_tracked_still_load() -> None:
    reference = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    load_backbone_state(build_model("resnet18", 3, 3, (32, 32)), reference, "old.pth")


def test_weights_of_another_architecture_are_a_one_line_error() -> None:
    other = torchvision.models.mobilenet_v3_small().state_dict()
    model = build_model("resnet18", 3, 3, (32, 32))
    with pytest.raises(ImgrecError) as info:
        check_backbone_state("resnet18", model, other, "mnet.pth")
    message = str(info.value)
    assert "\n" not in message
    assert "mnet.pth does not hold resnet18 weights" in message and "--model mobilenet_v3_small" in message
    with pytest.raises(ImgrecError, match="do not fit this backbone"):
        load_backbone_state(model, other, "mnet.pth")


def test_a_grey_imgrec_backbone_is_recognised() -> None:
    grey = build_model("resnet18", 3, 1, (28, 28)).state_dict()
    assert guess_backbone(grey) == "resnet18"
    assert guess_backbone({"x": torch.zeros(2)}) is None
