"""imgrec.export: ONNX parity for every model family of the registry (random weights, tiny inputs, no downloads),
the dynamic batch axis, the uint8 NHWC input against hand-normalised NCHW, the metadata, the parity rule, and the
safetensors pair (round trip, loader, refusals). The command line is tested in test_export_cli.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from imgrec.errors import ImgrecError
from imgrec.export.common import shipped_fields
from imgrec.export.onnx_file import onnx_bytes, onnx_session, read_onnx_metadata, run_onnx
from imgrec.export.runner import Parity, compare_logits, reference_logits, require_onnx_parity
from imgrec.export.safetensors_file import build_from_safetensors, load_safetensors, save_safetensors
from imgrec.models.registry import MODELS, build_model

TEMPERATURE = 1.7

# One case per family of the registry: (model, image channels, image (H, W), model input channels, input (H, W)).
# The model input differs from the image where a run feeds grey or small images to a colour backbone: the graph
# then resizes (up, or down with antialiasing) and converts channels as training did.
FAMILY_CASES = {
    "mlp grey": ("mlp", 1, (12, 12), 1, (12, 12)),
    "lenet grey": ("lenet", 1, (28, 28), 1, (28, 28)),
    "lenet colour": ("lenet", 3, (16, 16), 3, (16, 16)),
    "resnet8 (speed-run net, grey)": ("resnet8", 1, (28, 28), 1, (28, 28)),
    "speednet (speed-run net, colour)": ("speednet", 3, (32, 32), 3, (32, 32)),
    "airnet (whitening stem, colour)": ("airnet", 3, (32, 32), 3, (32, 32)),
    "airnet-small (whitening stem, grey)": ("airnet-small", 1, (28, 28), 1, (28, 28)),
    "resnet18 (BatchNorm)": ("resnet18", 3, (32, 32), 3, (32, 32)),
    "mobilenet_v3_small": ("mobilenet_v3_small", 3, (32, 32), 3, (32, 32)),
    "efficientnet_b0 (upsampled under 32 px)": ("efficientnet_b0", 3, (16, 16), 3, (16, 16)),
    "convnext_tiny (LayerNorm)": ("convnext_tiny", 3, (32, 32), 3, (32, 32)),
    "vgg16": ("vgg16", 3, (32, 32), 3, (32, 32)),
    "resnet18 from grey 20 px (resize up, 1->3 channels)": ("resnet18", 1, (20, 20), 3, (36, 36)),
    "mobilenet_v3_small from 48 px (antialiased shrink)": ("mobilenet_v3_small", 3, (48, 48), 3, (40, 40)),
}


def _family(name: str) -> str:
    return re.match(r"[a-z]+", name).group()  # type: ignore[union-attr]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that make every layer count: He-scaled convs and linears (torchvision's heads start near zero, which
    makes MobileNet's and EfficientNet's logits almost the same for every image) and BatchNorm running statistics
    and affine values far from the identity, so that eval mode (running statistics) is what gets exported."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model.eval()


def weights_of(name: str, channels: int, size: tuple[int, int], input_channels: int, input_size: tuple[int, int],
               num_classes: int = 4) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised model and a weights-file dict for it (as training writes them)."""
    torch.manual_seed(0)
    model = randomise(build_model(name, num_classes, input_channels, input_size))
    return model, {
        "model": {"name": name, "num_classes": num_classes, "in_channels": input_channels,
                  "image_size": list(input_size)},
        "state_dict": model.state_dict(), "classes": [f"class{i}" for i in range(num_classes)],
        "channels": channels, "image_size": list(size), "input_channels": input_channels,
        "input_size": list(input_size), "mean": [0.2 + 0.15 * c for c in range(input_channels)],
        "std": [0.3 + 0.1 * c for c in range(input_channels)], "temperature": TEMPERATURE, "data": "synthetic",
        "ood": {"score": "energy", "threshold": 1.25, "keep": 0.95, "split": "val", "count": 10},
    }


