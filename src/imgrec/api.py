"""imgrec from Python: `imgrec.train(data, model=..., **settings) -> Run`, `imgrec.load(run) -> Run` and
`imgrec.compare(*runs)`.

train takes what `imgrec train` takes (a data set name, a folder, an archive; a registry model name) and also
Python objects: a torch Dataset of (image, label), NumPy (x, y) pairs or a dict {"train", "val", "test"} of
them (data/memory.py), and a model written in Python (an nn.Module instance, its class, or a callable
(num_classes, in_channels, image_size) -> nn.Module). Both go through the same workflows.train as the CLI.
A weights file records a Python model's module and class name only; loading it needs the class again
(imgrec.load(run, model=Classifier)): imgrec never imports code named in a file.
Errors are exceptions (ImgrecError, one line); nothing here exits the interpreter.
"""

from __future__ import annotations

import base64
import difflib
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgrec import reporting, saved_runs, workflows
from imgrec.comparison import CompareOutcome, compare_runs
from imgrec.config import RunConfig
from imgrec.data.memory import is_python_data, python_bundle, to_splits
from imgrec.engine import trainer
from imgrec.engine.checkpoint import load_weights_file, resolve_weights, run_dir_of
from imgrec.engine.runs import data_stem, read_results
from imgrec.errors import ImgrecError, Interrupted, UsageError
from imgrec.explanations import ExplainOutcome, explain_run
from imgrec.inference import Prediction, Predictor
from imgrec.models.registry import is_user_model, user_model

log = logging.getLogger("imgrec")

Builder = Callable[[int, int, Sequence[int]], nn.Module]


def train(data: Any, model: Any = None, *, classes: Sequence[str] | None = None, verbose: bool = True,
          **settings: Any) -> Run:
    """Train a classifier and return its Run (the run folder, its numbers, predict, evaluate, export, resume).

    data: a data set name, an image folder or archive; or a torch Dataset of (image, label), an (x, y) pair of
    arrays, or a dict {"train": ..., "val": ..., "test": ...} of them (val missing: carved from train; test
    missing: the final test is on val). classes: class names for data that has none (default "0".."K-1").
    model: a registry name (`imgrec models`; default lenet, or the recipe's choice), an nn.Module, its class, or
    a callable (num_classes, in_channels, image_size) -> nn.Module. settings: RunConfig's fields (epochs=, lr=,
    recipe=, time_budget=, project=, name=, ...). verbose=False hides the progress bars and the line per epoch.
    """
    _check_settings(settings)
    return _interruptible(lambda: train_run(data, model, settings, classes=classes, verbose=verbose))[0]


def train_run(data: Any, model: Any, settings: dict[str, Any], *, given: set[str] | None = None,
              started: float | None = None, classes: Sequence[str] | None = None, verbose: bool = True,
              source_name: str = "imgrec.train") -> tuple[Run, workflows.TrainOutcome]:
    """imgrec.train with what `imgrec train` also needs: the settings given explicitly (default: those passed,
    data and model), the time the command started (--time-budget counts from it), the workflow's outcome."""
    cfg, source, builder = _run_config(data, model, settings, classes, source_name)
    chosen = set(settings) | {"data"} | ({"model"} if model is not None else set()) if given is None else given
    with _speaking(verbose), _registered(cfg.model, builder):
        outcome = workflows.train(cfg, given=chosen, started=started, data=source)
    return Run(outcome.run_dir, source=source, model=(cfg.model, builder)), outcome


def lr_find(data: Any, model: Any = None, *, classes: Sequence[str] | None = None, out: str | Path = "lr_find.png",
            steps: int = workflows.LR_FIND_STEPS, verbose: bool = True, **settings: Any) -> workflows.LRFindOutcome:
    """The learning-rate range test (what `imgrec lr-find` runs) for train's data, model and settings: a copy of
    the model trains up to `steps` steps while the rate grows from 1e-7 to 10. Returns the outcome: .suggestion
    (the rate to pass as lr=), .result (rates and losses of each step), .plot (the figure written to out)."""
    _check_settings(settings)
    if steps < 10:
        raise UsageError("steps must be at least 10")
    cfg, source, builder = _run_config(data, model, settings, classes, "imgrec.lr_find")
    chosen = set(settings) | {"data"} | ({"model"} if model is not None else set())
    with _speaking(verbose), _registered(cfg.model, builder):
        return workflows.lr_find(cfg, out=out, steps=steps, given=chosen, data=source)


