"""The `imgrec` command: parse arguments, call a workflow, print the result, exit with a clear code.

Exit codes: 0 ok, 1 a problem with data or files (one line on stderr), 2 a usage error, 130 interrupted.
Torch is imported only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from imgrec import __version__
from imgrec.config import RunConfig, load_yaml
from imgrec.errors import ImgrecError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line ("imgrec train: error: ...") with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field: --batch-size N, --amp/--no-amp for booleans, lists as several values."""
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        options: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, type=typing.get_args(base)[0], nargs="+", metavar="X", **options)
        else:
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]  # argparse shows them as {a,b,c}
            else:
                options["metavar"] = f.name.upper()
            parser.add_argument(flag, type=base, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgrec", description="Train, evaluate and look at image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a model; writes runs/<name>/", description="Train a model on a data set.")
    p.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags override it)")
    _add_config_flags(p)

    p = sub.add_parser("evaluate", help="evaluate saved weights; writes metrics.json",
                       description="Evaluate a run's weights on a split of its data (or of --data).")
    p.add_argument("target", metavar="RUN_OR_WEIGHTS", help="a run folder or a weights file")
    p.add_argument("--data", help="evaluate on this data set instead (it must have the same classes)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default: test)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device (default: the run's)")
    p.add_argument("--out", help="where to write metrics.json (default: the run folder)")

    p = sub.add_parser("show", help="save a grid of sample images with labels",
                       description="Save a PNG grid of de-normalised sample images and their labels.")
    p.add_argument("--data", default="digits", help="data set name or path (default: digits)")
    p.add_argument("--data-dir", help="where named data sets live (default: $IMGREC_DATA or ~/.cache/imgrec/data)")
    p.add_argument("--n", type=int, default=32, help="number of images (default: 32)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="split (default: train)")
    p.add_argument("--augmented", action="store_true", help="show images as training augments them")
    p.add_argument("--augment", default="auto", help="augmentations for --augmented (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="which random sample (default: 0)")
    p.add_argument("--image-size", type=int, help="resize folder images to this size")
    p.add_argument("--out", help="PNG file to write (default: samples-<data>.png)")

    sub.add_parser("models", help="list the models", description="List the models with their parameter counts.")
    p = sub.add_parser("datasets", help="list the data sets", description="List named data sets and where they are.")
    p.add_argument("--data-dir", help="where named data sets live (default: $IMGREC_DATA or ~/.cache/imgrec/data)")
    return parser


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    known = {f.name for f in fields(RunConfig)}
    values.update({k: v for k, v in vars(args).items() if k in known})
    return RunConfig.from_dict(values, source=args.config or "the command line")


def cmd_train(args: argparse.Namespace) -> int:
    from imgrec.workflows import train

    cfg = _config_from_args(args)
    outcome = train(cfg)
    s = outcome.summary
    print(f"run folder: {outcome.run_dir}")
    print(f"test accuracy: {s['test_accuracy']:.2%} (test loss {s['test_loss']:.4f}, best epoch {s['best_epoch']}/"
          f"{s['epochs']}, {s['train_seconds']:.1f}s training, {s['images_per_second']:,.0f} img/s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgrec.workflows import evaluate_run

    m = evaluate_run(args.target, data=args.data, split=args.split, out=args.out, device=args.device)
    top5 = f", top-5 {m['top5_accuracy']:.2%}" if "top5_accuracy" in m else ""
    print(f"{m['split']} accuracy: {m['accuracy']:.2%} (loss {m['loss']:.4f}{top5}, macro-F1 {m['macro_f1']:.3f}, "
          f"{m['count']} images)")
    print(f"metrics: {m['written_to']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from imgrec.workflows import show_samples

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    values = {"data": args.data, "augment": args.augment, "seed": args.seed, "image_size": args.image_size}
    if args.data_dir:
        values["data_dir"] = args.data_dir
    cfg = RunConfig.from_dict(values)
    from imgrec.engine.runs import default_run_name

    out = args.out or f"samples-{default_run_name(args.data, 'x')[:-2]}.png"
    print(f"wrote {show_samples(cfg, out, n=args.n, split=args.split, augmented=args.augmented)}")
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
    from imgrec.config import default_data_dir
    from imgrec.data.datasets import NAMED_DATASETS, missing_files

    data_dir = args.data_dir or default_data_dir()
    print(f"named data sets (under {data_dir}):")
    for name, entry in NAMED_DATASETS.items():
        state = "embedded" if not entry.files else "missing (--download)" if missing_files(name, data_dir) else "found"
        print(f"  {name:<14} {state:<21} {entry.description}")
    print("or a path: an image folder (train/, val/ or test/ of class folders, or class folders alone),")
    print("or a .zip/.tar/.tar.gz of one")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "show": cmd_show, "models": cmd_models,
            "datasets": cmd_datasets}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imgrec` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except ImgrecError as exc:
        if args.verbose:
            raise
        print(f"imgrec {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"imgrec {args.command}: interrupted", file=sys.stderr)
        return 130
