"""The model card `imgrec serve` shows: data set, model, classes, test accuracy and when it was measured.

Read from the weights file (always there) and, when the weights sit in a run folder, its metrics.json and
summary.json (either may be missing: a weights file copied on its own still gets a card). Standard library only.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def model_card(weights_path: Path, run_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready description of the model behind a server: where it came from and how well it did."""
    metrics = _read_json(run_dir / "metrics.json")
    summary = _read_json(run_dir / "summary.json")
    spec, config = ckpt.get("model") or {}, ckpt.get("config") or {}
    ood = ckpt.get("ood") if isinstance(ckpt.get("ood"), dict) else None
    evaluated = (_utc_date(run_dir / "metrics.json") if metrics else None) or _utc_date(weights_path)
    return {
        "run": run_dir.name,
        "weights": weights_path.name,
        "data": ckpt.get("data") or config.get("data"),
        "model": spec.get("name"),
        "params": summary.get("params"),
        "classes": list(ckpt.get("classes") or []),
        "input": {"channels": ckpt.get("channels"), "size": list(ckpt.get("image_size") or [])},
        "epochs": summary.get("epochs") or ckpt.get("epoch"),
        "test_accuracy": _number(metrics.get("accuracy")) if metrics.get("split", "test") == "test" else None,
        "test_images": metrics.get("count") if metrics.get("split", "test") == "test" else None,
        "macro_f1": _number(metrics.get("macro_f1")),
        "date": evaluated,
        "temperature": _number(ckpt.get("temperature")),
        "ood": {"score": ood.get("score"), "threshold": _number(ood.get("threshold"))} if ood else None,
        "versions": ckpt.get("versions") or {},
    }


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when it is missing or unreadable (the card then says less)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    """A finite number as a float, else None (JSON has no NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _utc_date(path: Path) -> str | None:
    """A file's modification time as an ISO date-time in UTC (when the run wrote it)."""
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return None
