"""imgrec doctor: finds every planted problem by name (and nothing in a clean folder), with a fix for each."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import BAD_KINDS, REPO, make_photo_folder, photo_like, write_bad_file
from imgrec.cli import main
from imgrec.data import doctor
from imgrec.data.doctor import DoctorOptions, diagnose, inspect_file, near_pairs
from imgrec.errors import ImgrecError

CLASSES = ("cat", "dog", "fox")


def options(**overrides: Any) -> DoctorOptions:
    values: dict[str, Any] = dict(data_dir=os.environ["IMGREC_CACHE"], cache_dir=os.environ["IMGREC_CACHE"], workers=0)
    values.update(overrides)
    return DoctorOptions(**values)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def clean_folder(tmp_path: Path) -> Path:
    return make_photo_folder(tmp_path / "clean", CLASSES, per_class=10, splits=("train", "val", "test"))


def plant_problems(root: Path) -> dict[str, list[str]]:
    """One of each problem in a copy of the clean folder; returns problem kind -> the files it must name."""
    planted: dict[str, list[str]] = {}
    for i, kind in enumerate(BAD_KINDS):  # replace real images: corrupt, truncated, zero-byte, text, bomb header
        target = root / "train" / CLASSES[i % 3] / f"{i:03d}.jpg"
        write_bad_file(target, kind)
        planted[f"unreadable-{kind}"] = [target.relative_to(root).as_posix()]
    # an exact copy of a training image in the test split, and a resized, re-encoded one in another
    shutil.copy(root / "train" / "dog" / "007.jpg", root / "test" / "dog" / "copy.jpg")
    planted["leakage-exact"] = ["train/dog/007.jpg", "test/dog/copy.jpg"]
    original = Image.open(root / "train" / "fox" / "008.jpg")
    original.resize((48, 48), Image.Resampling.BICUBIC).save(root / "test" / "fox" / "resized.png")
    planted["leakage-near"] = ["train/fox/008.jpg", "test/fox/resized.png"]
    # a stored-sideways photo (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo_like(777)).save(root / "train" / "cat" / "sideways.jpg", exif=exif)
    planted["exif-rotated"] = ["train/cat/sideways.jpg"]
    # imbalance: 25 more cats (then 34 readable cats in train, but only 8 dogs)
    for i in range(25):
        Image.fromarray(photo_like(1000 + i)).save(root / "train" / "cat" / f"extra{i:02d}.jpg")
    planted["imbalance"] = ["cat: 34", "dog: 8"]
    return planted


@pytest.fixture
def problem_folder(clean_folder: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "problems"
    shutil.copytree(clean_folder, root)
    return root, plant_problems(root)


def test_a_clean_folder_has_no_problems(clean_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = diagnose(str(clean_folder), options())
    assert report["problems"] == [] and report["unreadable"] == [] and report["duplicates"] == []
    assert report["counts"] == {split: dict.fromkeys(CLASSES, 10) for split in ("train", "val", "test")}
    assert report["sizes"] == {"32x32": 90} and report["modes"] == {"RGB": 90} and report["formats"] == {"JPEG": 90}
    code, out, _ = run_main(["doctor", str(clean_folder), "--workers", "0"], capsys)
    assert code == 0
    assert "no problems found" in out and "90 images" in out


def test_every_planted_problem_is_found_by_name(problem_folder: tuple[Path, dict[str, list[str]]]) -> None:
    root, planted = problem_folder
    report = diagnose(str(root), options())
    found = {p["kind"]: p for p in report["problems"]}
    assert set(found) == set(planted)  # each planted problem, and nothing else
    for kind, names in planted.items():
        text = " ".join(found[kind]["files"])
        for name in names:
            assert name in text, (kind, name, text)
        assert found[kind]["fix"] and found[kind]["message"]
    assert found["unreadable-too-large"]["severity"] == "error" and found["exif-rotated"]["severity"] == "warning"
    assert "--balance weights" in found["imbalance"]["fix"] and "--balance sampler" in found["imbalance"]["fix"]
    [exact] = [g for g in report["duplicates"] if g["kind"] == "exact"]
    assert sorted(exact["splits"]) == ["test", "train"] and exact["classes"] == ["dog", "dog"]
    [near] = [g for g in report["duplicates"] if g["kind"] == "near"]
    assert sorted(near["files"]) == sorted(planted["leakage-near"])
    # unreadable files are left out of the counts, as training leaves them out
    assert report["counts"]["train"] == {"cat": 34, "dog": 8, "fox": 9}
    assert {u["kind"] for u in report["unreadable"]} == set(BAD_KINDS)


def test_doctor_command_text_and_json(problem_folder: tuple[Path, dict[str, list[str]]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, planted = problem_folder
    code, out, err = run_main(["doctor", str(root), "--workers", "2"], capsys)
    assert code == 1 and not err
    for names in planted.values():
        for name in names:
            assert name in out
    assert out.count("fix: ") == len(planted)
    code, out, _ = run_main(["doctor", str(root), "--json", "--workers", "0"], capsys)
    assert code == 1
    report = json.loads(out)
    assert {p["kind"] for p in report["problems"]} == set(planted)
    assert report["classes"] == list(CLASSES) and report["kind"] == "folder"


def test_label_conflict_and_duplicates_within_a_split(clean_folder: Path) -> None:
    shutil.copy(clean_folder / "train" / "cat" / "001.jpg", clean_folder / "train" / "dog" / "also-a-dog.jpg")
    shutil.copy(clean_folder / "train" / "fox" / "002.jpg", clean_folder / "train" / "fox" / "again.jpg")
    report = diagnose(str(clean_folder), options())
    found = {p["kind"]: p for p in report["problems"]}
    assert set(found) == {"label-conflict", "duplicates"}
    assert "train/dog/also-a-dog.jpg" in found["label-conflict"]["files"][0]
    assert "train/fox/again.jpg" in found["duplicates"]["files"][0]


def test_a_folder_imgrec_splits_and_an_archive_of_it(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(10):
            Image.fromarray(photo_like(100 * i + j)).save(root / name / f"{j}.png")
    (root / "cat" / "README.txt").write_text("not an image: ignored, not a problem\n")
    shutil.copy(root / "dog" / "3.png", root / "dog" / "3-copy.png")
    report = diagnose(str(root), options())
    assert set(report["counts"]) == {"train", "val", "test"}  # the split training would make (seed 0)
    assert sum(sum(c.values()) for c in report["counts"].values()) == 31
    assert report["ignored"] == ["cat/README.txt"]
    [group] = report["duplicates"]
    assert group["kind"] == "exact" and sorted(group["files"]) == ["dog/3-copy.png", "dog/3.png"]
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="flat")
    from_archive = diagnose(str(archive), options())
    assert from_archive["counts"] == report["counts"] and from_archive["duplicates"] == report["duplicates"]
    assert from_archive["ignored"] == report["ignored"]


def test_archive_is_inspected_from_memory_like_its_folder(tmp_path: Path) -> None:
    """Bad files inside an archive read into memory are described as the same files in a folder are."""
    root = make_photo_folder(tmp_path / "photos", CLASSES, per_class=5, splits=())
    (root / CLASSES[0] / "empty.jpg").write_bytes(b"")
    truncated = (root / CLASSES[1] / "001.jpg").read_bytes()
    (root / CLASSES[1] / "cut.jpg").write_bytes(truncated[: len(truncated) // 3])
    (root / CLASSES[1] / "notes.md").write_text("ignored")
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="photos")
    cache = tmp_path / "cache"
    folder_report = diagnose(str(root), options())
    archive_report = diagnose(str(archive), DoctorOptions(data_dir=str(tmp_path), cache_dir=str(cache), workers=0))
    assert not (cache / "extracted").exists()
    assert archive_report["unreadable"] == folder_report["unreadable"] and len(folder_report["unreadable"]) == 2
    assert archive_report["problems"] == folder_report["problems"] and archive_report["problems"]
    assert archive_report["ignored"] == folder_report["ignored"] == [f"{CLASSES[1]}/notes.md"]
    assert archive_report["counts"] == folder_report["counts"]


def test_no_test_split_lists_validation_files_once(tmp_path: Path) -> None:
    root = make_photo_folder(tmp_path / "trainval", CLASSES, per_class=6, splits=("train", "val"))
    report = diagnose(str(root), options())
    assert report["problems"] == [] and set(report["counts"]) == {"train", "val"}
    assert report["images"] == 36


def test_digits_named_set(capsys: pytest.CaptureFixture[str]) -> None:
    report = diagnose("digits", options())
    assert report["kind"] == "named" and report["images"] == 1797
    assert report["sizes"] == {"8x8": 1797} and report["modes"] == {"L": 1797}
    assert report["unreadable"] == [] and report["exif_rotated"] == []
    assert sum(report["counts"]["test"].values()) == 269  # the fixed 15% test split training uses
    code, out, _ = run_main(["doctor", "digits", "--json", "--workers", "0"], capsys)
    assert code == (1 if report["problems"] else 0) and json.loads(out)["images"] == 1797


@pytest.mark.parametrize("argv, fragment", [
    (["doctor", "nosuch"], "unknown data set 'nosuch'"),
    (["doctor", "digits", "--near", "99"], "--near must be in [0, 32]"),
    (["doctor", "digits", "--workers", "-1"], "--workers must not be negative"),
])
def test_usage_errors(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and not out


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_inspect_file_names_each_kind_of_bad_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(photo_like(3, 64)).save(path)
    facts = inspect_file(str(write_bad_file(path, kind)))
    assert facts["problem"] == kind and facts["reason"]


def test_inspect_file_of_a_good_image(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.fromarray(photo_like(3)).save(path)
    facts = inspect_file(str(path))
    assert facts["problem"] is None and facts["format"] == "PNG" and facts["size"] == [32, 32]
    assert len(facts["thumb"]) == 16 * 16 and 0 <= facts["phash"] < 2**64


def test_inspect_file_names_an_image_that_decodes_but_cannot_be_fingerprinted(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "odd.png"
    Image.fromarray(photo_like(3)).save(path)

    def broken(grey: Image.Image) -> tuple[int, bytes]:
        raise ValueError("box offset can't be negative")

    monkeypatch.setattr(doctor, "_fingerprints", broken)
    facts = inspect_file(str(path))
    assert facts["problem"] == "corrupt" and facts["reason"] == "cannot read image (ValueError: box offset can't be negative)"


def test_a_worker_that_dies_names_the_file_it_was_inspecting(clean_folder: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    victim = clean_folder / "val" / "dog" / "003.jpg"
    real = doctor.inspect_file

    def crash(path: str) -> dict[str, Any]:
        if path == str(victim):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    monkeypatch.setattr(doctor, "inspect_file", crash)
    with pytest.raises(ImgrecError) as info:
        diagnose(str(clean_folder), options(workers=2))
    message = str(info.value)
    assert message.startswith("inspecting the images failed: DataLoader worker (pid")
    assert message.endswith(f"while reading {victim}") and "\n" not in message
    del info


def strip_png(path: Path, width: int) -> Path:
    """A valid 8-bit grey PNG of width x 1 pixels, a repeating ramp (80,000,000 of them fit in about 300 kB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\0" + bytes(range(256)) * (width // 256) + bytes(width % 256)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row, 9)) + chunk(b"IEND", b""))
    return path


def test_an_80_million_pixel_strip_is_fingerprinted_in_bounded_memory(tmp_path: Path) -> None:
    """Resampling filters size their weights by the scale: the strip must be reduced before it is hashed."""
    root = make_photo_folder(tmp_path / "data", CLASSES, per_class=4)
    strip_png(root / "train" / "cat" / "strip.png", 80_000_000)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "imgrec", "doctor", str(root), "--json", "--workers", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert report["unreadable"] == [] and report["sizes"]["80000000x1"] == 1
    # the reduction keeps what the fingerprints see: a large picture and its small copy are still near duplicates
    big = Image.fromarray(photo_like(5, size=64)).resize((1024, 768), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.png")
    big.resize((64, 48), Image.Resampling.BICUBIC).save(tmp_path / "small.png")
    a, b = inspect_file(str(tmp_path / "big.png")), inspect_file(str(tmp_path / "small.png"))
    assert bin(a["phash"] ^ b["phash"]).count("1") <= 6


def test_near_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=(300, 8)).astype(np.uint64)
    noisy = base.copy()
    for k in range(rng.integers(0, 8)):  # near copies: a few bits flipped
        noisy ^= flips[:, k]
    hashes = np.concatenate([base, noisy[:100]])
    for bits in (0, 3, 6):
        distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        i, j = np.nonzero(np.triu(distance <= bits, 1))
        expected = sorted(zip(i.tolist(), j.tolist()))
        assert sorted(map(tuple, near_pairs(hashes, bits).tolist())) == expected


def test_near_pairs_on_nothing() -> None:
    assert near_pairs(np.zeros(0, dtype=np.uint64), 4).shape == (0, 2)
    assert near_pairs(np.array([5, 5, 7], dtype=np.uint64), 0).tolist() == [[0, 1]]


@pytest.mark.slow
def test_doctor_on_fashion_mnist(shared_data: Path, tmp_path: Path) -> None:
    """The real data set, through the real command: it runs, counts right, and its JSON parses."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "imgrec", "doctor", "fashion-mnist", "--data-dir", str(shared_data),
                           "--json"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["images"] == 70000 and len(report["classes"]) == 10
    assert sum(report["counts"]["test"].values()) == 10000
    assert sum(report["counts"]["train"].values()) + sum(report["counts"]["val"].values()) == 60000
    assert report["sizes"] == {"28x28": 70000} and report["unreadable"] == []
    assert proc.returncode == (1 if report["problems"] else 0)
    for problem in report["problems"]:
        assert problem["fix"] and problem["files"]
