"""The `imgrec` command: parse arguments, call a workflow, print the result, exit with a clear code.

Exit codes: 0 ok, 1 a problem with data or files (one line on stderr), 2 a usage error, 130 interrupted.
Torch is imported only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from imgrec import __version__
from imgrec.config import DEVICES, RunConfig, default_cache_dir, default_data_dir, load_yaml
from imgrec.errors import ImgrecError, Interrupted, UsageError, os_error_cause
from imgrec.openmp import patient_threads

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line ("imgrec train: error: ...") with exit code 2, and a flag is only
    ever its full name (--epoch is not taken as --epochs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """Unknown arguments are reported by the command they were given to, with the nearest flag it has."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            owner = _subparsers(self).choices.get(command, self) if command else self
            owner.error(_unrecognized(owner, extras))
        return parsed


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized arguments: --epcohs 3; did you mean --epochs?' (the suggestion when one flag is close)."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1, cutoff=0.75)
            if close:
                return f"{message}; did you mean {close[0]}?"
    return message


# The short forms of the flags typed most; the same letter means the same thing on every command that has the flag.
SHORT = {"data": "-d", "model": "-m", "epochs": "-e", "batch_size": "-b", "out": "-o"}

# Second names of flags that torchrun's own parser refuses anywhere on its command line, the script's arguments
# included: it takes --log for a shortening of its --log-dir / --logs-specs. Under torchrun, write --logger.
SECOND_NAMES = {"log": "--logger"}

# The help groups of `train --help`: the RunConfig field that opens each (fields keep their order in RunConfig).
TRAIN_GROUPS = {"data": "data", "model": "model", "pretrained": "transfer learning (torchvision backbones)",
                "optimizer": "optimisation", "epochs": "schedule and stopping", "device": "compute",
                "project": "output"}


def _default_shown(f: Any, default: Any) -> str:
    """' (default: X)', unless the help text says its default itself or there is none to show."""
    help_text = f.metadata.get("help", "")
    if "default:" in help_text or default is None:
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    return f" (default: {default})"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, in help groups: --batch-size N, --amp/--no-amp for booleans, lists as
    several values. Each shows its default once."""
    hints = typing.get_type_hints(RunConfig)
    group: Any = parser
    for f in fields(RunConfig):
        if f.name in TRAIN_GROUPS:
            group = parser.add_argument_group(TRAIN_GROUPS[f.name])
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        flag = "--" + f.name.replace("_", "-")
        flags = [SHORT[f.name], flag] if f.name in SHORT else [flag]
        flags += [SECOND_NAMES[f.name]] if f.name in SECOND_NAMES else []
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')}{_default_shown(f, default)}"
        options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(base) is list:
            group.add_argument(*flags, type=typing.get_args(base)[0], nargs="+", metavar=f.metadata.get("metavar", "X"),
                               **options)
        elif "words" in f.metadata:  # a number or a word: --lr 0.01, --lr find
            group.add_argument(*flags, type=str, metavar=f"{f.name.upper()}|{'|'.join(f.metadata['words'])}", **options)
        else:
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]  # argparse shows them as {a,b,c}
            else:
                options["metavar"] = f.name.upper()
            group.add_argument(*flags, type=base, **options)


def _add_data_dir(parser: argparse.ArgumentParser, of_a_run: bool = False) -> None:
    """--data-dir: where named data sets live; for a run, where its data set is read from."""
    default = "where the run was trained from, else " if of_a_run else ""
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"where named data sets live (default: {default}$IMGREC_DATA or ~/.cache/imgrec/data)")


def _add_device(parser: argparse.ArgumentParser, of_a_run: bool = False) -> None:
    """--device: auto by default, or (of_a_run) the device the run was trained on."""
    parser.add_argument("--device", default=None if of_a_run else "auto", choices=DEVICES,
                        help="device (default: the run's)" if of_a_run else "device (default: auto)")


def _add_predict_parser(sub: Any) -> None:
    """The `predict` sub-command's arguments."""
    p = sub.add_parser("predict", help="predict the classes of images (files, folders, globs)",
                       description="Predict the classes of images with a run's weights; 'unsure' marks images that "
                                   "look like none of its classes. Unreadable inputs are named on stderr (exit 1).")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files, folders (searched recursively), globs ('x/*.jpg')")
    p.add_argument("--topk", type=int, default=3, help="how many best classes to show per image (default: 3)")
    p.add_argument("--format", default="table", choices=("table", "json", "csv"),
                   help="table, JSON lines or CSV on stdout (default: table)")
    p.add_argument(SHORT["batch_size"], "--batch-size", type=int, default=256, help="images per model call (default: 256)")
    p.add_argument("--no-auto-preprocess", dest="auto_preprocess", action="store_false",
                   help="do not convert photos like the training images (grey models of light strokes on dark: "
                        "invert, crop, centre); only resize")
    p.add_argument("--show-input", metavar="PNG", help="save what the model saw (the first 64 images) as a PNG grid")
    _add_device(p)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _add_serve_parser(sub: Any) -> None:
    """The `serve` sub-command's arguments."""
    p = sub.add_parser("serve", help="a local web page and JSON API to try a run's model",
                       description="Serve a page (drop or photograph an image: top classes, 'unsure', what the model "
                                   "saw, the model card) and a JSON API (POST /api/predict, GET /api/model, /healthz, "
                                   "docs at /docs). Needs the serve extra: pip install 'imgrec[serve]'.")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; anything else warns: no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest upload accepted, in MB; larger ones get 413 before they are read (default: 10)")
    p.add_argument("--threads", dest="workers_threads", type=int, default=1, metavar="N",
                   help="predictions running at once, each in a worker thread; torch gets the CPU cores divided "
                        "among them (default: 1)")
    p.add_argument("--workers-threads", dest="workers_threads", type=int, action=_Renamed, new="--threads",
                   help=argparse.SUPPRESS)
    _add_device(p)


