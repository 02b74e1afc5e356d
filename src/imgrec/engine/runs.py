"""Run folders: runs/<name>/ with config.yaml, results.csv, weights/, summary.json and plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import yaml

RESULT_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def create_run_dir(project: str | Path, name: str, exist_ok: bool = False) -> Path:
    """runs/<name>, or runs/<name>2, <name>3, ... when taken (unless exist_ok)."""
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    candidate = project / name
    if exist_ok:
        candidate.mkdir(exist_ok=True)
        return candidate
    n = 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate = project / f"{name}{n}"
            n += 1


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
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(RESULT_FIELDS)
            writer.writerows([_fmt(row.get(k)) for k in RESULT_FIELDS] for row in rows or [])
        tmp.replace(self.path)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k)) for k in RESULT_FIELDS])


def read_results(path: str | Path) -> list[dict[str, float]]:
    """results.csv as a list of rows of floats (empty cells -> nan)."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written to a temp file and renamed."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
