"""Paths in a data folder that are not regular files (a named pipe, a link to /dev/zero, dangling and looping
links): never opened as images, so nothing hangs or reads without end; doctor, train and predict list them as
"not a regular file" and go on with the rest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BAD_KINDS, REPO, make_image_folder, write_bad_file
from imgrec.data.doctor import inspect_file
from imgrec.data.imageio import ImageDecodeError, NotRegularFileError, load_image, read_file
from imgrec.data.info import FileSplit
from imgrec.data.verify import CheckedFileDataset

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symbolic links")

def imgrec(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)

def escaped(path: Path) -> str:
    return str(path).replace("\n", "\\n")


def plant_special(folder: Path) -> dict[str, str]:
    """A named pipe, a link to /dev/zero, a dangling and a looping link among the images; name -> why."""
    os.mkfifo(folder / "cat" / "x.png")
    (folder / "dog" / "z.png").symlink_to("/dev/zero")
    (folder / "fox" / "gone.png").symlink_to(folder / "fox" / "nowhere.png")
    (folder / "fox" / "loop.png").symlink_to(folder / "fox" / "loop.png")
    return {"cat/x.png": "not a regular file (a named pipe)", "dog/z.png": "not a regular file (a character device)",
            "fox/gone.png": "not a regular file (a symbolic link to nothing)",
            "fox/loop.png": "not a regular file (a loop of symbolic links)"}

def test_read_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    planted = plant_special(make_image_folder(tmp_path / "data", per_class=1))
    for name, why in planted.items():
        start = time.monotonic()
        with pytest.raises(NotRegularFileError) as info:
            load_image(tmp_path / "data" / name, 3)
        assert time.monotonic() - start < 5
        assert str(info.value) == f"{tmp_path / 'data' / name}: {why}" and info.value.reason == why
    link = tmp_path / "data" / "cat" / "link.png"
    link.symlink_to(tmp_path / "data" / "cat" / "000.png")  # a link to a regular file is read like the file
    assert read_file(link) == (tmp_path / "data" / "cat" / "000.png").read_bytes()

def test_doctor_train_and_predict_skip_special_files(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6, size=12)
    planted = plant_special(data)
    (data / "cat" / "odd\nname.png").write_text("not a picture")  # a newline in a name must not split a row
    planted["cat/odd\nname.png"] = "not an image file imgrec can read"
    shutil.copy(data / "dog" / "000.png", data / "dog" / "new\nline.png")
    doctor = imgrec("doctor", str(data), "--json", "--workers", "0", cwd=tmp_path)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stderr
    unreadable = {u["file"]: (u["kind"], u["reason"]) for u in json.loads(doctor.stdout)["unreadable"]}
    assert unreadable == {name: ("not-an-image" if "odd" in name else "not-regular", why)
                          for name, why in planted.items()}
    text = imgrec("doctor", str(data), "--workers", "0", cwd=tmp_path).stdout
    assert "  cat/odd\\nname.png [" in text and "odd\nname" not in text

    runs = tmp_path / "runs"
    proc = imgrec("train", "--data", str(data), "--model", "mlp", "--epochs", "1", "--threads", "1", "--device", "cpu",
                  "--workers", "0", "--project", str(runs), "--name", "r", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = [line.split("\t") for line in (runs / "r" / "skipped.txt").read_text().splitlines()]
    assert all(len(row) == 3 for row in rows)
    assert {row[0]: row[2] for row in rows} == {escaped(data / name): why for name, why in planted.items()}
    assert f"{data / 'cat' / 'odd'}\\nname.png (" in proc.stderr  # the warning, one line per file

    predict = imgrec("predict", str(runs / "r"), str(data / "cat"), str(data / "dog"), str(data / "fox" / "gone.png"),
                     cwd=tmp_path)
    assert predict.returncode == 1 and "Traceback" not in predict.stderr, predict.stderr
    for name, why in planted.items():
        if not name.startswith("fox/loop"):
            assert f"{escaped(data / name)}: {why}" in predict.stderr
    table = predict.stdout.splitlines()
    assert len(table) == 1 + 6 + 7 and any("new\\nline.png" in row for row in table)  # header, cats, dogs


def test_one_reason_per_kind_of_bad_file(tmp_path: Path) -> None:
    """doctor, training's decoding pass (skipped.txt) and predict (load_image's error) word each file alike."""
    files = {kind: write_bad_file(tmp_path / f"{kind}.png", kind) for kind in BAD_KINDS}
    files["not-regular"] = tmp_path / "pipe.png"
    os.mkfifo(files["not-regular"])
    split = FileSplit([str(p) for p in files.values()], torch.zeros(len(files), dtype=torch.int64), 3, (8, 8))
    checked = CheckedFileDataset(split)
    expected = {"zero-byte": "empty file (0 bytes)", "not-an-image": "not an image file imgrec can read",
                "not-regular": "not a regular file (a named pipe)"}
    for i, (kind, path) in enumerate(files.items()):
        facts = inspect_file(str(path))
        with pytest.raises(ImageDecodeError) as info:
            load_image(path, 3)
        assert facts["problem"] == kind
        assert facts["reason"] == checked[i][1] == info.value.reason and str(info.value) == f"{path}: {facts['reason']}"
        assert facts["reason"] == expected.get(kind, facts["reason"])