def _add_export_parser(sub: Any) -> None:
    """The `export` sub-command's arguments."""
    p = sub.add_parser("export", help="ship a run's model: ONNX (checked against PyTorch) or safetensors",
                       description="Write a run's model as ONNX (uint8 images (N, H, W, C) in, preprocessing inside "
                                   "the graph, logits and probabilities out, checked with onnxruntime against PyTorch "
                                   "on the run's validation images) or as safetensors plus a JSON sidecar.")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument("--format", choices=("onnx", "safetensors"),
                   help="onnx or safetensors (default: what --out's suffix names, else onnx)")
    p.add_argument(SHORT["out"], "--out", metavar="PATH", help="file (or folder) to write (default: beside the weights file, "
                                                 "e.g. runs/<run>/weights/best.onnx)")
    p.add_argument("--weights", choices=("best", "last"), help="which weights of a run folder (default: best)")
    p.add_argument("--check-images", type=int, default=256, metavar="N",
                   help="compare the export with PyTorch on N validation images (test images when the run has no "
                        "validation split); 0: no check (default: 256)")
    _add_data_dir(p, of_a_run=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgrec", description="Train, evaluate and look at image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgrec {__version__}")
    _add_loudness(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_training_parsers(sub)
    _add_doctor_parser(sub)
    _add_evaluate_parser(sub)
    _add_show_parser(sub)
    _add_understanding_commands(sub)
    _add_predict_parser(sub)
    _add_serve_parser(sub)
    _add_export_parser(sub)
    sub.add_parser("models", help="list the models", description="List the models with their parameter counts.")
    p = sub.add_parser("datasets", help="list the data sets", description="List named data sets and where they are.")
    _add_data_dir(p)
    for command in sub.choices.values():  # -v and -q after the command too: `imgrec train -q ...`
        _add_loudness(command, argparse.SUPPRESS)
    return parser


def _add_training_parsers(sub: Any) -> None:
    """train and lr-find: the settings of a run as flags (generated from RunConfig)."""
    p = sub.add_parser("train", help="train a model; writes runs/<name>/", description="Train a model on a data set.",
                       usage="%(prog)s [--config YAML | --resume RUN] [options]")
    p.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags override it)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its train_state.pt (only "
                   "--epochs, --patience, --workers, --threads, --save-every-minutes and --dist-timeout may change)")
    _add_config_flags(p)

    p = sub.add_parser("lr-find", help="learning-rate range test: suggests --lr for a data set and model",
                       description="Train a copy of the model for a few hundred steps while the learning rate grows "
                                   "exponentially (from 1e-7 to 10), stop when the loss diverges, and suggest a rate: a "
                                   "third of the one at which the smoothed loss is lowest. Takes train's settings "
                                   "(optimiser, batch size, augmentation, --balance ...); writes a figure of the loss "
                                   "against the rate. `imgrec train --lr find` runs it first and trains with the "
                                   "suggestion.", usage="%(prog)s [--config YAML] [--out PNG] [--steps N] [options]")
    p.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags override it)")
    p.add_argument(SHORT["out"], "--out", metavar="PNG", default="lr_find.png",
                   help="the figure to write (default: lr_find.png)")
    p.add_argument("--steps", type=int, default=200, metavar="N",
                   help="steps of the test, at most (it stops when the loss diverges; default: 200)")
    _add_config_flags(p)


