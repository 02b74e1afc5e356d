"""Image folders and archives of them: safe extraction, layout detection, class scanning, seeded splits.

Layouts understood (class names are the sorted names of the class folders):
  root/train/<class>/...  plus root/val/<class>/... and/or root/test/<class>/...
  root/<class>/...        one folder of class folders, split by imgrec with a seed
An archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) of either is read into memory when its files add up to
no more than ARCHIVE_IN_MEMORY_BYTES (read_archive: scanned as a folder, decoded from memory, no file written), and
otherwise extracted once into the cache; both within limits on its total size and member count
(IMGREC_MAX_ARCHIVE_BYTES, IMGREC_MAX_ARCHIVE_MEMBERS) and refusing the same members.
Imports: numpy and the data package.
"""

from __future__ import annotations

import errno
import hashlib
import lzma
import os
import posixpath
import shutil
import socket
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgrec.data.imageio import IMAGE_EXTENSIONS, is_image_file
from imgrec.errors import ImgrecError, UsageError, printable

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
    extraction is never mistaken for a finished one; the temporary folder is named after the process, and a
    later extraction removes those whose process is gone (killed mid-way). No member may land outside the
    target, and the members' total size and count are limited (see archive_limits). Every failure is one
    ImgrecError line.
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
    _remove_abandoned(target.parent)
    tmp = target.parent / f".{target.name}{TMP_MARK}{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover (a failed earlier try)
    try:
        tmp.mkdir()
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
    except ImgrecError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zipfile.BadZipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _extraction_error(archive, tmp, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


TMP_MARK = ".extracting."  # .<target>.extracting.<host>.<pid>: a folder being extracted, and by whom


def _remove_abandoned(folder: Path) -> None:
    """Remove temporary extraction folders left by processes of this machine that no longer run."""
    host = socket.gethostname()
    for entry in folder.glob(f".*{TMP_MARK}*"):
        owner, _, pid = entry.name.rpartition(TMP_MARK)[2].rpartition(".")
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def _extraction_error(archive: Path, tmp: Path, exc: BaseException) -> ImgrecError:
    """One line for anything that went wrong while reading or writing an archive's members."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        needed = getattr(exc, "needed", None)
        return ImgrecError(f"no space left on the device of {tmp.parent} while extracting {archive}"
                           f"{f' (it needs {needed:,} bytes)' if needed else ''}: free some space, or point "
                           f"IMGREC_CACHE at a larger disk")
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename:
        member = os.path.relpath(exc.filename, tmp) if str(exc.filename).startswith(str(tmp)) else exc.filename
        return ImgrecError(f"cannot extract {printable(member)} from {archive}: {exc.strerror}")
    kind = "zip" if archive.name.lower().endswith(".zip") else "tar"
    reason = "truncated: its data ends early" if isinstance(exc, EOFError) else _one_line(exc)
    return ImgrecError(f"{archive}: not a readable {kind} archive ({reason})")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (tarfile's 'could not be opened' lists one line per method it tried)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def archive_limits(folder: Path) -> tuple[int, int]:
    """(bytes, members) an archive may expand to: IMGREC_MAX_ARCHIVE_BYTES (default 4 GiB) and
    IMGREC_MAX_ARCHIVE_MEMBERS (default 1,000,000); the bytes never more than 90% of the free space beside folder."""
    max_bytes = _env_int("IMGREC_MAX_ARCHIVE_BYTES", DEFAULT_MAX_ARCHIVE_BYTES)
    max_members = _env_int("IMGREC_MAX_ARCHIVE_MEMBERS", DEFAULT_MAX_ARCHIVE_MEMBERS)
    return min(max_bytes, int(shutil.disk_usage(folder.parent).free * 0.9)), max_members


DEFAULT_MAX_ARCHIVE_BYTES = 4 * 1024**3
DEFAULT_MAX_ARCHIVE_MEMBERS = 1_000_000
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _env_int(name: str, default: int) -> int:
    """A positive whole number from the environment, optionally with a K, M, G or T (binary) suffix."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in "KMGT" else (text, "")
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"{name}={text!r} is not a positive whole number (e.g. 8G or 500000)")
    return int(number) * _UNITS[unit]


def _check_totals(archive: Path, target: Path, total_bytes: int, members: int) -> None:
    max_bytes, max_members = archive_limits(target)
    if members > max_members:
        raise _too_many(archive, max_members)
    if total_bytes > max_bytes:
        raise ImgrecError(f"{archive} expands to {total_bytes:,} bytes, more than the {max_bytes:,} allowed "
                          f"(IMGREC_MAX_ARCHIVE_BYTES, and at most 90% of the free space in {target.parent}): "
                          f"raise the limit, free some space, or extract it yourself")