def random_images(n: int, channels: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W)."""
    return torch.randint(0, 256, (n, channels, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def test_the_cases_cover_every_model_family_of_the_registry() -> None:
    """A model family added to the registry fails here until a parity case covers it."""
    covered = {_family(case[0]) for case in FAMILY_CASES.values()}
    assert {_family(name) for name in MODELS} <= covered


@pytest.mark.parametrize("case", list(FAMILY_CASES), ids=list(FAMILY_CASES))
def test_onnx_matches_pytorch_at_batch_7_and_1_from_one_file(case: str) -> None:
    name, channels, size, input_channels, input_size = FAMILY_CASES[case]
    model, ckpt = weights_of(name, channels, size, input_channels, input_size)
    session = onnx_session(onnx_bytes(model, shipped_fields(ckpt)))
    batch, height, width, depth = session.get_inputs()[0].shape
    assert isinstance(batch, str) and (height, width, depth) == (*size, channels)  # a named, dynamic batch axis
    assert session.get_inputs()[0].type == "tensor(uint8)"

    images = random_images(7, channels, size)
    reference = reference_logits(model, ckpt, images)  # imgrec's own preprocessing (evaluate's), then the model
    assert np.ptp(reference, axis=0).max() > 1e-3, "the logits hardly depend on the image: the test would be void"
    logits, probabilities = run_onnx(session, nhwc(images))
    parity = compare_logits("onnxruntime", reference, logits, "random")
    assert parity.max_abs_diff < 1e-4 and parity.agreement == 1.0, parity
    single, _ = run_onnx(session, nhwc(images[:1]))
    assert single.shape == (1, 4) and np.abs(single[0] - reference[0]).max() < 1e-4
    expected = torch.softmax(torch.from_numpy(reference) / TEMPERATURE, dim=1).numpy()
    assert np.abs(probabilities - expected).max() < 1e-5


def test_uint8_nhwc_in_the_graph_equals_pytorch_on_hand_normalised_nchw() -> None:
    """A non-square image and a different mean/std per channel: a swapped axis or channel order would show."""
    model, ckpt = weights_of("lenet", 3, (12, 20), 3, (12, 20))
    ckpt["mean"], ckpt["std"] = [0.1, 0.5, 0.9], [0.2, 0.4, 0.8]
    images = random_images(5, 3, (12, 20), seed=3)
    mean = torch.tensor(ckpt["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ckpt["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((images.float() / 255 - mean) / std).numpy()  # (N, C, H, W) normalised by hand
    logits, _ = run_onnx(onnx_session(onnx_bytes(model, shipped_fields(ckpt))), nhwc(images))
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_metadata_round_trips(tmp_path: Path) -> None:
    model, ckpt = weights_of("lenet", 1, (28, 28), 1, (28, 28), num_classes=3)
    ckpt["classes"] = ["T-shirt/top", "naïve \"quoted\"", "Bag"]  # JSON must carry any class name
    data = onnx_bytes(model, shipped_fields(ckpt))
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    meta = read_onnx_metadata(str(path))
    assert meta == read_onnx_metadata(data)
    assert meta["classes"] == ckpt["classes"] and meta["model"] == "lenet" and meta["data"] == "synthetic"
    assert meta["image_size"] == [28, 28] and meta["channels"] == 1 and meta["num_classes"] == 3
    assert meta["input_size"] == [28, 28] and meta["input_channels"] == 1
    assert meta["mean"] == ckpt["mean"] and meta["std"] == ckpt["std"]
    assert meta["temperature"] == TEMPERATURE
    assert meta["ood_score"] == "energy" and meta["ood_threshold"] == 1.25
    import imgrec

    assert meta["imgrec_version"] == imgrec.__version__
    # what onnxruntime shows a consumer in any language: the same strings
    custom = onnx_session(str(path)).get_modelmeta().custom_metadata_map
    assert json.loads(custom["classes"]) == ckpt["classes"] and custom["model"] == "lenet"


def test_metadata_leaves_out_what_the_weights_lack() -> None:
    model, ckpt = weights_of("mlp", 1, (8, 8), 1, (8, 8))
    del ckpt["temperature"], ckpt["ood"]
    meta = read_onnx_metadata(onnx_bytes(model, shipped_fields(ckpt)))
    assert "temperature" not in meta and "ood_threshold" not in meta and "ood_score" not in meta


@pytest.mark.parametrize(("reference", "candidate", "diff", "agreement"), [
    ([[2.0, 1.0], [0.0, 3.0]], [[2.0, 1.0], [0.0, 3.0]], 0.0, 1.0),
    ([[2.0, 1.0], [0.0, 3.0]], [[2.0, 1.001], [0.0, 3.0]], 1e-3, 1.0),  # same classes, too far apart
    ([[1.0, 1.00001], [0.0, 3.0]], [[1.00001, 1.0], [0.0, 3.0]], 1e-5, 0.5),  # close, but one class flips
    # NaN is never close (and numpy's argmax takes it for the largest value)
    ([[1.0, 2.0], [0.0, 3.0]], [[float("nan"), 2.0], [0.0, 3.0]], math.inf, 0.5),
])
def test_compare_logits(reference: list[list[float]], candidate: list[list[float]], diff: float,
                        agreement: float) -> None:
    parity = compare_logits("x", np.array(reference, np.float32), np.array(candidate, np.float32), "val")
    assert parity.max_abs_diff == pytest.approx(diff, rel=1e-2) and parity.agreement == agreement
    if diff == 0.0:
        require_onnx_parity(parity)
    else:
        with pytest.raises(ImgrecError, match="does not match PyTorch"):
            require_onnx_parity(parity)


def test_the_parity_rule_is_strict_below_the_tolerance() -> None:
    require_onnx_parity(Parity("x", 10, "val", 9.9e-5, 1.0))
    for bad in (Parity("x", 10, "val", 1e-4, 1.0), Parity("x", 10, "val", 0.0, 0.9)):
        with pytest.raises(ImgrecError):
            require_onnx_parity(bad)


# --- safetensors --------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, ckpt = weights_of("resnet18", 3, (32, 32), 3, (32, 32))
    tensors, sidecar = save_safetensors(ckpt, tmp_path / "out" / "model.safetensors")
    assert sidecar == tmp_path / "out" / "model.json" and tensors.is_file()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind
    description = json.loads(sidecar.read_text())
    for key in ("model", "classes", "channels", "image_size", "input_channels", "input_size", "mean", "std",
                "temperature", "ood", "data"):
        assert description[key] == ckpt[key], key
    for source in (tensors, sidecar):  # either file of the pair names it
        rebuilt, loaded = build_from_safetensors(source)
        assert not rebuilt.training and loaded["classes"] == ckpt["classes"]
        images = random_images(6, 3, (32, 32))
        assert np.array_equal(reference_logits(rebuilt, loaded, images), reference_logits(model, ckpt, images))
    assert set(loaded["state_dict"]) == set(ckpt["state_dict"])  # BatchNorm's counters included


def test_a_predictor_runs_on_the_loaded_pair(tmp_path: Path) -> None:
    from imgrec.inference import Predictor

    model, ckpt = weights_of("lenet", 1, (28, 28), 1, (28, 28))
    path, _ = save_safetensors(ckpt, tmp_path / "m.safetensors")
    images = random_images(4, 1, (28, 28))
    original = Predictor.from_checkpoint(ckpt, device="cpu").predict(images)
    shipped = Predictor.from_checkpoint(load_safetensors(path), device="cpu").predict(images)
    assert [p.label for p in shipped] == [p.label for p in original]
    assert [p.probability for p in shipped] == [p.probability for p in original]


def test_a_mixed_up_or_damaged_pair_is_refused(tmp_path: Path) -> None:
    _, ckpt = weights_of("mlp", 1, (8, 8), 1, (8, 8))
    path, sidecar = save_safetensors(ckpt, tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImgrecError, match="SHA-256 differs"):
        load_safetensors(path)
    sidecar.unlink()
    with pytest.raises(ImgrecError, match=r"not found: .*a\.json"):
        load_safetensors(path)
    (tmp_path / "b.safetensors").write_bytes(b"x")
    (tmp_path / "b.json").write_text('{"kind": "something else"}')
    with pytest.raises(ImgrecError, match="not an imgrec safetensors sidecar"):
        load_safetensors(tmp_path / "b.json")