def _add_doctor_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check a data set before training: bad files, duplicates, leakage, balance",
                       description="Check a data set (a name, an image folder or an archive) before any training: "
                                   "counts per class and split, image sizes and modes, files that do not decode, "
                                   "exact and near duplicates within and across splits, class imbalance, "
                                   "EXIF-rotated files; with a suggested fix for each problem. Exit code 0 when "
                                   "clean, 1 when problems were found.")
    p.add_argument("data", metavar="DATA", help="data set name, or a path to an image folder or archive")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, help="decoding processes (default: CPU count, at most 4)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the splits imgrec makes, as in training (default: 0)")
    p.add_argument("--near", type=int, default=None, metavar="BITS",
                   help="perceptual-hash distance (of 64 bits) up to which two images are near-duplicate candidates, "
                        "confirmed on thumbnails (default: 6)")


def _add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate saved weights; writes metrics.json, figures and report.html",
                       description="Evaluate a run's weights on a split of its data (or of --data) and write "
                                   "metrics.json, confusion matrices, mistakes, samples, a reliability diagram and "
                                   "report.html.")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument(SHORT["data"], "--data", help="evaluate on this data set instead (it must have the same classes)")
    _add_data_dir(p, of_a_run=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default: test)")
    _add_device(p, of_a_run=True)
    p.add_argument(SHORT["out"], "--out", metavar="DIR", help="folder for metrics.json, the figures and report.html "
                                                "(default: the run folder)")


