"""A folder of photos in the sizes cameras and the web give (500x375, 444x500, ...) and a few extreme ones
(1x4000, 4000x1), as a new user brings it: `imgrec train` through both loader paths, `predict` and `doctor` on
it, and transfer learning at 224 px with a torchvision backbone and `--weights`, then `export`. Each command ends
in time, with exit 0 and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, make_photo_folder

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
FAST = ["--threads", "1", "--device", "cpu", "--batch-size", "8", "--workers", "0"]
# (W, H): camera and web photos, portrait and landscape, and threads. At 224 px the float crop box of 444x500 once
# began at -2.8e-14 (Pillow refuses it), at 96 px that of 500x376.
SHAPES = ((500, 375), (500, 333), (444, 500), (375, 500), (1, 4000), (4000, 1), (333, 500), (500, 376))


def imgrec(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """One `imgrec` command in a subprocess; it must end in time and never print a traceback."""
    proc = subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 12 JPEGs each, every shape of SHAPES among them."""
    return make_photo_folder(tmp_path_factory.mktemp("camera") / "photos", ("cat", "dog"), per_class=12, splits=(),
                             sizes=SHAPES)


def test_photos_of_every_shape_pass_doctor_train_from_memory_and_streamed_and_predict(photos: Path,
                                                                                     tmp_path: Path) -> None:
    proc = imgrec("doctor", str(photos), "--workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing wrong with any of them
    for loader in ("memory", "stream"):
        proc = imgrec("train", "--data", str(photos), "--model", "lenet", "--image-size", "96", "--epochs", "1",
                      "--loader", loader, "--project", str(tmp_path / "runs"), "--name", loader, *FAST,
                      "--workers", "1" if loader == "stream" else "0", cwd=tmp_path)  # a DataLoader worker decodes
        assert proc.returncode == 0, proc.stderr
        assert "skipped" not in proc.stderr  # every photo decodes: none left out
    proc = imgrec("predict", str(tmp_path / "runs" / "stream"), str(photos), "--format", "csv", "--threads", "1",
                  "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 + 24  # a header and every photo


def test_transfer_learning_on_photos_at_224(photos: Path, tmp_path: Path,
                                            torchvision_file: tuple[Path, Any]) -> None:
    """The tutorial's last chapter on real-sized photos: a torchvision resnet18 from a weights file, one epoch
    for the new head, one for the whole net, at 224 px; then predict and export (checked on the photos)."""
    weights, _ = torchvision_file
    proc = imgrec("train", "--data", str(photos), "--model", "resnet18", "--weights", str(weights), "--image-size",
                  "224", "--freeze-epochs", "1", "--epochs", "2", "--project", str(tmp_path / "runs"), "--name", "tl",
                  *FAST, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy:" in proc.stdout and "skipped" not in proc.stderr
    run = tmp_path / "runs" / "tl"
    proc = imgrec("predict", str(run), str(photos), "--format", "csv", "--threads", "1", "--device", "cpu",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 + 24
    proc = imgrec("export", str(run), "--out", str(tmp_path / "tl.onnx"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tl.onnx").is_file()