def _run_config(data: Any, model: Any, settings: dict[str, Any], classes: Sequence[str] | None, source_name: str,
                ) -> tuple[RunConfig, saved_runs.DataSource | None, Builder | None]:
    """The RunConfig of data, model and settings, the data source of data passed from Python, the model's builder."""
    source = None
    if is_python_data(data):
        splits = to_splits(data, classes, settings.get("image_size"))
        source = partial(python_bundle, splits)
        data_name = splits.name
    else:
        if classes is not None:
            raise UsageError("classes= names the classes of data passed from Python; a data set or folder has its own")
        data_name = str(data)
    model_name, builder = _model_builder(model) if model is not None else (None, None)
    values = {**settings, "data": data_name, **({"model": model_name} if model_name else {})}
    if builder is not None and "name" not in settings:  # <data>-<class>, not the class's whole import path
        values["name"] = f"{data_stem(data_name)}-{model_name.rpartition('.')[2]}"
    cfg = RunConfig.from_dict(values, source=source_name)
    if builder is not None and source is not None and cfg.channels_last and "channels_last" not in settings:
        cfg.channels_last = _takes_channels_last(builder, source)
    return cfg, source, builder


def load(run_or_weights: str | Path, model: Any = None, data: Any = None,
         classes: Sequence[str] | None = None) -> Run:
    """A finished (or stopped) run as a Run, from its folder or a weights file.

    model: the class (or instance, or builder) of a run trained with a model written in Python: imgrec records
    its name but never imports it. data: the run's data again when it was passed from Python (for evaluate,
    export's check and resume)."""
    path = resolve_weights(run_or_weights)
    ckpt = load_weights_file(path)
    name = ckpt["model"]["name"]
    builder = None
    if model is not None:
        if not is_user_model(name):
            raise UsageError(f"{path} holds imgrec's model {name!r}: leave out model=")
        builder = _model_builder(model)[1]
    with _registered(name, builder):
        saved_runs.load_run(path)  # the model is rebuilt and its weights loaded now: a wrong class fails here
    source = None
    if data is not None:
        splits = to_splits(data, classes, tuple(ckpt["image_size"]))
        source = partial(python_bundle, splits)
    return Run(run_dir_of(path), source=source, model=(name, builder), weights=path)


def compare(*runs: Run | str | Path, out: str | Path | None = None, force: bool = False) -> CompareOutcome:
    """Finished runs side by side (as `imgrec compare`): test accuracy, macro-F1, calibration, training time and
    speed. Writes compare.md, compare.csv and compare.png into out (default: compare/ beside the first run) and
    returns the table (.rows, .table in Markdown; a notebook shows it as a table). Runs tested on different data
    are refused unless force=True."""
    return compare_runs([run.dir if isinstance(run, Run) else run for run in runs], out=out, force=force)


