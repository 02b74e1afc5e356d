"""How `imgrec predict` prints predictions: a table for people, JSON lines or CSV for programs.

Each writer prints a row as soon as its prediction arrives, so long runs show progress and pipe well.
table: one row per image; an image that looks like none of the classes reads "unsure" (its best guesses
still show in the top-k column). json: one object per line, {"path", "label", "probability", "topk",
"in_distribution"}. csv: a header, then path, label, probability, in_distribution and label_i,
probability_i for each rank. `save_input_sheet` writes what the model saw (--show-input). Imports no torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from imgrec.data.photo import tile_images
from imgrec.errors import printable
from imgrec.inference.results import Prediction

FORMATS = ("table", "json", "csv")
UNSURE = "unsure"
MAX_SHOWN = 64  # model inputs saved by --show-input at most


class TableWriter:
    """Aligned columns: image, prediction (or "unsure"), probability, top-k."""

    def __init__(self, out: TextIO, sources: Sequence[str], classes: Sequence[str], topk: int) -> None:
        self.out = out
        self.path_width = min(max([len("image"), *(len(printable(s)) for s in sources)]), 60)
        self.label_width = max(len("prediction"), len(UNSURE), *map(len, classes))
        self.topk = topk
        self.started = False

    def write(self, p: Prediction) -> None:
        if not self.started:
            self.started = True
            print(f"{'image':<{self.path_width}}  {'prediction':<{self.label_width}}  {'prob':>6}  top {self.topk}",
                  file=self.out)
        label = UNSURE if p.in_distribution is False else p.label
        top = ", ".join(f"{name} {prob:.1%}" for name, prob in p.topk)
        print(f"{_fit(printable(p.source), self.path_width):<{self.path_width}}  {label:<{self.label_width}}  "
              f"{p.probability:>6.1%}  {top}", file=self.out, flush=True)


class JsonWriter:
    """One JSON object per line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, p: Prediction) -> None:
        print(json.dumps(p.to_dict()), file=self.out, flush=True)


class CsvWriter:
    """A header row, then one row per image; in_distribution is true, false or empty (no threshold)."""

    def __init__(self, out: TextIO, topk: int) -> None:
        self.out = out
        self.writer = csv.writer(out)
        ranks = [f"{field}_{i}" for i in range(1, topk + 1) for field in ("label", "probability")]
        self.header = ["path", "label", "probability", "in_distribution", *ranks]
        self.started = False

    def write(self, p: Prediction) -> None:
        if not self.started:
            self.started = True
            self.writer.writerow(self.header)
        flag = "" if p.in_distribution is None else str(p.in_distribution).lower()
        ranks = [value for name, prob in p.topk for value in (name, f"{prob:.6f}")]
        self.writer.writerow([p.source, p.label, f"{p.probability:.6f}", flag, *ranks])
        self.out.flush()


def make_writer(fmt: str, out: TextIO, sources: Sequence[str], classes: Sequence[str],
                topk: int) -> TableWriter | JsonWriter | CsvWriter:
    """The writer for a --format value; topk is the number of ranks each row shows."""
    if fmt == "table":
        return TableWriter(out, sources, classes, topk)
    if fmt == "json":
        return JsonWriter(out)
    if fmt == "csv":
        return CsvWriter(out, topk)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _fit(text: str, width: int) -> str:
    """Long paths keep their end (the file name), with an ellipsis in front."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def save_input_sheet(inputs: Sequence[Any], path: str | Path, captions: Sequence[str] | None = None) -> Path:
    """Save model inputs (uint8 (C, H, W) tensors or arrays), enlarged without smoothing, as one PNG grid, each
    with its caption (file name and prediction) under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.stack([np.asarray(x) for x in inputs[:MAX_SHOWN]])
    tile_images(images, captions=captions).save(path, format="PNG")
    return path


def input_caption(prediction: Any) -> str:
    """'cat.jpg: dog 87%', or 'unsure' for an image that looks like none of the classes."""
    label = UNSURE if prediction.in_distribution is False else f"{prediction.label} {prediction.probability:.0%}"
    return f"{Path(prediction.source).name}: {label}"
