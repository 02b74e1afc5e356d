"""Hand-edited and malicious weights files: every command that loads weights ends quickly with one line (exit 1),
never an IndexError, a ValueError, an allocation that grinds on, or code run by the unpickler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import error_line
from imgrec.engine import checkpoint
from imgrec.engine.checkpoint import load_weights_file
from imgrec.errors import ImgrecError
from imgrec.export.safetensors_file import load_safetensors, save_safetensors
from imgrec.inference import Predictor
from imgrec.models.registry import build_model

CLASSES = ["cat", "dog", "fox"]


def weights(**edits: Any) -> dict[str, Any]:
    """A weights file's dict (an MLP for 3 classes of 16x16 colour images, as training writes it), then the edits."""
    torch.manual_seed(0)
    model = build_model("mlp", len(CLASSES), 3, (16, 16))
    ckpt = {"format_version": 1, "model": {"name": "mlp", "num_classes": 3, "in_channels": 3, "image_size": [16, 16]},
            "state_dict": model.state_dict(), "classes": list(CLASSES), "channels": 3, "image_size": [16, 16],
            "input_channels": 3, "input_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "data": "synthetic", "config": {"model": "mlp", "data": "synthetic"}}
    ckpt.update(edits)
    return ckpt


def run_imgrec(cwd: Path, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


EDITS = {
    "short class list": ({"classes": ["cat", "dog"]}, "names 2 classes but its model has 3 outputs"),
    "mean as text": ({"mean": "abc"}, "invalid mean ('abc'; 3 finite numbers)"),
    "huge image size": ({"image_size": [100_000, 100_000]}, "invalid image size ([100000, 100000]"),
    "zero std": ({"std": [0.25, 0.0, 0.25]}, "invalid std"),
    "two channels": ({"channels": 2, "input_channels": 2}, "invalid channel count (2; 1 or 3)"),
    "huge model input": ({"model": {"name": "mlp", "num_classes": 3, "in_channels": 3,
                                    "image_size": [50_000, 50_000]}}, "invalid model input size"),
    "nan in mean": ({"mean": [0.5, float("nan"), 0.5]}, "invalid mean"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_predict_on_hand_edited_weights_is_one_line(tmp_path: Path, image: Path, case: str) -> None:
    edits, fragment = EDITS[case]
    path = tmp_path / "edited.pt"
    torch.save(weights(**edits), path)
    result, seconds = run_imgrec(tmp_path, "predict", str(path), str(image), "--device", "cpu")
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert str(path) in line and fragment in line, line
    assert seconds < 60
    assert result.stdout == ""


def test_the_unedited_weights_predict(tmp_path: Path, image: Path) -> None:
    """The control: the same file as written, so each edit above is what is refused."""
    path = tmp_path / "good.pt"
    torch.save(weights(), path)
    result, _ = run_imgrec(tmp_path, "predict", str(path), str(image), "--device", "cpu", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["label"] in CLASSES


@pytest.mark.parametrize("command", [["evaluate"], ["export", "--format", "safetensors", "--check-images", "0"],
                                     ["serve", "--port", "8765"]])
def test_every_command_that_loads_weights_refuses_them(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "weights" / "best.pt"
    path.parent.mkdir()
    torch.save(weights(classes=["cat"]), path)
    result, _ = run_imgrec(tmp_path, command[0], str(path), *command[1:])
    assert result.returncode == 1, result.stderr
    assert "names 1 classes but its model has 3 outputs" in error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["best.pt"]  # nothing written


def test_the_safetensors_sidecar_is_checked_too(tmp_path: Path, image: Path) -> None:
    tensors, sidecar = save_safetensors(weights(), tmp_path / "model.safetensors")
    Predictor.from_checkpoint(load_safetensors(tensors), device="cpu").predict(image)  # as exported: fine
    described = json.loads(sidecar.read_text())
    described["classes"] = ["cat", "dog"]
    sidecar.write_text(json.dumps(described))
    with pytest.raises(ImgrecError, match=r"model\.json names 2 classes but its model has 3 outputs"):
        load_safetensors(tensors)
    described["classes"], described["image_size"] = list(CLASSES), [100_000, 100_000]
    sidecar.write_text(json.dumps(described))
    with pytest.raises(ImgrecError, match=r"invalid image size"):
        load_safetensors(tensors)


def test_a_dict_given_to_the_predictor_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ImgrecError, match="names 2 classes but its model has 3 outputs"):
        Predictor.from_checkpoint(weights(classes=["cat", "dog"]), source="mine", device="cpu")


# --- malicious pickles ------------------------------------------------------------------------------------------

class _Shell:
    """Unpickling this runs a shell command: what a malicious checkpoint does with os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def test_a_pickle_that_would_run_a_command_is_refused_by_name(tmp_path: Path, image: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(weights(payload=_Shell(f"touch {marker}")), path)
    assert checkpoint.code_globals(path) == [f"{os.system.__module__}.system"]  # posix.system
    result, seconds = run_imgrec(tmp_path, "predict", str(path), str(image))
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert f"{path}: refused: it would run code when loaded ({os.system.__module__}.system)" in line, line
    assert not marker.exists(), "loading the weights ran the command"
    assert seconds < 60


def test_weights_as_training_writes_them_name_no_code(tmp_path: Path) -> None:
    path = tmp_path / "good.pt"
    torch.save({**weights(), "set": {1, 2}, "parameter": torch.nn.Parameter(torch.ones(2)), "dtype": torch.bfloat16},
               path)
    assert checkpoint.code_globals(path) == []
    assert load_weights_file(path)["classes"] == CLASSES


def test_a_damaged_pickle_is_not_called_code(tmp_path: Path) -> None:
    """An unreadable pickle that names nothing torch forbids is damage, not an attack."""
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01\xff\xff")
    with pytest.raises(ImgrecError) as info:
        load_weights_file(path)
    assert "damaged" in str(info.value) and "refused" not in str(info.value)
