"""Transfer learning through the `imgrec` command: --pretrained from torch's cache, --weights from a torchvision file
or an imgrec run, freezing, the feature cache, and every mistake a user can make with them.

No test downloads anything: torchvision's weights are stood in for by a randomly initialised resnet18 whose state
dict the tests save themselves, in torch's cache (TORCH_HOME points at a temporary folder) or anywhere else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from conftest import error_line, make_image_folder, run_main
from imgrec import finetune
from imgrec.cli import main
from imgrec.engine.checkpoint import load_weights_file
from imgrec.errors import ImgrecError

FAST = ["--threads", "1", "--workers", "0", "--device", "cpu", "--batch-size", "16"]
CACHE_FILE = "resnet18-f37072fd.pth"  # the file name in torchvision's ResNet18_Weights.IMAGENET1K_V1 URL
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train(data: Path, project: Path, name: str, *extra: str, capsys: pytest.CaptureFixture[str],
          caplog: pytest.LogCaptureFixture) -> tuple[Path, str]:
    """An in-process training run; returns its folder and what it logged."""
    caplog.clear()
    with caplog.at_level("INFO"):
        code, out, err = run_main(["train", "--data", str(data), "--project", str(project), "--name", name, *FAST,
                                   *extra], capsys)
    assert code == 0, err
    return project / name, caplog.text


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def assert_same_backbone(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor equal: weights and BatchNorm statistics (num_batches_tracked aside)."""
    backbone = backbone_of(state)
    keys = [k for k in reference if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert keys and all(torch.equal(backbone[k], reference[k]) for k in keys)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache: TORCH_HOME in a temporary folder."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {
        "colour": make_image_folder(root / "colour", classes=("cat", "dog", "fox"), per_class=12),
        "grey": make_image_folder(root / "grey", classes=("left", "right"), per_class=12, channels=1),
    }


@pytest.fixture(scope="module")
def source_run(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imgrec run to transfer from: resnet18 from scratch on the colour folder, one epoch."""
    project = tmp_path_factory.mktemp("source")
    code = main(["train", "--data", str(folders["colour"]), "--model", "resnet18", "--epochs", "1",
                 "--project", str(project), "--name", "src", *FAST])
    assert code == 0
    return project / "src"


# --- where the weights come from ------------------------------------------------------------------------------


def test_the_usual_recipe_from_torchs_cache(torchvision_file: tuple[Path, Any], torch_home: Path,
                                            folders: dict[str, Path], tmp_path: Path) -> None:
    """`imgrec train --model resnet18 --pretrained`, as a user runs it: the file in torch's cache, 1 frozen epoch."""
    path, reference = torchvision_file
    cached = torch_home / "hub" / "checkpoints" / CACHE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", str(folders["colour"]), "--model",
                           "resnet18", "--pretrained", "--epochs", "2", "--project", str(tmp_path / "runs"), *FAST],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy:" in proc.stdout
    # the stand-in file is not torchvision's: its hash does not match the name, which is said, not fatal
    assert f"{cached} is not the file torchvision published" in proc.stderr
    assert "frozen for 1 epoch(s)" in proc.stderr and "ResNet18_Weights.IMAGENET1K_V1" in proc.stderr
    ckpt = load_weights_file(tmp_path / "runs" / "colour-resnet18" / "weights" / "last.pt")
    assert ckpt["input_size"] == [224, 224] and ckpt["input_channels"] == 3 and ckpt["image_size"] == [16, 16]
    assert ckpt["mean"] == pytest.approx(IMAGENET_MEAN) and ckpt["std"] == pytest.approx(IMAGENET_STD)
    assert ckpt["state_dict"]["head.weight"].shape == (3, 512)
    assert ckpt["config"]["freeze_epochs"] == 1 and ckpt["config"]["pretrained"] is True
    # the second epoch trained the backbone
    assert not torch.equal(backbone_of(ckpt["state_dict"])["conv1.weight"], reference["conv1.weight"])