def _add_show_parser(sub: Any) -> None:
    p = sub.add_parser("show", help="save a grid of sample images with labels",
                       description="Save a PNG grid of de-normalised sample images and their labels.")
    p.add_argument(SHORT["data"], "--data", default="digits", help="data set name or path (default: digits)")
    _add_data_dir(p)
    p.add_argument("--n", type=int, default=32, help="number of images (default: 32)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="split (default: train)")
    p.add_argument("--augmented", action="store_true", help="show images as training augments them")
    p.add_argument("--augment", default="auto", help="augmentations for --augmented (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="which random sample (default: 0)")
    p.add_argument("--image-size", type=int, help="resize folder images to this size")
    p.add_argument(SHORT["out"], "--out", help="PNG file to write (default: samples-<data>.png)")


def _add_loudness(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show tracebacks and debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only the result, warnings and errors: no progress, per-epoch lines or notes")


class _Renamed(argparse.Action):
    """An old flag name that still works (hidden from --help); main() says once what it is called now."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        renamed = getattr(namespace, "renamed", [])
        namespace.renamed = [*renamed, f"{option_string} is now called {self.new} (the old name still works)"]


def _add_understanding_commands(sub: argparse._SubParsersAction) -> None:
    """The explain and compare sub-commands."""
    p = sub.add_parser("explain", help="heat-maps of where a run's model looks (Grad-CAM, saliency)",
                       description="Write one PNG per image: the image, and a heat-map of the pixels that drive the top "
                                   "prediction (Grad-CAM on the last convolution; input-gradient saliency for models "
                                   "without one).")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument("images", metavar="IMAGE", nargs="*", help="image files to explain")
    p.add_argument("--mistakes", type=int, default=0, metavar="N", help="also explain the N most confident test mistakes")
    p.add_argument("--method", default="auto", choices=("auto", "gradcam", "saliency"),
                   help="auto: Grad-CAM when the model has a convolution, else saliency (default: auto)")
    _add_device(p, of_a_run=True)
    p.add_argument(SHORT["out"], "--out", metavar="DIR", help="folder for the PNGs (default: <run>/explanations)")
    _add_data_dir(p, of_a_run=True)

    p = sub.add_parser("compare", help="compare finished runs side by side",
                       description="Print a table of finished runs (data, model, params, epochs, test accuracy, "
                                   "macro-F1, ECE, training time, images/s) and write compare.md, compare.csv and "
                                   "compare.png.")
    p.add_argument("runs", metavar="RUN", nargs="+", help="two or more run folders")
    p.add_argument("--force", action="store_true", help="compare runs tested on different data")
    p.add_argument(SHORT["out"], "--out", metavar="DIR", help="folder for the files (default: compare/ in the current folder)")


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given in --config and as flags (flags win); unset ones are absent."""
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    known = {f.name for f in fields(RunConfig)}
    values.update({k: v for k, v in vars(args).items() if k in known})
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from imgrec.evaluation.drawing import workers_ahead

    with workers_ahead():  # the figure workers, forked before torch loads: the run's drawer takes them over
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    started = args.started  # --time-budget counts from main(): importing torch is part of the run
    from imgrec.api import train_run  # imgrec.train's code path: the flags are its settings
    from imgrec.workflows import resume

    if args.quiet:
        from imgrec.engine import trainer

        trainer.progress_bars = False
    if args.resume:
        outcome = resume(args.resume, _given_settings(args))
    else:
        settings = _given_settings(args)
        given = set(settings)
        data, model = settings.pop("data", RunConfig.data), settings.pop("model", None)
        _, outcome = train_run(data, model, settings, given=given, started=started,
                               source_name=args.config or "the command line")
    if not outcome.main_process:  # another process of a torchrun group: the main one reports
        return 0
    s = outcome.summary
    print(f"run folder: {outcome.run_dir}")
    if outcome.already_finished:
        print(f"{outcome.run_dir} has already finished ({s['epochs']} epochs, test accuracy {s['test_accuracy']:.2%}): "
              f"nothing to do; resume with a larger --epochs (or --patience) to train it further")
        return 0
    print(f"test accuracy: {s['test_accuracy']:.2%} (test loss {s['test_loss']:.4f}, best epoch {s['best_epoch']}/"
          f"{s['epochs']}, {s['train_seconds']:.1f}s training, {s['images_per_second']:,.0f} img/s)")
    if s.get("test_imbalanced"):
        print(f"balanced accuracy: {s['test_balanced_accuracy']:.2%}, macro-F1 {s['test_macro_f1']:.3f} (the test split "
              f"is imbalanced: accuracy is mostly its large classes')")
    if s.get("timing") and outcome.last_batch_at is not None:
        log.debug(
            f"timing: start-up to first batch {s['timing']['startup_seconds']:.2f}s, training "
            f"{s['timing']['training_seconds']:.2f}s, last batch to exit {time.perf_counter() - outcome.last_batch_at:.2f}s")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    if args.steps < 10:
        raise UsageError("--steps must be at least 10")
    from imgrec.workflows import lr_find

    settings = _given_settings(args)
    outcome = lr_find(RunConfig.from_dict(settings, source=args.config or "the command line"), out=args.out,
                      steps=args.steps, given=set(settings))
    found = outcome.result
    print(f"suggested --lr {found.suggestion:.3g} (the smoothed loss is lowest at {found.minimum:.3g}; "
          f"{outcome.config.optimizer}, batch {outcome.config.batch_size}); figure: {outcome.plot}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgrec.reporting import evaluate_run

    m = evaluate_run(args.target, data=args.data, split=args.split, out=args.out, device=args.device,
                     data_dir=args.data_dir)
    top5 = f", top-5 {m['top5_accuracy']:.2%}" if "top5_accuracy" in m else ""
    print(f"{m['split']} accuracy: {m['accuracy']:.2%} (loss {m['loss']:.4f}{top5}, macro-F1 {m['macro_f1']:.3f}, "
          f"{m['count']:,} images)")
    if m.get("imbalanced"):
        print(f"balanced accuracy: {m['balanced_accuracy']:.2%} (the {m['split']} split is imbalanced: accuracy is "
              f"mostly its large classes')")
    print(f"ECE: {m['ece']:.2%}" + (f" ({m['calibration']['ece_after']:.2%} after temperature scaling, "
                                    f"T = {m['calibration']['temperature']:.3f})" if m["calibration"]["temperature"] else "")
          + ": expected calibration error, the mean gap between how sure the model is and how often it is right")
    print(f"metrics: {m['written_to']}")
    print(f"report: {m['report']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from imgrec.samples import show_samples

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    values = {"data": args.data, "augment": args.augment, "seed": args.seed, "image_size": args.image_size}
    if args.data_dir:
        values["data_dir"] = args.data_dir
    cfg = RunConfig.from_dict(values)
    from imgrec.engine.runs import data_stem

    out = args.out or f"samples-{data_stem(args.data)}.png"
    print(f"wrote {show_samples(cfg, out, n=args.n, split=args.split, augmented=args.augmented)}")
    return 0


def _note(args: argparse.Namespace, text: str) -> None:
    """A note beside a command's result, on stdout; --quiet leaves it out."""
    if not args.quiet:
        print(f"note: {text}")


def cmd_explain(args: argparse.Namespace) -> int:
    from imgrec.explanations import explain_run

    outcome = explain_run(args.target, args.images, mistakes=args.mistakes, out=args.out, method=args.method,
                          device=args.device, data_dir=args.data_dir)
    for note in outcome.notes:
        _note(args, note)
    for e in outcome.images:
        true = f", true: {e.true}" if e.true else ""
        print(f"{e.source}: {e.predicted} {e.probability:.1%}{true} ({e.method}) -> {e.png}")
    if any(e.method.startswith("Grad-CAM") for e in outcome.images) and not args.quiet:
        print("Grad-CAM on LAYER (HxW): the heat-map marks the cells of that convolution's HxW output that raise the "
              "predicted class most, enlarged to the image")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from imgrec.comparison import compare_runs

    # compare/ in the current folder, beside the default runs/ and not in it: `imgrec compare runs/*` meets only runs
    outcome = compare_runs(args.runs, out=args.out or "compare", force=args.force)
    for folder in outcome.skipped:
        _note(args, f"skipped {folder}: compare's own output, not a run")
    print(outcome.table, end="")
    print("wrote " + ", ".join(str(p) for p in outcome.written))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from imgrec.data.doctor import DoctorOptions, diagnose, format_report

    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must not be negative")
    if args.near is not None and not 0 <= args.near <= 32:
        raise UsageError("--near must be in [0, 32]")
    options = DoctorOptions(data_dir=args.data_dir or default_data_dir(), cache_dir=default_cache_dir(),
                            workers=args.workers, split_seed=args.split_seed)
    if args.near is not None:
        options.near_bits = args.near
    report = diagnose(args.data, options)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def cmd_predict(args: argparse.Namespace) -> int:
    for flag, value in (("--topk", args.topk), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1")
    from imgrec.engine.system import set_threads
    from imgrec.inference import Predictor
    from imgrec.inference.command import predict_paths

    set_threads(args.threads)
    predictor = Predictor.from_run(args.target, device=args.device, auto_preprocess=args.auto_preprocess)
    outcome = predict_paths(predictor, args.paths, sys.stdout, args.format, args.topk, args.batch_size,
                            args.show_input, lambda failure: print(f"imgrec predict: error: {failure.message}",
                                                                   file=sys.stderr))
    if outcome.input_sheet is not None:
        print(f"model inputs: {outcome.input_sheet}", file=sys.stderr)
    if outcome.failures:
        print(f"imgrec predict: {len(outcome.failures)} input(s) could not be predicted (named above); "
              f"{outcome.predicted} predicted", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from imgrec.serve.server import serve

    serve(args.target, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          workers_threads=args.workers_threads, device=args.device)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgrec.export.runner import export_run

    outcome = export_run(args.target, fmt=args.format, out=args.out, weights=args.weights,
                         check_images=args.check_images, data_dir=args.data_dir)
    written = f"{outcome.path} and {outcome.sidecar}" if outcome.sidecar else str(outcome.path)
    print(f"wrote {written} ({outcome.description}) from {outcome.weights}")
    print(f"checked: {outcome.parity.summary()}" if outcome.parity else "not checked (--check-images 0)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from imgrec.models.registry import MODELS, model_size

    print(f"{'model':<19} {'params 1x28x28':>15} {'params 3x32x32':>15}  {'pretrained':<10}  description")
    for name, entry in MODELS.items():
        grey, colour = model_size(name, 10, 1, (28, 28)), model_size(name, 10, 3, (32, 32))
        weights = "ImageNet" if entry.pretrained else "-"
        print(f"{name:<19} {grey:>15,} {colour:>15,}  {weights:<10}  {entry.description}")
    print("pretrained: --pretrained starts from torchvision's ImageNet weights (--weights: a file or an imgrec run);"
          " a new head is built for the data's classes")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from imgrec.data.datasets import NAMED_DATASETS, archives_of, missing_files

    data_dir = args.data_dir or default_data_dir()
    print(f"named data sets (under {data_dir}):")
    for name, entry in NAMED_DATASETS.items():
        state = "embedded" if not entry.files else "missing (--download)" if missing_files(name, data_dir) else "found"
        archives = archives_of(name, data_dir) if state.startswith("missing") else []
        if archives:
            state = "as an archive"
        print(f"  {name:<14} {state:<21} {entry.description}")
        for archive in archives:
            print(f"  {'':<14} {'':<21} {archive.name} is here, as image folders: --data {archive} "
                  f"(or --download for the named set)")
    print("or a path: an image folder (train/, val/ or test/ of class folders, or class folders alone),")
    print("or a .zip/.tar/.tar.gz of one")
    return 0


COMMANDS = {"train": cmd_train, "lr-find": cmd_lr_find, "evaluate": cmd_evaluate, "predict": cmd_predict, "explain": cmd_explain,
            "compare": cmd_compare, "serve": cmd_serve, "show": cmd_show, "doctor": cmd_doctor, "models": cmd_models,
            "datasets": cmd_datasets, "export": cmd_export}


def _check_target(args: argparse.Namespace) -> None:
    """An image given where a run folder or weights file belongs gets a direct answer, not a checkpoint error;
    `predict IMAGE RUN` is named as swapped."""
    target = getattr(args, "target", None)
    if target is None:
        return
    from imgrec.data.imageio import is_image_file

    def is_run(path: str) -> bool:
        return (Path(path) / "weights").is_dir() or Path(path).suffix in (".pt", ".pth")

    image = Path(target).is_file() and is_image_file(target)
    if is_run(target) or not (image or Path(target).is_dir()):
        return
    others = getattr(args, "paths", None) or getattr(args, "images", None) or []
    run = next((p for p in others if is_run(p)), None)
    if run is not None:
        raise UsageError(f"the arguments look swapped: {target} is {'an image' if image else 'a folder'} and {run} a "
                         f"run; the run comes first (imgrec {args.command} {run} {target})")
    if image:
        raise UsageError(f"{target} is an image, not a run folder or weights file "
                         f"(imgrec {args.command} RUN_OR_WEIGHTS ...)")


COMPUTING = {"train", "lr-find", "evaluate", "predict", "explain", "serve", "show", "doctor", "export"}  # run torch's threads


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imgrec` console script; returns the exit code."""
    started = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started
    if not args.command:
        parser.print_help()
        return 2
    if args.verbose and args.quiet:
        _subparsers(parser).choices[args.command].error("-v/--verbose and -q/--quiet exclude each other: give one")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.verbose:  # imgrec's own details; other libraries' debug lines (matplotlib's font search) stay out
        logging.getLogger("imgrec").setLevel(logging.DEBUG)
    for note in getattr(args, "renamed", []):
        print(f"note: {note}", file=sys.stderr)
    if args.command in COMPUTING:
        patient_threads(meanwhile=_load_numpy)
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM acts like Ctrl-C: training saves its state and says how to resume; anything else just stops
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        _check_target(args)
        code = COMMANDS[args.command](args)
    except Interrupted as exc:  # training saved its state: the message says how to resume
        print(f"imgrec {args.command}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except ImgrecError as exc:
        if args.verbose:
            if _group() is None:
                raise
            traceback.print_exc()  # in a group, the process still ends as below
        print(f"imgrec {args.command}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print(f"imgrec {args.command}: interrupted", file=sys.stderr)
        code = 130
    except OSError as exc:  # the system refused a file (no space left, no permission, read-only): one line
        if args.verbose and _group() is None:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"imgrec {args.command}: error: {where}{os_error_cause(exc)}", file=sys.stderr)
        code = 1
    except Exception:
        if _group() is None:
            raise
        traceback.print_exc()  # a bug, reported as Python reports it; the process then ends as below
        code = 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    group = _group()
    return group.end_process(code) if group is not None else code


def _load_numpy() -> None:
    """What every computing command loads first (torch needs it), loaded while the CPUs are measured."""
    import numpy  # noqa: F401


def run() -> typing.NoReturn:
    """The `imgrec` command (the console script and `python -m imgrec`): main(), then the process's exit.

    Once torch (and its compiler) is loaded, the interpreter's own shutdown takes about a second (it frees every
    module's objects one by one) while nothing is left to do: every file the command wrote is closed when main()
    returns. So such a process ends at once, after flushing what it printed, unless it still has child processes
    (data-loading workers) that a normal shutdown would reap."""
    code = main()
    multiprocessing = sys.modules.get("multiprocessing")
    if "torch" in sys.modules and not (multiprocessing and multiprocessing.active_children()):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to say
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _group() -> Any:
    """imgrec.engine.distributed when this process joined a torchrun group, else None: such a process ends through
    its end_process (not the interpreter's shutdown). Only a command that imported the module can have joined one,
    so the others do not import torch for this."""
    module = sys.modules.get("imgrec.engine.distributed")
    return module if module is not None and module.joined_a_group() else None


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