class Run:
    """A training run: its folder, numbers and model, ready to predict, evaluate, export or train further."""

    def __init__(self, folder: str | Path, source: saved_runs.DataSource | None = None,
                 model: tuple[str, Builder | None] | None = None, weights: Path | None = None) -> None:
        self.dir = Path(folder)
        self._source = source
        self._model = model
        self._weights = weights
        self._predictor: Predictor | None = None

    def __repr__(self) -> str:
        accuracy = self.test_accuracy
        shown = f", test accuracy {accuracy:.2%}" if accuracy is not None else ""
        return f"Run({str(self.dir)!r}{shown})"

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: data, model, epochs, test accuracy and loss, times, ... ({} before the run finished)."""
        path = self.dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per epoch (results.csv): epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds."""
        path = self.dir / "results.csv"
        return read_results(path) if path.is_file() else []

    @property
    def test_accuracy(self) -> float | None:
        return self.summary.get("test_accuracy")

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def weights(self) -> Path:
        """The weights file predictions come from: weights/best.pt (else last.pt), or the file loaded."""
        return self._weights or resolve_weights(self.dir)

    @property
    def predictor(self) -> Predictor:
        """The Predictor of the run's weights (what `imgrec predict` uses)."""
        if self._predictor is None:
            with self._context():
                self._predictor = Predictor.from_run(self.weights)
        return self._predictor

    def predict(self, images: Any, topk: int = 3) -> list[Prediction]:
        """Predict paths, PIL images, arrays (H, W[, C]) or uint8 tensors: the answers of `imgrec predict`."""
        return self.predictor.predict(images, topk=topk)

    def evaluate(self, split: str = "test") -> dict[str, Any]:
        """Evaluate the weights on a split of the run's data; writes metrics.json and report.html (as `imgrec
        evaluate`) and returns what metrics.json holds."""
        with self._context():
            return reporting.evaluate_run(self.weights, split=split, source=self._source)

    def export(self, path: str | Path | None = None, format: str = "onnx") -> Path:
        """Export to ONNX (preprocessing inside) or safetensors, checked against PyTorch; returns the file."""
        from imgrec.export.runner import export_run

        with self._context():
            return export_run(self.weights, fmt=format, out=path, source=self._source).path

    def explain(self, images: Sequence[str | Path] = (), mistakes: int = 0, out: str | Path | None = None,
                method: str = "auto") -> ExplainOutcome:
        """Heat-maps of where the model looks (as `imgrec explain`): one PNG per image file and per worst test
        mistake (the first `mistakes`), in out (default: <run>/explanations). Grad-CAM on the last convolution
        with a spatial output, found by running the model (a model written in Python too); input-gradient
        saliency for models without convolutions. method: "auto", "gradcam" or "saliency"."""
        with self._context():
            return explain_run(self.weights, [str(image) for image in images], mistakes=mistakes, out=out,
                               method=method, source=self._source)

    def resume(self, epochs: int | None = None, verbose: bool = True, **settings: Any) -> Run:
        """Train the run further (to `epochs` in all), exactly as if it had not stopped; returns the Run."""
        _check_settings(settings)
        given = {**settings, **({"epochs": epochs} if epochs is not None else {})}
        with _speaking(verbose), self._context():
            outcome = _interruptible(lambda: workflows.resume(self.dir, given, data=self._source))
        self._predictor = None
        return Run(outcome.run_dir, source=self._source, model=self._model)

    def _repr_html_(self) -> str:
        """In a notebook: the headline numbers and results.png."""
        from html import escape

        s = self.summary
        rows = [("run", str(self.dir)), ("data", s.get("data")), ("model", s.get("model"))]
        if s:
            rows += [("test accuracy", f"{s['test_accuracy']:.2%}"), ("test loss", f"{s['test_loss']:.4f}"),
                     ("epochs", f"{s.get('epochs')} (best {s.get('best_epoch')})"),
                     ("training", f"{s.get('train_seconds', 0):.1f}s")]
        table = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                        for k, v in rows)
        png = self.dir / "results.png"
        image = (f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}' "
                 f"style='max-width:640px'>" if png.is_file() else "")
        return f"<div><table>{table}</table>{image}</div>"

    def _context(self) -> Any:
        name, builder = self._model or ("", None)
        return _registered(name, builder)


