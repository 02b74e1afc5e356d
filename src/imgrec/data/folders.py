"""Image folders and archives of them: safe extraction, layout detection, class scanning, seeded splits.

Layouts understood (class names are the sorted names of the class folders):
  root/train/<class>/...  plus root/val/<class>/... and/or root/test/<class>/...
  root/<class>/...        one folder of class folders, split by imgrec with a seed
An archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) of either is extracted once into the cache.
Imports: numpy and the data package.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgrec.data.imageio import IMAGE_EXTENSIONS, is_image_file
from imgrec.errors import ImgrecError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test",)


def is_archive(path: str | Path) -> bool:
    """True when the path names a file with an archive suffix imgrec extracts."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: str | Path, cache_dir: str | Path) -> Path:
    """Extract an archive once into cache_dir/extracted/<name>-<hash>/ and return that folder.

    The key hashes the archive's absolute path, size and modification time, so a changed archive is
    extracted again. Extraction goes to a temporary folder renamed into place, so an interrupted
    extraction is never mistaken for a finished one. No member may land outside the target.
    """
    archive = Path(archive).resolve()
    if not archive.is_file():
        raise ImgrecError(f"archive not found: {archive}")
    stat = archive.stat()
    key = hashlib.sha1(f"{archive}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    target = Path(cache_dir) / "extracted" / f"{stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            _extract_tar(archive, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process (a DDP rank) finished the same extraction first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _inside(root: Path, name: str) -> Path:
    dest = (root / name).resolve()
    if dest != root and root not in dest.parents:
        raise ImgrecError(f"refusing to extract {name!r}: it would land outside the target folder")
    return dest


def _extract_zip(archive: Path, target: Path) -> None:
    root = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if os.path.isabs(info.filename) or info.filename.startswith(("/", "\\")):
                    raise ImgrecError(f"refusing to extract {info.filename!r}: absolute path in {archive.name}")
                _inside(root, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ImgrecError(f"refusing to extract {info.filename!r}: symbolic link in {archive.name}")
            zf.extractall(root)
    except zipfile.BadZipFile as exc:
        raise ImgrecError(f"{archive}: not a readable zip archive ({exc})") from None


def _extract_tar(archive: Path, target: Path) -> None:
    root = target.resolve()
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                if os.path.isabs(member.name):
                    raise ImgrecError(f"refusing to extract {member.name!r}: absolute path in {archive.name}")
                _inside(root, member.name)
                if not (member.isfile() or member.isdir()):
                    raise ImgrecError(f"refusing to extract {member.name!r}: links and devices are not allowed")
            # The 'data' filter (Python >= 3.10.12) repeats these checks and drops unsafe modes.
            if hasattr(tarfile, "data_filter"):
                tf.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; every member was checked above
                tf.extractall(root, members=members)
    except tarfile.TarError as exc:
        raise ImgrecError(f"{archive}: not a readable tar archive ({exc})") from None


@dataclass
class FolderSplits:
    """The files of an image folder: classes, and (path, label) lists per split that the folder defines."""

    root: Path
    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # split name -> (paths, labels)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def find_root(path: Path) -> Path:
    """Step down through folders that only wrap one folder (as archives often do), never into a class folder."""
    while True:
        entries = [p for p in path.iterdir() if not p.name.startswith((".", "__"))]
        if (len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in ("train",)
                and not _is_class_folder(entries[0])):
            path = entries[0]
        else:
            return path


def _is_class_folder(path: Path) -> bool:
    """Images directly inside and no subfolders: the only class of a one-class folder, not a wrapper."""
    return not _visible_dirs(path) and any(is_image_file(p) and p.is_file() for p in path.iterdir())


def scan_folder(path: str | Path) -> FolderSplits:
    """Find the layout, the classes and the image files of a folder (no decoding)."""
    root = find_root(Path(path))
    subdirs = {p.name.lower(): p for p in _visible_dirs(root)}
    split_dirs: dict[str, Path] = {}
    if "train" in subdirs and any(n in subdirs for n in VAL_NAMES + TEST_NAMES):
        split_dirs["train"] = subdirs["train"]
        for names, split in ((VAL_NAMES, "val"), (TEST_NAMES, "test")):
            for n in names:
                if n in subdirs:
                    split_dirs[split] = subdirs[n]
                    break
    else:
        split_dirs["all"] = subdirs["train"] if list(subdirs) == ["train"] else root
    first = split_dirs.get("train", split_dirs.get("all"))
    classes = [p.name for p in _visible_dirs(first)]
    if not classes:
        raise ImgrecError(f"{first} holds no class folders: expected {first}/<class name>/<images>")
    if len(classes) < 2:
        raise ImgrecError(f"{first} has only one class folder ({classes[0]}); a classifier needs at least two")
    splits = {name: _scan_classes(folder, classes, name) for name, folder in split_dirs.items()}
    return FolderSplits(root, classes, splits)


def _scan_classes(folder: Path, classes: list[str], split: str) -> tuple[list[str], list[int]]:
    found = [p.name for p in _visible_dirs(folder)]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ImgrecError(f"{folder} has class folders the training split lacks: {', '.join(unknown[:5])}")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, dirnames, filenames in os.walk(class_dir)
            for f in filenames
            if is_image_file(f) and not any(part.startswith(".") for part in Path(dirpath).relative_to(class_dir).parts)
        ) if class_dir.is_dir() else []
        if not files and split in ("train", "all"):
            raise ImgrecError(f"class folder {class_dir} has no images; add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ImgrecError(f"{folder} holds no image files (expected {', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return paths, labels


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts, class by class: part k takes fractions[k] of each class.

    The last part takes what is left. Each class keeps at least one example in the last part when it can.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for k, fraction in enumerate(fractions):
            take = int(round(fraction * len(idx)))
            take = min(take, max(0, len(idx) - start - 1))
            parts[k].append(idx[start : start + take])
            start += take
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
