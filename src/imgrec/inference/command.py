"""`imgrec predict`'s work: image paths (files, folders, globs) -> predictions written in a format, batch by batch;
the inputs that could not be predicted handed back one by one as they are met."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imgrec.inference.formats import MAX_SHOWN, input_caption, make_writer, save_input_sheet
from imgrec.inference.inputs import expand_paths
from imgrec.inference.predictor import Predictor
from imgrec.inference.results import Failure


@dataclass
class PredictOutcome:
    predicted: int = 0
    failures: list[Failure] = field(default_factory=list)
    input_sheet: Path | None = None  # --show-input's grid of the model's inputs, when written


def predict_paths(predictor: Predictor, paths: Sequence[str], out: TextIO, fmt: str, topk: int, batch_size: int,
                  show_input: str | None, failed: Callable[[Failure], None]) -> PredictOutcome:
    """Predict every image the paths name and write each prediction to out in format fmt (top-k of at most the
    model's classes); failed is called with each input that could not be predicted, when it is met; with
    show_input, the first inputs as the model saw them are saved as a grid there."""
    sources, failures = expand_paths(paths)
    for failure in failures:
        failed(failure)
    topk = min(topk, len(predictor.classes))
    writer = make_writer(fmt, out, sources, predictor.classes, topk)
    outcome = PredictOutcome(failures=failures)
    shown: list[Any] = []
    captions: list[str] = []
    for item in predictor.predict_files(sources, topk, batch_size, keep_inputs=bool(show_input)):
        if isinstance(item, Failure):
            outcome.failures.append(item)
            failed(item)
            continue
        writer.write(item)
        outcome.predicted += 1
        if show_input and len(shown) < MAX_SHOWN:
            shown.append(item.model_input)
            captions.append(input_caption(item))
    if shown:
        outcome.input_sheet = save_input_sheet(shown, show_input, captions)
    return outcome