def test_pretrained_frozen_keeps_torchvisions_backbone(torchvision_file: tuple[Path, Any], torch_home: Path,
                                                       folders: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path, reference = torchvision_file
    cached = torch_home / "hub" / "checkpoints" / CACHE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    run, _ = train(folders["grey"], tmp_path, "frozen", "--model", "resnet18", "--pretrained", "--freeze",
                   "--epochs", "1", capsys=capsys, caplog=caplog)
    ckpt = load_weights_file(run / "weights" / "best.pt")
    assert_same_backbone(ckpt["state_dict"], reference)
    # grey images, colour weights: decoded as 1 channel, fed as 3 (the channel repeated)
    assert ckpt["channels"] == 1 and ckpt["input_channels"] == 3 and ckpt["model"]["in_channels"] == 3
    summary = json.loads((run / "summary.json").read_text())
    code, out, err = run_main(["evaluate", str(run)], capsys)
    assert code == 0, err
    assert f"test accuracy: {summary['test_accuracy']:.2%}" in out


def test_a_torchvision_file_through_weights(torchvision_file: tuple[Path, Any], torch_home: Path,
                                            folders: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    path, reference = torchvision_file
    run, log = train(folders["colour"], tmp_path, "tvfile", "--model", "resnet18", "--weights", str(path), "--freeze",
                     "--epochs", "1", capsys=capsys, caplog=caplog)
    assert f"weights from {path}" in log
    assert "not the file torchvision published" not in log  # only files in torch's cache are checked by name
    ckpt = load_weights_file(run / "weights" / "best.pt")
    assert_same_backbone(ckpt["state_dict"], reference)
    assert ckpt["input_size"] == [224, 224] and ckpt["mean"] == pytest.approx(IMAGENET_MEAN)
    assert not (torch_home / "hub").exists()  # nothing was looked up or written in torch's cache


def test_missing_pretrained_file_names_where_to_put_it(torch_home: Path, folders: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["train", "--data", str(folders["colour"]), "--model", "resnet18", "--pretrained",
                               "--project", str(tmp_path / "runs"), *FAST], capsys)
    assert code == 1
    line = error_line(err)
    expected = torch_home / "hub" / "checkpoints" / CACHE_FILE
    assert f"put {CACHE_FILE} from https://download.pytorch.org/models/{CACHE_FILE} at {expected}" in line
    assert "--download" in line
    assert not (tmp_path / "runs").exists()  # refused before any data was loaded or run folder made


def test_download_goes_through_torch_hub_with_the_hash_checked(torch_home: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    state = torchvision.models.resnet18().state_dict()

    def fake(url: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls.append({"url": url, **kwargs})
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    source = finetune.pretrained_source("resnet18", download=True)
    assert source.state is state and source.input.size == (224, 224)
    (call,) = calls
    assert call["url"] == f"https://download.pytorch.org/models/{CACHE_FILE}"
    assert call["check_hash"] is True and call["weights_only"] is True
    assert Path(call["model_dir"]) / call["file_name"] == torch_home / "hub" / "checkpoints" / CACHE_FILE


def test_a_failed_download_is_one_line(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, **kwargs: Any) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ImgrecError) as info:
        finetune.pretrained_source("mobilenet_v3_small", download=True)
    message = str(info.value)
    assert "\n" not in message and "name resolution" in message
    assert str(torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth") in message


def test_a_file_whose_hash_matches_its_name_loads_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, path)
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    with caplog.at_level("WARNING"):
        finetune._check_hash(path, prefix)
        assert not caplog.records
        finetune._check_hash(path, "00000000" if prefix != "00000000" else "11111111")
        assert "not the file torchvision published" in caplog.text


# --- transfer from an imgrec run -------------------------------------------------------------------------------


def test_transfer_from_an_imgrec_run(source_run: Path, folders: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Pretrain on one data set, transfer to another: frozen keeps the source's backbone, unfrozen trains it."""
    source = load_weights_file(source_run / "weights" / "best.pt")
    reference = backbone_of(source["state_dict"])
    run, log = train(folders["grey"], tmp_path, "frozen", "--model", "resnet18", "--weights", str(source_run),
                     "--freeze", "--epochs", "2", capsys=capsys, caplog=caplog)
    assert f"weights from {source_run / 'weights' / 'best.pt'}" in log
    assert "grey images repeated to 3 channels" in log
    frozen = load_weights_file(run / "weights" / "last.pt")
    assert all(torch.equal(backbone_of(frozen["state_dict"])[k], v) for k, v in reference.items())
    # the source run's preprocessing travels with its features
    assert frozen["mean"] == source["mean"] and frozen["std"] == source["std"]
    assert frozen["input_size"] == source["input_size"] and frozen["input_channels"] == 3
    assert frozen["classes"] == ["left", "right"] and frozen["state_dict"]["head.weight"].shape == (2, 512)

    run, _ = train(folders["grey"], tmp_path, "unfrozen", "--model", "resnet18", "--weights",
                   str(source_run / "weights" / "best.pt"), "--freeze-epochs", "1", "--epochs", "2",
                   capsys=capsys, caplog=caplog)
    unfrozen = backbone_of(load_weights_file(run / "weights" / "last.pt")["state_dict"])
    assert not torch.equal(unfrozen["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    assert not torch.equal(unfrozen["bn1.running_mean"], reference["bn1.running_mean"])
    code, out, err = run_main(["evaluate", str(run)], capsys)
    assert code == 0, err
    assert "test accuracy:" in out


def test_the_feature_cache_trains_the_same_head(source_run: Path, folders: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """--cache-features computes the features once; the head it trains is the one training through the backbone
    gives (same seed, --freeze, no augmentation), and the weights files still hold the whole model."""
    args = ["--model", "resnet18", "--weights", str(source_run), "--freeze", "--epochs", "3", "--seed", "5"]
    plain, _ = train(folders["colour"], tmp_path, "plain", *args, "--augment", "none", capsys=capsys, caplog=caplog)
    cached, log = train(folders["colour"], tmp_path, "cached", *args, "--cache-features", capsys=capsys, caplog=caplog)
    assert "feature cache:" in log and "without augmentation" in log
    a = load_weights_file(plain / "weights" / "last.pt")["state_dict"]
    b = load_weights_file(cached / "weights" / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in b)
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))
    summaries = [json.loads((run / "summary.json").read_text()) for run in (plain, cached)]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    code, out, err = run_main(["evaluate", str(cached)], capsys)
    assert code == 0, err
    assert f"test accuracy: {summaries[1]['test_accuracy']:.2%}" in out


# --- the models list and bad input ----------------------------------------------------------------------------


def test_models_lists_the_backbones_and_their_weights(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["models"], capsys)
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln.strip()}
    for name in ("resnet18", "resnet50", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "convnext_tiny"):
        assert "ImageNet" in lines[name], name
    assert "ImageNet" not in lines["lenet"]
    # torchvision's 11,689,512 minus its 1000-class fc, plus a 10-class head
    assert f"{11_689_512 - 513_000 + 5_130:,}" in lines["resnet18"]


def _one_class(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "oneclass", classes=("cat",))


def _empty_class(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "emptyclass", classes=("cat", "dog"))
    (root / "emu").mkdir()
    return root


def _foreign_file(tmp_path: Path) -> Path:
    path = tmp_path / "mnet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return path


def _not_weights(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pt"
    torch.save({"epochs": 3, "note": "hello"}, path)
    return path


@pytest.mark.parametrize(
    "argv,code,fragments",
    [
        (["--model", "lenet", "--pretrained"], 2, ["--pretrained: model 'lenet' has no pretrained weights",
                                                   "resnet18"]),
        (["--model", "mlp", "--weights", "x.pt"], 2, ["--weights: model 'mlp' has no backbone"]),
        (["--model", "resnet18", "--pretrained", "--weights", "x.pt"], 2, ["--pretrained or --weights, not both"]),
        (["--model", "resnet18", "--freeze"], 2, ["need --pretrained or --weights"]),
        (["--model", "resnet18", "--freeze-epochs", "2"], 2, ["need --pretrained or --weights"]),
        (["--model", "resnet18", "--weights", "x.pt", "--cache-features"], 2, ["--cache-features needs --freeze"]),
        (["--model", "resnet18", "--weights", "x.pt", "--freeze", "--cache-features", "--augment", "flip"], 2,
         ["cannot be augmented"]),
        (["--model", "resnet18", "--weights", "x.pt", "--lr-backbone-mult", "0"], 2, ["--lr-backbone-mult"]),
        (["--model", "resnet18", "--weights", "x.pt", "--freeze-epochs", "-1"], 2, ["--freeze-epochs"]),
        (["--model", "resnet18", "--weights", "{tmp}/nosuch.pt"], 1, ["no such run folder or weights file",
                                                                      "{tmp}/nosuch.pt"]),
        (["--model", "resnet18", "--weights", "{foreign}"], 1, ["{foreign} does not hold resnet18 weights",
                                                                "--model mobilenet_v3_small"]),
        (["--model", "mobilenet_v3_small", "--weights", "{source_run}"], 1, ["holds resnet18 weights, not "
                                                                             "mobilenet_v3_small"]),
        (["--model", "resnet18", "--weights", "{not_weights}"], 1, ["neither an imgrec weights file nor a "
                                                                    "torchvision state dict"]),
        (["--model", "resnet18", "--data", "{one_class}"], 1, ["only one class folder", "at least two"]),
        (["--model", "resnet18", "--data", "{empty_class}"], 1, ["{empty_class}/emu", "has no images"]),
    ],
)
def test_bad_transfer_input_is_one_line(argv: list[str], code: int, fragments: list[str], tmp_path: Path,
                                        source_run: Path, folders: dict[str, Path], torch_home: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    places = {"tmp": str(tmp_path), "source_run": str(source_run)}
    makers = {"one_class": _one_class, "empty_class": _empty_class, "foreign": _foreign_file,
              "not_weights": _not_weights}
    for key, make in makers.items():
        if any("{" + key + "}" in a for a in argv):
            places[key] = str(make(tmp_path))
    argv = [a.format(**places) for a in argv]
    data = [] if "--data" in argv else ["--data", str(folders["colour"])]
    got, out, err = run_main(["train", *data, *argv, "--project", str(tmp_path / "runs"), *FAST], capsys)
    assert got == code, err
    line = error_line(err)
    for fragment in fragments:
        assert fragment.format(**places) in line, line
    assert "test accuracy" not in out
