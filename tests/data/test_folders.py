"""Image folders: layouts, class scanning, seeded stratified splits, safe once-only archive extraction, and
archives read into memory with the same checks."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import error_line, make_image_folder
from imgrec.data import folders
from imgrec.data.folders import (
    extract_archive,
    find_root,
    is_archive,
    read_archive,
    scan_folder,
    stratified_split,
)
from imgrec.errors import ImgrecError, UsageError


def rel(paths: list[str], root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


# --- layouts -----------------------------------------------------------------------------------------------


def test_single_folder_of_class_folders(image_folder: Path) -> None:
    scanned = scan_folder(image_folder)
    assert scanned.root == image_folder
    assert scanned.classes == ["cat", "dog", "fox"]
    assert list(scanned.splits) == ["all"]
    paths, labels = scanned.splits["all"]
    assert len(paths) == len(labels) == 36
    assert labels == [0] * 12 + [1] * 12 + [2] * 12
    assert rel(paths, image_folder)[:2] == ["cat/000.png", "cat/001.png"]
    assert all(Path(p).parent.name == scanned.classes[y] for p, y in zip(paths, labels))


def test_train_test_layout(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=3, splits=("train", "test"))
    scanned = scan_folder(root)
    assert scanned.classes == ["cat", "dog", "fox"]
    assert sorted(scanned.splits) == ["test", "train"]
    for split in ("train", "test"):
        paths, labels = scanned.splits[split]
        assert len(paths) == 9 and labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(rel([p], root)[0].startswith(f"{split}/") for p in paths)


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Val"])
def test_train_val_test_layout(tmp_path: Path, val_name: str) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=2, splits=("train", val_name, "test"))
    scanned = scan_folder(root)
    assert sorted(scanned.splits) == ["test", "train", "val"]
    assert all(Path(p).parts[-3] == val_name for p in scanned.splits["val"][0])
    assert len(scanned.splits["val"][0]) == 6


def test_train_only_is_one_pool(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=2, splits=("train",))
    scanned = scan_folder(root)
    assert list(scanned.splits) == ["all"]
    assert all("/train/" in p for p in scanned.splits["all"][0])


@pytest.mark.parametrize("splits", [(), ("train", "test"), ("train",)])
def test_wrapper_folders_are_stepped_through(tmp_path: Path, splits: tuple[str, ...]) -> None:
    make_image_folder(tmp_path / "outer" / "inner" / "ds", classes=("a", "b"), per_class=2, splits=splits)
    (tmp_path / "outer" / ".DS_Store").write_text("x")
    (tmp_path / "outer" / "__MACOSX").mkdir()
    scanned = scan_folder(tmp_path / "outer")
    assert scanned.root == tmp_path / "outer" / "inner" / "ds"
    assert scanned.classes == ["a", "b"]
    assert sum(len(p) for p, _ in scanned.splits.values()) == 4 * max(1, len(splits))


def test_find_root_stops_at_the_class_folders(image_folder: Path) -> None:
    assert find_root(image_folder) == image_folder


def test_hidden_files_and_folders_are_ignored(image_folder: Path) -> None:
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "cat" / "._000.png").write_bytes(b"resource fork")
    (image_folder / "cat" / "readme.txt").write_text("not an image")
    (image_folder / "cat" / "Thumbs.db").write_bytes(b"x")
    (image_folder / "cat" / ".thumbnails").mkdir()
    (image_folder / "cat" / ".thumbnails" / "a.png").write_bytes((image_folder / "cat" / "000.png").read_bytes())
    (image_folder / ".hidden_class").mkdir()
    (image_folder / ".hidden_class" / "x.png").write_bytes((image_folder / "cat" / "000.png").read_bytes())
    (image_folder / "__MACOSX").mkdir()
    scanned = scan_folder(image_folder)
    assert scanned.classes == ["cat", "dog", "fox"]
    paths, _ = scanned.splits["all"]
    assert len(paths) == 36
    assert not any(Path(p).name.startswith(".") or ".thumbnails" in p for p in paths)


def test_nested_subfolders_inside_a_class_are_collected(image_folder: Path) -> None:
    deep = image_folder / "dog" / "2024" / "summer"
    deep.mkdir(parents=True)
    (deep / "beach.jpg").write_bytes((image_folder / "dog" / "000.png").read_bytes())
    (image_folder / "dog" / "2024" / "park.PNG").write_bytes((image_folder / "dog" / "001.png").read_bytes())
    scanned = scan_folder(image_folder)
    assert scanned.classes == ["cat", "dog", "fox"]  # subfolders of a class are not classes
    paths, labels = scanned.splits["all"]
    dogs = rel([p for p, y in zip(paths, labels) if y == 1], image_folder)
    assert "dog/2024/summer/beach.jpg" in dogs and "dog/2024/park.PNG" in dogs
    assert len(dogs) == 14


def test_non_ascii_class_names(tmp_path: Path) -> None:
    classes = ("chat", "Hund", "кошка", "猫", "été")
    root = make_image_folder(tmp_path / "données", classes=classes, per_class=2)
    scanned = scan_folder(root)
    assert scanned.classes == sorted(classes)
    paths, labels = scanned.splits["all"]
    assert len(paths) == 10
    assert all(Path(p).parent.name == scanned.classes[y] for p, y in zip(paths, labels))


def test_empty_class_folder_is_an_error_naming_it(image_folder: Path) -> None:
    (image_folder / "emu").mkdir()
    with pytest.raises(ImgrecError, match="emu") as info:
        scan_folder(image_folder)
    assert "no images" in str(info.value)


def test_class_folder_of_non_images_is_an_error(image_folder: Path) -> None:
    (image_folder / "notes").mkdir()
    (image_folder / "notes" / "a.txt").write_text("x")
    with pytest.raises(ImgrecError, match="notes"):
        scan_folder(image_folder)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", classes=("cat",), per_class=3)
    with pytest.raises(ImgrecError, match=r"only one class folder \(cat\)"):
        scan_folder(root)


def test_single_class_in_a_train_split_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", classes=("cat",), per_class=2, splits=("train", "test"))
    with pytest.raises(ImgrecError, match="only one class"):
        scan_folder(root)


def test_folder_without_class_folders_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    (tmp_path / "flat" / "b.txt").write_text("x")
    with pytest.raises(ImgrecError, match="no class folders"):
        scan_folder(tmp_path / "flat")


def test_val_folder_with_unknown_class_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", classes=("cat", "dog"), per_class=2, splits=("train", "val"))
    make_image_folder(root / "val", classes=("wolf",), per_class=1)
    with pytest.raises(ImgrecError, match="wolf"):
        scan_folder(root)


def test_test_split_may_lack_a_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", classes=("cat", "dog", "fox"), per_class=2, splits=("train",))
    make_image_folder(root / "test", classes=("cat", "dog"), per_class=2)
    scanned = scan_folder(root)
    assert scanned.splits["test"][1] == [0, 0, 1, 1]


# --- stratified_split --------------------------------------------------------------------------------------


LABELS = np.repeat(np.arange(4), [40, 20, 10, 30])


def test_split_is_seeded() -> None:
    first = stratified_split(LABELS, [0.2, 0.1], seed=3)
    again = stratified_split(LABELS, [0.2, 0.1], seed=3)
    other = stratified_split(LABELS, [0.2, 0.1], seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_split_is_disjoint_complete_and_stratified() -> None:
    parts = stratified_split(LABELS, [0.2, 0.1], seed=0)
    assert len(parts) == 3
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and sorted(joined.tolist()) == list(range(len(LABELS)))
    for part in parts:
        assert np.array_equal(part, np.sort(part))
    for cls, count in enumerate([40, 20, 10, 30]):
        assert (LABELS[parts[0]] == cls).sum() == round(0.2 * count)
        assert (LABELS[parts[1]] == cls).sum() == round(0.1 * count)
        assert (LABELS[parts[2]] == cls).sum() == count - round(0.2 * count) - round(0.1 * count)


def test_split_is_random_within_a_class() -> None:
    test, rest = stratified_split(LABELS, [0.5], seed=0)
    assert not np.array_equal(test[LABELS[test] == 0], np.arange(20))  # not simply the first half


def test_split_keeps_one_example_per_class_in_the_last_part() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    held, kept = stratified_split(labels, [0.9], seed=0)
    assert sorted(set(labels[kept].tolist())) == [0, 1, 2]
    assert len(held) + len(kept) == 5


# --- archives ----------------------------------------------------------------------------------------------


def make_archive(folder: Path, archive: Path) -> Path:
    """Pack folder (as its own top-level folder) into archive; the format follows the suffix."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(folder.rglob("*")):
                zf.write(path, path.relative_to(folder.parent).as_posix())
    else:
        mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as tf:
            tf.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz"])
