"""Bad files in a data folder: training skips them with one warning naming each, records them in the run
folder, and otherwise trains exactly as it would on the folder without them; --strict refuses instead."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, make_photo_folder, write_bad_file

KINDS = ("zero-byte", "truncated", "not-an-image", "too-large")  # a text file named .jpg; a bomb PNG header
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
FAST = ["--threads", "1", "--device", "cpu", "--batch-size", "16"]


def train(data: Path, project: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["train", "--data", str(data), "--model", "lenet", "--project", str(project), "--name", name, *FAST, *extra]
    return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=project.parent, env=ENV, capture_output=True,
                          text=True, timeout=900)


def plant(root: Path, count: int, seed: int) -> dict[Path, str]:
    """Replace count randomly chosen images with bad files, each kind in turn; returns path -> kind."""
    files = sorted(p for p in root.rglob("*.jpg"))
    chosen = random.Random(seed).sample(files, count)
    planted = {}
    for i, path in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        write_bad_file(path, kind)
        planted[path] = kind
    return planted


def without(source: Path, target: Path, bad: dict[Path, str]) -> Path:
    """A copy of source without the bad files (the folder training should behave as if it had)."""
    shutil.copytree(source, target)
    for path in bad:
        (target / path.relative_to(source)).unlink()
    return target


def rows(run: Path) -> list[list[str]]:
    with (run / "results.csv").open(newline="") as f:
        return [r[:-1] for r in csv.reader(f)]


def check_bad_run(proc: subprocess.CompletedProcess[str], run: Path, bad: dict[Path, str]) -> None:
    """Completed; one warning naming every bad file exactly once; skipped.txt and split.csv list them."""
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: skipped") == 1
    assert f"warning: skipped {len(bad)} files that do not decode" in proc.stderr
    for path in bad:
        assert proc.stderr.count(str(path)) == 1, path
    skipped = {line.split("\t")[0] for line in (run / "skipped.txt").read_text().splitlines()}
    assert skipped == {str(p) for p in bad}
    with (run / "split.csv").open(newline="") as f:
        marked = {r["file"] for r in csv.DictReader(f) if r["skipped"]}
    assert len(marked) == len(bad)


def test_bad_files_are_skipped_and_change_nothing_else(tmp_path: Path) -> None:
    clean = make_photo_folder(tmp_path / "clean", per_class=12, splits=("train", "val", "test"))
    bad_folder = Path(shutil.copytree(clean, tmp_path / "bad"))
    bad = plant(bad_folder, count=8, seed=0)
    expected = without(clean, tmp_path / "expected", {clean / p.relative_to(bad_folder): k for p, k in bad.items()})
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = train(bad_folder, runs, "bad", "--epochs", "2", "--workers", "2")
    check_bad_run(proc, runs / "bad", bad)
    reference = train(expected, runs, "expected", "--epochs", "2", "--workers", "0")
    assert reference.returncode == 0, reference.stderr
    assert rows(runs / "bad") == rows(runs / "expected")
    accuracy = [json.loads((runs / r / "summary.json").read_text())["test_accuracy"] for r in ("bad", "expected")]
    assert accuracy[0] == accuracy[1]
    strict = train(bad_folder, runs, "strict", "--epochs", "1", "--strict", "--workers", "0")
    assert strict.returncode == 1
    [line] = strict.stderr.strip().splitlines()
    assert line.startswith("imgrec train: error: 8 files do not decode (--strict): ")
    assert all(str(p) in line for p in list(bad)[:8])
    assert not (runs / "strict").exists()  # refused before any run folder is made


def _cifar_subset(archive: Path, target: Path) -> Path:
    """2 classes of the CIFAR-10 JPEG archive: train 120 + val 30 per class (from its train/), test 500 per class."""
    wanted = {}
    for cls in ("airplane", "automobile"):
        for i in range(150):
            wanted[f"cifar10/train/{cls}/{i:04d}.jpg"] = target / ("train" if i < 120 else "val") / cls / f"{i:04d}.jpg"
        for i in range(500):
            wanted[f"cifar10/test/{cls}/{i:04d}.jpg"] = target / "test" / cls / f"{i:04d}.jpg"
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.name in wanted:
                dest = wanted.pop(member.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(member).read())  # type: ignore[union-attr]
            if not wanted:
                break
    assert not wanted, f"missing from the archive: {sorted(wanted)[:3]}"
    return target


@pytest.mark.slow
def test_cifar10_folder_with_bad_files_trains_like_the_clean_one(shared_data: Path, tmp_path: Path) -> None:
    """1,300 real JPEGs, 5% of them (65) replaced by bad files of each kind in turn: training completes, names each
    bad file once, and trains exactly as on the clean folder without those files: the same test split, the same
    results.csv, the same test accuracy (0 points apart). (Against the full clean folder the runs differ by the
    noise of a reshuffled data order, which 240 training images make several points wide.)"""
    clean = _cifar_subset(shared_data / "cifar10-jpeg.tar.gz", tmp_path / "clean")
    bad_folder = Path(shutil.copytree(clean, tmp_path / "bad"))
    bad = plant(bad_folder, count=65, seed=1)
    assert set(bad.values()) == set(KINDS)
    expected = without(clean, tmp_path / "expected", {clean / p.relative_to(bad_folder): k for p, k in bad.items()})
    runs = tmp_path / "runs"
    runs.mkdir()
    settings = ["--epochs", "6", "--workers", "2", "--lr", "0.002"]
    check_bad_run(train(bad_folder, runs, "bad", *settings), runs / "bad", bad)
    proc = train(expected, runs, "expected", *settings)
    assert proc.returncode == 0, proc.stderr
    assert rows(runs / "bad") == rows(runs / "expected")
    summary = {r: json.loads((runs / r / "summary.json").read_text()) for r in ("bad", "expected")}
    assert summary["bad"]["test_accuracy"] == summary["expected"]["test_accuracy"]
    assert summary["bad"]["test_accuracy"] > 0.7  # and it learnt something: airplanes from cars
    metrics = json.loads((runs / "bad" / "metrics.json").read_text())
    assert metrics["count"] == 1000 - sum(p.relative_to(bad_folder).parts[0] == "test" for p in bad)