@contextmanager
def _needing(total: int) -> Iterator[None]:
    """Extraction of `total` bytes: a full disk says how much the archive needs."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            exc.needed = total  # type: ignore[attr-defined]
        raise


def _too_many(archive: Path, max_members: int) -> ImgrecError:
    return ImgrecError(f"{archive} holds more than {max_members:,} members, the limit: raise "
                       f"IMGREC_MAX_ARCHIVE_MEMBERS if it is meant to, or extract it yourself")


def _inside(root: Path, name: str) -> Path:
    dest = (root / name).resolve()
    if dest != root and root not in dest.parents:
        raise ImgrecError(f"refusing to extract '{printable(name)}': it would land outside the target folder")
    return dest


def _extract_zip(archive: Path, target: Path) -> None:
    root = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            if os.path.isabs(info.filename) or info.filename.startswith(("/", "\\")):
                raise ImgrecError(f"refusing to extract '{printable(info.filename)}': absolute path in {archive.name}")
            _inside(root, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ImgrecError(f"refusing to extract '{printable(info.filename)}': symbolic link in {archive.name}")
        total = sum(info.file_size for info in infos)
        _check_totals(archive, target, total, len(infos))
        with _needing(total):
            zf.extractall(root)


def _extract_tar(archive: Path, target: Path) -> None:
    root = target.resolve()
    max_members = archive_limits(target)[1]
    with tarfile.open(archive) as tf:
        members, total = [], 0
        for member in tf:  # one at a time: a huge member count stops at the limit, not after reading them all
            members.append(member)
            if len(members) > max_members:
                _check_totals(archive, target, 0, len(members))
            if os.path.isabs(member.name):
                raise ImgrecError(f"refusing to extract '{printable(member.name)}': absolute path in {archive.name}")
            _inside(root, member.name)
            if not (member.isfile() or member.isdir()):
                raise ImgrecError(f"refusing to extract '{printable(member.name)}': links and devices are not allowed")
            total += member.size if member.isfile() else 0
        _check_totals(archive, target, total, len(members))
        # The 'data' filter (Python >= 3.10.12) repeats these checks and drops unsafe modes.
        with _needing(total):
            if hasattr(tarfile, "data_filter"):
                tf.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; every member was checked above
                tf.extractall(root, members=members)


ARCHIVE_IN_MEMORY_BYTES = 512 * 1024**2  # archives whose files add up to more are extracted into the cache


@dataclass
class ArchiveFiles:
    """An archive read into memory: its folder tree, and the bytes of its image files by the path each has under
    the archive's own path (/data/photos.zip/train/cat/1.jpg, so that a message names the file inside the
    archive). Other files are in the tree without their bytes."""

    tree: ArchiveNode
    files: dict[str, bytes]


def read_archive(archive: str | Path, limit: int | None = None) -> ArchiveFiles | None:
    """Read an archive's files into memory instead of extracting them (writing thousands of small files costs far
    more than decoding them). The members are checked as extraction checks them (no absolute path, none outside
    the archive's root, no link or device, the member-count limit); None when its files add up to more than
    `limit` bytes (default ARCHIVE_IN_MEMORY_BYTES) or IMGREC_MAX_ARCHIVE_BYTES: extract it instead. Every
    failure is one ImgrecError line."""
    archive = Path(archive).resolve()
    if not archive.is_file():
        raise ImgrecError(f"archive not found: {archive}")
    limit = min(ARCHIVE_IN_MEMORY_BYTES if limit is None else limit, _env_int("IMGREC_MAX_ARCHIVE_BYTES", DEFAULT_MAX_ARCHIVE_BYTES))
    max_members = _env_int("IMGREC_MAX_ARCHIVE_MEMBERS", DEFAULT_MAX_ARCHIVE_MEMBERS)
    read = _read_zip if archive.name.lower().endswith(".zip") else _read_tar
    try:
        members = read(archive, limit, max_members)
    except ImgrecError:
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zipfile.BadZipFile,
            RuntimeError, NotImplementedError) as exc:  # the last two: an encrypted or unsupported zip member
        raise _extraction_error(archive, archive, exc) from None
    if members is None:
        return None
    tree = ArchiveNode(str(archive), "dir")
    for name, data in members.items():
        clash = tree.add(name, data is not False)
        if clash:  # what extracting it would have met
            raise ImgrecError(f"cannot extract {printable(name)} from {archive}: {clash}")
    return ArchiveFiles(tree, {os.path.join(str(archive), name): data for name, data in members.items()
                               if isinstance(data, bytes)})


def _member_name(archive: Path, name: str) -> str:
    """A member's name as a normalised relative path ("" for the root), refused when absolute or outside."""
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise ImgrecError(f"refusing to extract '{printable(name)}': absolute path in {archive.name}")
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        raise ImgrecError(f"refusing to extract '{printable(name)}': it would land outside the target folder")
    return "" if normal == "." else normal


def _read_tar(archive: Path, limit: int, max_members: int) -> dict[str, bytes | bool] | None:
    """{name: the bytes of an image file, True for another file, False for a folder}, or None past `limit`."""
    members: dict[str, bytes | bool] = {}
    total = 0
    with tarfile.open(archive) as tf:
        for count, member in enumerate(tf, 1):  # one at a time, reading each file as its header passes
            if count > max_members:
                raise _too_many(archive, max_members)
            name = _member_name(archive, member.name)
            if not (member.isfile() or member.isdir()):
                raise ImgrecError(f"refusing to extract '{printable(member.name)}': links and devices are not allowed")
            total += member.size if member.isfile() else 0
            if total > limit:
                return None
            if name and member.isdir():
                members.setdefault(name, False)
            elif name and member.isfile():
                data = tf.extractfile(member)
                members[name] = data.read() if data is not None and is_image_file(name) else True
    return members


def _read_zip(archive: Path, limit: int, max_members: int) -> dict[str, bytes | bool] | None:
    """As _read_tar, for a zip archive."""
    members: dict[str, bytes | bool] = {}
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise _too_many(archive, max_members)
        for info in infos:
            _member_name(archive, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ImgrecError(f"refusing to extract '{printable(info.filename)}': symbolic link in {archive.name}")
        if sum(info.file_size for info in infos) > limit:
            return None
        for info in infos:
            name = _member_name(archive, info.filename)
            if name and info.is_dir():
                members.setdefault(name, False)
            elif name:
                members[name] = zf.read(info) if is_image_file(name) else True
    return members


class ArchiveNode:
    """A folder or file inside an archive read into memory, with the few pathlib.Path methods that scanning a
    folder uses (name, iterdir, is_dir, is_file, /, walk) and its path under the archive's (os.fspath)."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind  # kind: "dir", "file" or "absent" (a name that is not in the archive)
        self.children: dict[str, ArchiveNode] = {}

    def add(self, name: str, is_file: bool) -> str:
        """Add a member by its relative name, with the folders above it; "" when it fits, else why not (a file
        where a folder is, or the other way round)."""
        node = self
        parts = name.split("/")
        for i, part in enumerate(parts):
            kind = "file" if is_file and i == len(parts) - 1 else "dir"
            child = node.children.setdefault(part, ArchiveNode(posixpath.join(node.path, part), kind))
            if child.kind != kind:
                return "Not a directory" if kind == "dir" else "Is a directory"
            node = child
        return ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __lt__(self, other: ArchiveNode) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> ArchiveNode:
        return self.children.get(name) or ArchiveNode(posixpath.join(self.path, name), "absent")

    def iterdir(self) -> Iterator[ArchiveNode]:
        return iter(list(self.children.values()))

    def is_dir(self) -> bool:
        return self.kind == "dir"

    def is_file(self) -> bool:
        return self.kind == "file"

    def walk(self) -> Iterator[tuple[str, list[str], list[str]]]:
        """As os.walk, top-down: the caller may prune or reorder the folder names it is given."""
        if not self.is_dir():
            return
        folders = [c.name for c in self.children.values() if c.is_dir()]
        yield self.path, folders, [c.name for c in self.children.values() if c.is_file()]
        for name in folders:
            yield from self.children[name].walk()


@dataclass
class FolderSplits:
    """The files of an image folder: classes, and (path, label) lists per split that the folder defines."""

    root: Path | ArchiveNode
    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # split name -> (paths, labels)


Folder = Path | ArchiveNode  # a folder on disk, or one inside an archive read into memory


def walk(folder: Folder) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of a folder on disk or in an archive read into memory (top-down; the folder names may be pruned)."""
    return folder.walk() if isinstance(folder, ArchiveNode) else os.walk(folder)


def _visible_dirs(path: Folder) -> list[Folder]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def find_root(path: Folder) -> Folder:
    """Step down through folders that only wrap one folder (as archives often do), never into a class folder."""
    while True:
        entries = [p for p in path.iterdir() if not p.name.startswith((".", "__"))]
        if (len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in ("train",)
                and not _is_class_folder(entries[0])):
            path = entries[0]
        else:
            return path


def _is_class_folder(path: Folder) -> bool:
    """Images directly inside and no subfolders: the only class of a one-class folder, not a wrapper."""
    return not _visible_dirs(path) and any(is_image_file(p) and p.is_file() for p in path.iterdir())


def scan_folder(path: str | Path | ArchiveNode) -> FolderSplits:
    """Find the layout, the classes and the image files of a folder, or of an archive read into memory (no
    decoding)."""
    root = find_root(path if isinstance(path, ArchiveNode) else Path(path))
    subdirs = {p.name.lower(): p for p in _visible_dirs(root)}
    split_dirs: dict[str, Folder] = {}
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


def _scan_classes(folder: Folder, classes: list[str], split: str) -> tuple[list[str], list[int]]:
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
            for dirpath, dirnames, filenames in walk(class_dir)
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