def test_extract_archive(image_folder: Path, tmp_path: Path, suffix: str) -> None:
    archive = make_archive(image_folder, tmp_path / f"photos{suffix}")
    assert is_archive(archive)
    cache = tmp_path / "cache"
    target = extract_archive(archive, cache)
    assert target.is_dir() and target.parent == cache / "extracted"
    assert target.name.startswith("photos-")
    originals = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*.png"))
    extracted = sorted(p.relative_to(target / "photos") for p in target.rglob("*.png"))
    assert extracted == originals
    assert (target / "photos" / "dog" / "003.png").read_bytes() == (image_folder / "dog" / "003.png").read_bytes()
    scanned = scan_folder(target)
    assert scanned.classes == ["cat", "dog", "fox"] and len(scanned.splits["all"][0]) == 36
    assert [p.name for p in (cache / "extracted").iterdir()] == [target.name]  # no temporary folder left


def test_extract_archive_is_done_once(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_archive(image_folder, tmp_path / "photos.tar.gz")
    target = extract_archive(archive, tmp_path / "cache")
    marker = target / "photos" / "cat" / "000.png"
    mtime = marker.stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("extracted a second time")

    monkeypatch.setattr(folders, "_extract_tar", fail)
    assert extract_archive(archive, tmp_path / "cache") == target
    assert marker.stat().st_mtime_ns == mtime


def test_changed_archive_is_extracted_again(image_folder: Path, tmp_path: Path) -> None:
    archive = make_archive(image_folder, tmp_path / "photos.tar")
    first = extract_archive(archive, tmp_path / "cache")
    (image_folder / "cat" / "extra.png").write_bytes((image_folder / "cat" / "000.png").read_bytes())
    make_archive(image_folder, archive)
    second = extract_archive(archive, tmp_path / "cache")
    assert second != first
    assert (second / "photos" / "cat" / "extra.png").is_file()
    assert not (first / "photos" / "cat" / "extra.png").exists()
    # Same size, new modification time: also a new archive.
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert extract_archive(archive, tmp_path / "cache") not in (first, second)


def test_archive_extracted_by_another_process_meanwhile(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (DDP ranks) extracting one archive: the one that finishes second uses the first's folder."""
    archive = make_archive(image_folder, tmp_path / "photos.tar")
    name = extract_archive(archive, tmp_path / "elsewhere").name  # the folder name depends on the archive only
    cache = tmp_path / "cache"
    real = folders._extract_tar

    def racing(source: Path, tmp: Path) -> None:
        real(source, tmp)
        real(source, cache / "extracted" / name)  # meanwhile the other process finished and renamed its own

    monkeypatch.setattr(folders, "_extract_tar", racing)
    target = extract_archive(archive, cache)
    assert target == cache / "extracted" / name
    assert (target / "photos" / "cat" / "000.png").is_file()
    assert [p.name for p in (cache / "extracted").iterdir()] == [name]  # our temporary folder was removed


def test_bad_archive_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\3\4 not really")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(ImgrecError, match="broken.zip"):
        extract_archive(tmp_path / "broken.zip", tmp_path / "cache")
    with pytest.raises(ImgrecError, match="broken.tar.gz"):
        extract_archive(tmp_path / "broken.tar.gz", tmp_path / "cache")
    with pytest.raises(ImgrecError, match="not found"):
        extract_archive(tmp_path / "missing.zip", tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []  # temporary folders removed


# --- malicious archives ------------------------------------------------------------------------------------


def tar_with_member(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        good = tarfile.TarInfo("ok/cat/a.txt")
        good.size = 2
        tf.addfile(good, io.BytesIO(b"ok"))
        tf.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def zip_with_member(path: Path, member: str | zipfile.ZipInfo, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok/cat/a.txt", b"ok")
        zf.writestr(member, data)
    return path


REFUSALS = [  # each of evil_archives, and the words of its refusal
    ("tar-dotdot", "outside the target"), ("tar-deep-dotdot", "outside the target"), ("tar-absolute", "absolute path"),
    ("tar-symlink", "links"), ("tar-hardlink", "links"), ("tar-device", "devices"),
    ("zip-dotdot", "outside the target"), ("zip-deep-dotdot", "outside the target"), ("zip-absolute", "absolute path"),
    ("zip-symlink", "symbolic link"),
]


def evil_archives(base: Path) -> dict[str, Path]:
    """Archives that try to write evil.txt outside the extraction folder, one way each."""
    base.mkdir(parents=True, exist_ok=True)
    abs_target = base / "abs" / "evil.txt"
    made: dict[str, Path] = {}

    dotdot = tarfile.TarInfo("../evil.txt")
    dotdot.size = 4
    made["tar-dotdot"] = tar_with_member(base / "dotdot.tar", dotdot, b"evil")
    deep = tarfile.TarInfo("ok/../../../evil.txt")
    deep.size = 4
    made["tar-deep-dotdot"] = tar_with_member(base / "deep.tar.gz", deep, b"evil")
    absolute = tarfile.TarInfo(str(abs_target))
    absolute.size = 4
    made["tar-absolute"] = tar_with_member(base / "absolute.tar", absolute, b"evil")
    symlink = tarfile.TarInfo("ok/link")
    symlink.type = tarfile.SYMTYPE
    symlink.linkname = "../../../evil.txt"
    made["tar-symlink"] = tar_with_member(base / "symlink.tar", symlink)
    hardlink = tarfile.TarInfo("ok/hard")
    hardlink.type = tarfile.LNKTYPE
    hardlink.linkname = "../../evil.txt"
    made["tar-hardlink"] = tar_with_member(base / "hardlink.tar", hardlink)
    device = tarfile.TarInfo("ok/null")
    device.type = tarfile.CHRTYPE
    made["tar-device"] = tar_with_member(base / "device.tar", device)

    made["zip-dotdot"] = zip_with_member(base / "dotdot.zip", "../evil.txt", b"evil")
    made["zip-deep-dotdot"] = zip_with_member(base / "deep.zip", "ok/../../evil.txt", b"evil")
    made["zip-absolute"] = zip_with_member(base / "absolute.zip", str(abs_target), b"evil")
    link = zipfile.ZipInfo("ok/link")
    link.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores one
    made["zip-symlink"] = zip_with_member(base / "symlink.zip", link, b"../../../evil.txt")
    return made


@pytest.mark.parametrize("kind, reason", REFUSALS)
def test_malicious_archive_is_refused(tmp_path: Path, kind: str, reason: str) -> None:
    archive = evil_archives(tmp_path / "archives")[kind]
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    with pytest.raises(ImgrecError, match="refusing to extract") as info:
        extract_archive(archive, cache)
    assert reason in str(info.value)
    # Nothing landed anywhere: not beside or above the target, not at the absolute path, no partial target.
    assert not [p for p in tmp_path.rglob("*evil*")]
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert not (tmp_path / "archives" / "abs").exists()
    assert list((cache / "extracted").iterdir()) == []
    # A second try refuses again (a refused archive is never recorded as extracted).
    with pytest.raises(ImgrecError, match="refusing to extract"):
        extract_archive(archive, cache)


# --- archives that fail part-way, and limits ----------------------------------------------------------------


def one_line_error(archive: Path, cache: Path, *fragments: str) -> str:
    """extract_archive refuses with one line naming the archive (and the fragments), and leaves nothing behind."""
    with pytest.raises(ImgrecError) as info:
        extract_archive(archive, cache)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert list((cache / "extracted").iterdir()) == []
    return message


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz", ".tar.bz2", ".zip"])
def test_truncated_archive_is_one_line(image_folder: Path, tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"photos{suffix}"
    if suffix == ".zip":
        make_archive(image_folder, archive)
    else:
        with tarfile.open(archive, f"w:{suffix.rsplit('.', 1)[1]}") as tf:
            tf.add(image_folder, arcname="photos")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    one_line_error(archive, tmp_path / "cache", str(archive), "not a readable")
    with pytest.raises(ImgrecError) as info:  # read into memory: the same line
        read_archive(archive)
    assert "\n" not in str(info.value) and f"{archive}: not a readable" in str(info.value)


def test_unreadable_tar_is_one_line(tmp_path: Path) -> None:
    """tarfile lists every compression it tried, one per line: the message joins them."""
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    one_line_error(tmp_path / "junk.tar", tmp_path / "cache", "junk.tar: not a readable tar archive")


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_member_below_a_file_member_is_one_line(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "clash.tar", {"ok/cat/a.png": b"x", "ok/cat/a.png/b.png": b"y"})
    one_line_error(archive, tmp_path / "cache", "cannot extract ok/cat/a.png", "Not a directory")


def test_member_name_too_long_is_one_line(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "long.tar", {"ok/cat/" + "x" * 300 + ".png": b"x"})
    one_line_error(archive, tmp_path / "cache", "long.tar", "File name too long")


def test_full_disk_while_extracting_is_one_line(image_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_archive(image_folder, tmp_path / "photos.tar")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tarfile, "copyfileobj", full)
    size = sum(p.stat().st_size for p in image_folder.rglob("*.png"))
    one_line_error(archive, tmp_path / "cache", "no space left", str(archive), f"it needs {size:,} bytes", "IMGREC_CACHE")


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_archive_limits(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    archive = make_archive(image_folder, tmp_path / f"photos{suffix}")  # 36 images + 4 folders (tar) or 36 (zip)
    size = sum(p.stat().st_size for p in image_folder.rglob("*.png"))
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_MEMBERS", "20")
    one_line_error(archive, tmp_path / "cache", "more than 20 members", "IMGREC_MAX_ARCHIVE_MEMBERS")
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_MEMBERS", "1000")
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_BYTES", str(size - 1))
    one_line_error(archive, tmp_path / "cache", f"expands to {size:,} bytes", f"{size - 1:,}",
                   "IMGREC_MAX_ARCHIVE_BYTES")
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_BYTES", "1M")
    assert extract_archive(archive, tmp_path / "cache").is_dir()


def test_archive_limit_defaults_and_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGREC_MAX_ARCHIVE_BYTES", raising=False)
    monkeypatch.delenv("IMGREC_MAX_ARCHIVE_MEMBERS", raising=False)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: type("usage", (), {"free": 10 * 1024**4})())
    assert folders.archive_limits(tmp_path / "x") == (4 * 1024**3, 1_000_000)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: type("usage", (), {"free": 1000})())
    assert folders.archive_limits(tmp_path / "x") == (900, 1_000_000)  # never more than 90% of the free space
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_MEMBERS", "lots")
    with pytest.raises(UsageError, match="IMGREC_MAX_ARCHIVE_MEMBERS='lots'"):
        folders.archive_limits(tmp_path / "x")


def test_abandoned_extraction_folders_are_removed(image_folder: Path, tmp_path: Path) -> None:
    """A process killed while extracting leaves its temporary folder; the next extraction removes it, but not the
    folder of a process that still runs."""
    archive = make_archive(image_folder, tmp_path / "photos.tar")
    extracted = tmp_path / "cache" / "extracted"
    extracted.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = extracted / f".photos-0123456789ab.extracting.{host}.{int(finished.stdout)}"
    alive = extracted / f".photos-0123456789ab.extracting.{host}.1"
    for folder in (dead, alive):
        (folder / "photos" / "cat").mkdir(parents=True)
        (folder / "photos" / "cat" / "half.png").write_bytes(b"x")
    target = extract_archive(archive, tmp_path / "cache")
    assert sorted(p.name for p in extracted.iterdir()) == sorted([target.name, alive.name])


def test_truncated_archive_through_the_command_is_one_line(image_folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(image_folder, arcname="photos")
    archive.write_bytes(archive.read_bytes()[:-200])
    env = {**os.environ, "PYTHONPATH": str(Path(folders.__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    for command in (["doctor", str(archive)], ["train", "--data", str(archive), "--project", str(tmp_path / "runs")]):
        proc = subprocess.run([sys.executable, "-m", "imgrec", *command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1
        assert error_line(proc.stderr).endswith(f"{archive}: not a readable tar archive (truncated: its data ends early)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- archives read into memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tar.xz"])
def test_read_archive_scans_like_its_extraction(image_folder: Path, tmp_path: Path, suffix: str) -> None:
    (image_folder / "notes.txt").write_text("not an image")
    (image_folder / "cat" / ".hidden.png").write_bytes(b"hidden")
    (image_folder / "dog" / "sub").mkdir()
    (image_folder / "dog" / "sub" / "inner.png").write_bytes((image_folder / "dog" / "000.png").read_bytes())
    (image_folder / "empty").mkdir()  # an empty class folder: both ways refuse it the same
    archive = make_archive(image_folder, tmp_path / f"photos{suffix}")
    read = read_archive(archive)
    assert read is not None
    with pytest.raises(ImgrecError, match="empty has no images"):
        scan_folder(read.tree)
    (image_folder / "empty").rmdir()
    archive = make_archive(image_folder, tmp_path / f"photos2{suffix}")
    read = read_archive(archive)
    assert read is not None
    extracted = scan_folder(extract_archive(archive, tmp_path / "cache"))
    in_memory = scan_folder(read.tree)
    assert in_memory.classes == extracted.classes == ["cat", "dog", "fox"]
    paths, labels = in_memory.splits["all"]
    assert labels == extracted.splits["all"][1]
    assert rel(paths, Path(os.fspath(in_memory.root))) == rel(extracted.splits["all"][0], Path(extracted.root))
    assert len(paths) == 37 and str(archive.resolve()) + "/photos/dog/sub/inner.png" in paths
    # The bytes of every image file, by those paths; other files are in the tree without them.
    for path in paths:
        original = image_folder / Path(path).relative_to(Path(os.fspath(in_memory.root)))
        assert read.files[path] == original.read_bytes()
    assert not any(p.endswith(("notes.txt", ".hidden.png")) for p in read.files)
    assert (read.tree / "photos" / "notes.txt").is_file() and not (read.tree / "photos" / "missing").is_dir()


def test_read_archive_writes_nothing(image_folder: Path, tmp_path: Path) -> None:
    archive = make_archive(image_folder, tmp_path / "photos.tar.gz")
    before = sorted(tmp_path.rglob("*"))
    assert read_archive(archive) is not None
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind, reason", REFUSALS)
def test_malicious_archive_is_refused_when_read(tmp_path: Path, kind: str, reason: str) -> None:
    archive = evil_archives(tmp_path / "archives")[kind]
    with pytest.raises(ImgrecError, match="refusing to extract") as info:
        read_archive(archive)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_member_names_are_normalised_when_read(tmp_path: Path) -> None:
    archive = tar_of(tmp_path / "dots.tar", {"./ok/cat/a.png": b"a", "ok/x/../dog/b.png": b"b", "ok//cat/c.png": b"c"})
    read = read_archive(archive)
    assert read is not None
    root = str(archive.resolve())
    assert read.files == {f"{root}/ok/cat/a.png": b"a", f"{root}/ok/dog/b.png": b"b", f"{root}/ok/cat/c.png": b"c"}


def test_bad_archives_are_one_line_when_read(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\3\4 not really")
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    with pytest.raises(ImgrecError, match="broken.zip: not a readable zip archive"):
        read_archive(tmp_path / "broken.zip")
    with pytest.raises(ImgrecError, match="junk.tar: not a readable tar archive"):
        read_archive(tmp_path / "junk.tar")
    with pytest.raises(ImgrecError, match="not found"):
        read_archive(tmp_path / "missing.zip")
    clash = tar_of(tmp_path / "clash.tar", {"ok/cat/a.png": b"x", "ok/cat/a.png/b.png": b"y"})
    with pytest.raises(ImgrecError, match="cannot extract ok/cat/a.png/b.png from .*clash.tar: Not a directory"):
        read_archive(clash)
    clash = tar_of(tmp_path / "clash2.tar", {"ok/cat/a/b.png": b"x", "ok/cat/a": b"y"})
    with pytest.raises(ImgrecError, match="cannot extract ok/cat/a from .*clash2.tar: Is a directory"):
        read_archive(clash)


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_read_archive_limits(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Past the member count: the same refusal as extraction; past the bytes it may hold: None (extract it)."""
    archive = make_archive(image_folder, tmp_path / f"photos{suffix}")
    size = sum(p.stat().st_size for p in image_folder.rglob("*.png"))
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_MEMBERS", "20")
    with pytest.raises(ImgrecError, match="more than 20 members"):
        read_archive(archive)
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_MEMBERS", "1000")
    assert read_archive(archive, limit=size - 1) is None
    assert read_archive(archive, limit=size) is not None
    monkeypatch.setattr(folders, "ARCHIVE_IN_MEMORY_BYTES", size - 1)
    assert read_archive(archive) is None
    monkeypatch.setattr(folders, "ARCHIVE_IN_MEMORY_BYTES", size)
    monkeypatch.setenv("IMGREC_MAX_ARCHIVE_BYTES", str(size - 1))
    assert read_archive(archive) is None  # then extraction refuses it with the limit's own message


@pytest.mark.parametrize("kind, env, fragment", [
    ("tar-symlink", {}, "refusing to extract 'ok/link': links and devices are not allowed"),
    ("zip-dotdot", {}, "refusing to extract '../evil.txt': it would land outside the target folder"),
    ("photos", {"IMGREC_MAX_ARCHIVE_MEMBERS": "5"}, "holds more than 5 members"),
    ("photos", {"IMGREC_MAX_ARCHIVE_BYTES": "1K"}, "expands to"),  # too large to read: extraction refuses it
])
def test_refused_archive_through_the_command_is_one_line(image_folder: Path, tmp_path: Path, kind: str,
                                                          env: dict[str, str], fragment: str) -> None:
    archive = (make_archive(image_folder, tmp_path / "photos.tar.gz") if kind == "photos"
               else evil_archives(tmp_path / "archives")[kind])
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(folders.__file__).parents[2]), "OMP_NUM_THREADS": "1",
           "IMGREC_CACHE": str(cache), **env}
    for command in (["doctor", str(archive)], ["train", "--data", str(archive), "--project", str(tmp_path / "runs")]):
        proc = subprocess.run([sys.executable, "-m", "imgrec", *command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert fragment in error_line(proc.stderr)
    assert not [p for p in tmp_path.rglob("*evil*")] and not [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert not (cache / "extracted").exists() or not any((cache / "extracted").iterdir())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
