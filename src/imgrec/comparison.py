"""`imgrec compare`: finished runs side by side, as a table (printed, compare.md, compare.csv) and compare.png.

Reads only the files a run folder holds (summary.json, metrics.json, results.csv); runs tested on different
data are refused unless forced, since their accuracies do not measure the same thing.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgrec.engine.runs import data_stem, read_results
from imgrec.errors import ImgrecError, UsageError

# (header, key of a row, format for the printed and Markdown table)
COLUMNS = (
    ("run", "run", "{}"), ("data", "data", "{}"), ("model", "model", "{}"), ("params", "params", "{:,}"),
    ("epochs", "epochs", "{}"), ("test accuracy", "test_accuracy", "{:.2%}"), ("macro-F1", "macro_f1", "{:.3f}"),
    ("ECE", "ece", "{:.2%}"), ("ECE after T", "ece_calibrated", "{:.2%}"), ("train time", "train_seconds", "{:.1f}s"),
    ("images/s", "images_per_second", "{:,.0f}"),
)


@dataclass
class RunRecord:
    """What compare reads from one run folder."""

    name: str
    path: Path
    summary: dict[str, Any]
    metrics: dict[str, Any]
    val_acc: list[float]


@dataclass
class CompareOutcome:
    rows: list[dict[str, Any]]
    table: str  # Markdown
    written: list[Path]
    skipped: list[Path]  # compare's own output folders among the paths (`imgrec compare runs/*`)

    def __str__(self) -> str:
        return self.table

    def _repr_markdown_(self) -> str:
        """In a notebook: the table."""
        return self.table


def load_record(path: str | Path) -> RunRecord:
    """A finished run folder's summary, test metrics and validation curve; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise ImgrecError(f"no such run folder: {path}")
    if not (path / "weights").is_dir():
        raise ImgrecError(f"{path} holds no weights (expected {path}/weights/best.pt): is it a run folder?")
    summary, metrics = _read_json(path / "summary.json"), _read_json(path / "metrics.json")
    if summary is None or metrics is None:
        raise ImgrecError(f"{path} has no summary.json or metrics.json: its training did not finish "
                          f"(run `imgrec evaluate {path}` to test its weights)")
    rows = read_results(path / "results.csv") if (path / "results.csv").is_file() else []
    return RunRecord(path.resolve().name, path, summary, metrics, [r.get("val_acc", math.nan) for r in rows])


def data_identity(record: RunRecord) -> tuple[str, tuple[str, ...], int]:
    """What must match for test numbers to compare: the data's name, its classes and the size of the test split."""
    s = record.summary
    return data_stem(str(s.get("data", ""))), tuple(s.get("classes") or []), int(_test(record, "test_images", "count") or 0)


def _test(record: RunRecord, summary_key: str, metrics_key: str) -> Any:
    """A test-split number: from summary.json, else from metrics.json while it still describes the test split
    (`imgrec evaluate --split val` rewrites metrics.json)."""
    if record.summary.get(summary_key) is not None:
        return record.summary[summary_key]
    return record.metrics.get(metrics_key) if record.metrics.get("split", "test") == "test" else None


def compare_runs(paths: list[str | Path], out: str | Path | None = None, force: bool = False) -> CompareOutcome:
    """Compare finished runs; write compare.md, compare.csv and compare.png into out (default: <runs>/compare; the
    command passes compare/ in the current folder, so that `imgrec compare runs/*` never meets its own output)."""
    skipped = [Path(p) for p in paths if is_compare_output(p)]
    paths = [p for p in paths if not is_compare_output(p)]
    if len(paths) < 2:
        raise UsageError("compare needs at least two run folders"
                         + (f" ({', '.join(map(str, skipped))}: compare's own output, skipped)" if skipped else ""))
    records = [load_record(p) for p in paths]
    _name_uniquely(records)
    if not force:
        _check_same_data(records)
    rows = [_row(r) for r in records]
    out_dir = Path(out) if out else Path(paths[0]).parent / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out_dir / "compare.md").write_text(table)
    with (out_dir / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for _, key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    from imgrec.evaluation.charts import plot_comparison

    plot_comparison([{"name": r.name, "train_seconds": row["train_seconds"], "test_accuracy": row["test_accuracy"],
                      "val_acc": r.val_acc} for r, row in zip(records, rows)
                     if row["train_seconds"] is not None and row["test_accuracy"] is not None], out_dir / "compare.png")
    return CompareOutcome(rows, table, [out_dir / "compare.md", out_dir / "compare.csv", out_dir / "compare.png"],
                          skipped)


def is_compare_output(path: str | Path) -> bool:
    """A folder compare wrote (compare.md or compare.csv, no weights): not a run."""
    path = Path(path)
    return (path.is_dir() and not (path / "weights").is_dir()
            and any((path / name).is_file() for name in ("compare.md", "compare.csv")))


def _row(record: RunRecord) -> dict[str, Any]:
    s = record.summary
    tested = record.metrics.get("split", "test") == "test"
    calibration = (record.metrics.get("calibration") or {}) if tested else {}
    return {"run": record.name, "data": data_stem(str(s.get("data", ""))), "model": s.get("model"),
            "params": s.get("params"), "epochs": s.get("epochs"), "test_accuracy": _test(record, "test_accuracy", "accuracy"),
            "macro_f1": _test(record, "test_macro_f1", "macro_f1"), "ece": _test(record, "test_ece", "ece"),
            "ece_calibrated": s.get("test_ece_calibrated", calibration.get("ece_after")), "train_seconds": s.get("train_seconds"),
            "images_per_second": s.get("images_per_second")}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (a dash where a run lacks a number)."""
    header = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "–" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_same_data(records: list[RunRecord]) -> None:
    first = records[0]
    for other in records[1:]:
        a, b = data_identity(first), data_identity(other)
        if a != b:
            what = (f"{a[0]} vs {b[0]}" if a[0] != b[0] else f"{len(a[1])} vs {len(b[1])} classes" if a[1] != b[1]
                    else f"{a[2]:,} vs {b[2]:,} test images")
            raise ImgrecError(f"{first.path} and {other.path} were tested on different data ({what}), so their numbers "
                              f"do not compare; pass --force to compare them anyway")


def _name_uniquely(records: list[RunRecord]) -> None:
    """Runs of the same name from different projects are told apart by their parent folder."""
    names = [r.name for r in records]
    for r in records:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
