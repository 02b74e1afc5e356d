"""Run folders: runs/<name>/ with config.yaml, results.csv, weights/, summary.json and plots.

One process at a time writes into a run folder: it holds RunLock's advisory lock (flock on runs/<name>/.imgrec.lock)
for the whole command, and the operating system releases it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import yaml

from imgrec.errors import ImgrecError, UsageError, write_error

try:
    import fcntl
except ImportError:  # not on Windows: no locks there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RESULT_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
LOCK_FILE = ".imgrec.lock"
NAME_MAX = 250  # bytes of a run name: file systems allow 255 in a folder name, and taken names get a number


def check_run_name(name: str) -> str:
    """A run name is a plain folder name inside --project: no path separators, not "." or "..", not empty."""
    separators = {"/", os.sep, os.altsep or "/", "\\"}
    if not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise UsageError(f"--name {name!r} is not a plain folder name: a run name has no path separators and is not "
                         f"'.' or '..' (use --project to choose where run folders go)")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UsageError(f"--name is {len(os.fsencode(name))} bytes long: a folder name may have at most {NAME_MAX}")
    return name


def create_run_dir(project: str | Path, name: str, exist_ok: bool = False) -> tuple[Path, bool]:
    """runs/<name>, or runs/<name>2, <name>3, ... when taken (unless exist_ok); returns the folder and whether
    this call made it."""
    project = Path(project)
    check_run_name(name)
    candidate = project / name
    try:
        project.mkdir(parents=True, exist_ok=True)
        if exist_ok:
            try:
                candidate.mkdir()
                return candidate, True
            except FileExistsError:
                if not candidate.is_dir():
                    raise ImgrecError(f"{candidate} exists and is not a folder; choose another --name") from None
                return candidate, False
        n = 2
        while True:
            try:
                candidate.mkdir()
                return candidate, True
            except FileExistsError:
                candidate = project / f"{name}{n}"
                n += 1
    except OSError as exc:
        raise write_error(exc.filename or candidate, exc) from None


class RunLock:
    """Owns a run folder for as long as it is held: an exclusive, non-blocking flock on <run>/.imgrec.lock, which
    holds the owner's process id (and host) so that another process can be told who writes there. The operating
    system releases it when the process ends (kill -9 included), so it is never stale. Held again by the same
    process (a resume that trains), it is counted, not locked twice."""

    _held: ClassVar[dict[str, list[int]]] = {}  # real path of the folder -> [file descriptor, holders]

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.key = os.path.realpath(self.run_dir)

    def __enter__(self) -> RunLock:
        held = self._held.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise ImgrecError(f"{self.run_dir} is in use by {holder}: one command at a time writes into a run "
                                  f"folder; wait for it to end, or use another run folder") from None
            except OSError as exc:  # a file system without locks (some network ones): go on unlocked
                log.warning(f"cannot lock {path} ({exc.strerror}); make sure no other command writes into "
                            f"{self.run_dir} meanwhile")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # who holds it is only a courtesy (a full disk): the lock itself holds
        self._held[self.key] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        held = self._held.get(self.key)
        if held is None:  # a forked child's copy (see _forget_in_child)
            return
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            os.close(held[0])  # releases the lock


def _forget_in_child() -> None:
    """A forked child (a data loader worker) closes its copies of the lock files: the lock is the parent's alone,
    so that it is released when the parent dies, even while a worker is still winding down."""
    for fd, _ in RunLock._held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    RunLock._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _lock_holder(fd: int) -> str:
    """'process 1234' (on host x, when another) from a lock file's content."""
    try:
        words = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        words = []
    if not words or not words[0].isdigit():
        return "another process"
    host = words[1] if len(words) > 1 else ""
    return f"process {words[0]}" + (f" on {host}" if host and host != socket.gethostname() else "")


def find_run(project: str | Path, name: str, config: dict[str, Any]) -> Path | None:
    """The newest run folder of this name (runs/<name>, <name>2, ...) whose config.yaml holds this config (but
    for the folder's name and exist_ok); None when there is none."""
    pattern = re.compile(re.escape(name) + r"(\d*)")
    same = []
    for folder in Path(project).glob(f"{glob_escape(name)}*"):
        saved = folder / "config.yaml"
        if pattern.fullmatch(folder.name) and saved.is_file() and _same_config(saved, config):
            same.append((saved.stat().st_mtime_ns, folder))
    return max(same)[1] if same else None


def glob_escape(text: str) -> str:
    """text with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _same_config(path: Path, config: dict[str, Any]) -> bool:
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    ignored = ("name", "exist_ok")
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k not in ignored} == {
        k: v for k, v in config.items() if k not in ignored}


def default_run_name(data: str, model: str) -> str:
    """<data>-<model> with the data's path reduced to a short, file-safe name."""
    return f"{data_stem(data)}-{model}"


def data_stem(data: str) -> str:
    """A data set name or path as a short, file-safe name: /x/cifar10-jpeg.tar.gz -> cifar10-jpeg; data passed from
    Python (python:FashionMNIST) -> FashionMNIST."""
    stem = Path(data.removeprefix("python:").rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "data"


class ResultsLog:
    """results.csv, one row per epoch, flushed as each row is written.

    A new log starts a new file with the given rows: a run in a reused folder (--exist-ok) must not inherit the
    old run's rows, and a resumed run keeps exactly the rows of its saved state (a run killed after writing a
    row but before saving its state writes that row again).
    """

    def __init__(self, path: str | Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        write_text(self.path, _csv_lines([RESULT_FIELDS, *([_fmt(row.get(k)) for k in RESULT_FIELDS] for row in rows or [])]))

    def append(self, row: dict[str, Any]) -> None:
        try:
            with self.path.open("a", newline="") as f:
                f.write(_csv_lines([[_fmt(row.get(k)) for k in RESULT_FIELDS]]))
        except OSError as exc:
            raise write_error(self.path, exc) from None


def _csv_lines(rows: Any) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def read_results(path: str | Path) -> list[dict[str, float]]:
    """results.csv as a list of rows of floats (empty cells -> nan)."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically (write_text)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text to a temporary file of a name of its own beside path (.<name>.<random>.tmp), then rename it
    over path: readers see the old file or the new one, never a part; a failed write (a full disk, no
    permission) is one line naming the path and leaves the old file as it was."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):  # what cannot be removed now, a resume clears away
                Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc, needed=len(text.encode())) from None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