def _check_settings(settings: dict[str, Any]) -> None:
    """Settings are RunConfig's fields; another name is a TypeError naming the nearest one."""
    known = sorted(f.name for f in fields(RunConfig))
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown setting {key!r}{hint} (the settings are RunConfig's fields)")


def _model_builder(model: Any) -> tuple[str, Builder | None]:
    """A registry name, or a Python model: its "<module>.<class>" name and a checked builder."""
    if isinstance(model, nn.Module):
        kind, make = type(model), _InstanceBuilder(model)
    elif callable(model):
        kind, make = model, partial(_call_builder, model)
    else:  # a name (RunConfig and the registry check it)
        return model, None
    name = f"{kind.__module__}.{kind.__qualname__}"
    return name, partial(_checked, make, kind.__qualname__)


class _InstanceBuilder:
    """The user's module itself the first time (it is trained in place), copies of it after that."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.used = module, False

    def __call__(self, num_classes: int, in_channels: int, image_size: Sequence[int]) -> nn.Module:
        if self.used:
            import copy

            return copy.deepcopy(self.module)
        self.used = True
        return self.module


def _call_builder(make: Callable[..., Any], num_classes: int, in_channels: int, image_size: Sequence[int]) -> Any:
    """A class or function called with (num_classes, in_channels, image_size) when it takes them, else with none."""
    try:
        signature = inspect.signature(make)
    except (TypeError, ValueError):
        return make(num_classes, in_channels, image_size)
    try:
        signature.bind(num_classes, in_channels, image_size)
        return make(num_classes, in_channels, image_size)
    except TypeError:
        pass
    try:
        signature.bind()
    except TypeError:
        raise UsageError(f"model={getattr(make, '__qualname__', make)} must take no arguments or (num_classes, "
                         f"in_channels, image_size)") from None
    return make()


def _checked(make: Builder, what: str, num_classes: int, in_channels: int, image_size: Sequence[int]) -> nn.Module:
    """Build the user's model and run it once on a batch of zeros: it must give one logit per class."""
    net = make(num_classes, in_channels, image_size)
    if not isinstance(net, nn.Module):
        raise UsageError(f"model={what} gave a {type(net).__name__}, not an nn.Module")
    if any(p.is_meta for p in net.parameters()):
        return net
    shape = (2, in_channels, *image_size)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(shape, device=device))
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ImgrecError(f"model {what} fails on a batch of images of shape {shape}: {first}") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ImgrecError(f"model {what} must return logits of shape (batch, {num_classes}); it returns {got}")
    if out.shape[1] != num_classes:
        raise ImgrecError(f"model {what} gives {out.shape[1]} outputs per image but the data has {num_classes} "
                          f"classes: make its last layer give {num_classes}")
    return net


def _takes_channels_last(builder: Builder, source: saved_runs.DataSource) -> bool:
    """Whether a Python model runs on channels-last batches (a view() on them fails); else batches stay contiguous."""
    splits = source.args[0] if isinstance(source, partial) else None
    if splits is None:
        return True
    images = splits.splits["train"].images
    if images.shape[1] == 1:  # one channel: the two layouts are the same
        return True
    import copy

    probe = builder(len(splits.classes), images.shape[1], tuple(images.shape[2:]))
    if isinstance(probe, nn.Module) and isinstance(builder, partial) and isinstance(builder.args[0], _InstanceBuilder):
        builder.args[0].used = False  # the probe was the user's module itself: training gets it again
        probe = copy.deepcopy(probe)
    x = torch.zeros((2, *images.shape[1:])).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            probe.eval()(x)
    except RuntimeError:
        log.info("model: batches stay contiguous (the model does not take channels-last ones; pass channels_last=False "
                 "to say so)")
        return False
    return True


@contextmanager
def _registered(name: str, builder: Builder | None) -> Iterator[None]:
    with user_model(name, builder) if builder is not None else nullcontext():
        yield


@contextmanager
def _speaking(verbose: bool) -> Iterator[None]:
    """Progress without any logging set-up: one line per epoch (and the run's notes) on stdout, tqdm.auto bars in a
    notebook with ipywidgets; verbose=False: warnings only, no bars."""
    handler = None
    level, bars = log.level, trainer.progress_bars
    if not verbose:
        log.setLevel(logging.WARNING)
    elif not logging.getLogger().handlers and not log.handlers:  # logging set up by the caller is left as it is
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    trainer.progress_bars = (_widgets() if "ipykernel" in sys.modules else None) if verbose else False
    try:
        yield
    finally:
        log.setLevel(level)
        trainer.progress_bars = bars
        if handler is not None:
            log.removeHandler(handler)


def _widgets() -> bool:
    """Whether a notebook can show tqdm's widget bars (ipywidgets); without it the line per epoch is the progress."""
    from importlib.util import find_spec

    return find_spec("ipywidgets") is not None


def _interruptible(call: Callable[[], Any]) -> Any:
    """Ctrl-C stops at the next safe point and saves; then KeyboardInterrupt (with how to resume) is raised."""
    try:
        return call()
    except Interrupted as exc:
        raise KeyboardInterrupt(str(exc)) from None
