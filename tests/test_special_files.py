"""Paths in a data folder that are not regular files (a named pipe, a link to /dev/zero, dangling and looping
links): never opened as images, so nothing hangs or reads without end; doctor, train and predict list them as
"not a regular file" and go on with the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_image_folder
from imgrec.data.imageio import NotRegularFileError, load_image, read_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes and symbolic links")

def imgrec(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)

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
    doctor = imgrec("doctor", str(data), "--json", "--workers", "0", cwd=tmp_path)
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stderr

    unreadable = {u["file"]: (u["kind"], u["reason"]) for u in json.loads(doctor.stdout)["unreadable"]}
    assert unreadable == {name: ("not-regular", why) for name, why in planted.items()}

    runs = tmp_path / "runs"
    proc = imgrec("train", "--data", str(data), "--model", "mlp", "--epochs", "1", "--threads", "1", "--device", "cpu",
                  "--workers", "0", "--project", str(runs), "--name", "r", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    skipped = {line.split("\t")[0]: line.split("\t")[2] for line in (runs / "r" / "skipped.txt").read_text().splitlines()}
    assert skipped == {str(data / name): why for name, why in planted.items()}

    predict = imgrec("predict", str(runs / "r"), str(data / "cat"), str(data / "dog" / "z.png"), cwd=tmp_path)
    assert "Traceback" not in predict.stderr, predict.stderr
    assert f"{data / 'cat' / 'x.png'}: not a regular file (a named pipe)" in predict.stdout + predict.stderr
    assert f"{data / 'dog' / 'z.png'}: not a regular file (a character device)" in predict.stdout + predict.stderr
