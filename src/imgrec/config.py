"""RunConfig: every setting of a training run, its defaults, its validation, and its YAML form.

The `train` command's flags are generated from these fields, so a setting is written down once: here.
This module imports neither torch nor anything of imgrec but `errors`, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import stat
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imgrec.errors import ImgrecError, UsageError

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("constant", "cosine", "onecycle", "linear")
TTA_MODES = ("none", "flip", "flip-translate", "unsure")
RECIPES = ("none", "fast")
LOADERS = ("auto", "memory", "stream")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SELECTIONS = ("val", "last")
BALANCE_MODES = ("none", "weights", "sampler")
LOGS = ("none", "tensorboard")
AUGMENT_OPS = ("crop", "flip", "translate", "erase", "resized-crop", "randaugment", "trivialaugment")
SEED_MAX = 2**32 - 1  # numpy's seed range; torch's generators take seed * 1,000,003 + epoch within 64 bits
INT_MAX = 2**63 - 1  # every integer setting fits a 64-bit tensor
CONFIG_MAX_BYTES = 2**20  # a settings file is a few hundred bytes
# Models built on torchvision backbones: they take --pretrained, --weights and the freezing options.
# models/backbones.py describes each one; tests/models/test_transfer.py keeps the two lists equal.
TRANSFER_MODELS = ("resnet18", "resnet50", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                   "convnext_tiny")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose help text (and choices) the CLI reads from its metadata.

    The metadata also says which values are allowed (check_settings reads it): min/max (inclusive) and
    above/below (exclusive) for numbers, lengths for lists, choices for text; note is added to a range error;
    numbers_as_text takes a YAML number for a text setting (a time budget of 90 means "90").
    """
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def default_data_dir() -> str:
    """Where named data sets live: $IMGREC_DATA, else ~/.cache/imgrec/data."""
    return os.environ.get("IMGREC_DATA") or str(Path.home() / ".cache" / "imgrec" / "data")


def default_cache_dir() -> str:
    """Where imgrec caches extracted archives, decoded images and statistics: $IMGREC_CACHE, else ~/.cache/imgrec."""
    return os.environ.get("IMGREC_CACHE") or str(Path.home() / ".cache" / "imgrec")


@dataclass
class RunConfig:
    """Everything needed to rerun a training run; saved as config.yaml in every run folder."""

    # data
    data: str = _opt("digits", "data set: mnist, fashion-mnist, cifar10, digits, or a path to an image folder or archive")
    data_dir: str | None = _opt(None, "where named data sets live (default: $IMGREC_DATA or ~/.cache/imgrec/data)")
    download: bool = _opt(False, "download a missing named data set or --pretrained weights file (needs internet)")
    image_size: int | None = _opt(None, "resize folder images to this size (default: their own size when uniform)",
                                  min=4, max=1024)
    val_fraction: float = _opt(0.1, "fraction of the training split held out for validation when the data has none",
                               min=0, below=1)
    test_fraction: float = _opt(0.2, "fraction held out for testing when an image folder has no test or val split",
                                above=0, below=1)
    split_seed: int = _opt(0, "seed of the train/val/test splits imgrec makes (fixed, so runs share a test set)",
                           min=0, max=SEED_MAX)
    train_samples: int | None = _opt(None, "train on a seeded, stratified subset of this many training images", min=1)
    keep_hardest: float = _opt(1.0, "train on this fraction of each class's training images: the hardest, by the loss "
                                     "of a cheap proxy (--proxy-model, trained on them all first; e.g. 0.7); "
                                     "1: every image", above=0, max=1)
    proxy_model: str = _opt("mlp", "--keep-hardest's proxy: a model name (`imgrec models`), trained 2 epochs on "
                                   "every training image (average-pooled to at most 32 pixels a side) to score them")
    balance: str = _opt("none", "imbalanced classes: weights (each class's loss weighted by the inverse of its share of "
                                "the training images) or sampler (each epoch draws every class equally often)",
                        choices=BALANCE_MODES)
    loader: str = _opt("auto", "data path: memory (one uint8 tensor), stream (DataLoader workers) or auto", choices=LOADERS)
    workers: int | None = _opt(None, "DataLoader worker processes for decoding (default: CPU count, at most 4)",
                               resume=True, min=0, max=256)
    strict: bool = _opt(False, "fail on image files that do not decode instead of skipping them (with one warning)")
    augment: str = _opt("auto", "comma list of crop, flip, translate, erase, resized-crop, randaugment, "
                                "trivialaugment (torchvision's policies, per image); none; or auto (colour data: "
                                "resized-crop,flip for torchvision backbones, crop,flip for the others)")
    alternate_flip: bool = _opt(False, "with flip in --augment: mirror each image on alternate epochs (the first "
                                       "epoch by a coin per image) instead of at random each epoch (airbench's)")
    mixup: float = _opt(0.0, "MixUp: blend each training image with another, and their labels, by a weight drawn "
                             "from Beta(ALPHA, ALPHA) (e.g. 0.2; 0: off)", min=0, max=100)
    cutmix: float = _opt(0.0, "CutMix: paste a box of another training image into each, labels mixed by the area "
                              "kept; box size from Beta(ALPHA, ALPHA) (e.g. 1.0; 0: off; with --mixup, one of the "
                              "two per batch)", min=0, max=100)
    mean: list[float] | None = _opt(None, "per-channel mean for normalisation (default: the data set's)",
                                    lengths=(1, 3))
    std: list[float] | None = _opt(None, "per-channel std for normalisation (default: the data set's)", lengths=(1, 3))
    # model
    model: str = _opt("lenet", "model name; `imgrec models` lists them")
    recipe: str = _opt("none", "fast: choose the model, optimiser, schedule, augmentation and precision for the data "
                               "(28x28 grey or 32x32 colour); settings given explicitly win", choices=RECIPES)
    # transfer learning (torchvision backbones)
    pretrained: bool = _opt(False, "start from torchvision's ImageNet weights for --model (found in torch's cache)")
    weights: str | None = _opt(None, "start from these weights: a torchvision state dict file, or an imgrec run "
                                     "folder or weights file of the same model")
    freeze_epochs: int | None = _opt(None, "epochs that train only the new head before the backbone is unfrozen "
                                           "(default: 1 with --pretrained or --weights, else 0)", min=0)
    freeze: bool = _opt(False, "keep the backbone frozen all through: train only the new head (a feature extractor)")
    lr_backbone_mult: float = _opt(0.1, "after unfreezing, the learning rate of the earliest backbone layers is "
                                        "--lr times this; later layers get rates between it and --lr", above=0, max=1)
    cache_features: bool = _opt(False, "with --freeze: compute the backbone's features of the training and "
                                       "validation images once and train the head on them (no augmentation)")
    # optimisation
    optimizer: str = _opt("adam", "optimiser; muon: Muon (orthogonalised momentum) for the conv filters at "
                                  "--muon-lr, sgd for the rest", choices=OPTIMIZERS)
    lr: float | str = _opt(1e-3, "learning rate (the peak rate for onecycle), or find: run the learning-rate range "
                                 "test first (imgrec lr-find) and train with its suggestion", above=0, words=("find",))
    weight_decay: float = _opt(0.0, "weight decay", min=0)
    momentum: float = _opt(0.9, "momentum for sgd (Nesterov)", min=0, below=1)
    muon_lr: float = _opt(0.05, "--optimizer muon: learning rate of the conv filters (each filter bank's norm is held "
                                "fixed, so this is the size of each step relative to it)", above=0, max=10)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", min=0, below=1)
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value", above=0)
    batch_size: int = _opt(100, "images per training step", min=1)
    epochs: int = _opt(10, "training epochs (with --resume: train the run to this many epochs)", resume=True, min=1)
    schedule: str = _opt("constant", "learning-rate schedule (linear: warm up over the first fifth of the steps, then "
                                     "decay linearly to zero)", choices=SCHEDULES)
    linear_ends: list[float] = _opt([0.0, 0.0], "--schedule linear: the learning rate's factors at the first and the "
                                                 "last step (default 0 0: up from zero, down to zero; airbench: 0.2 0.07)",
                                    lengths=(2, 2))
    warmup_epochs: float | None = _opt(None, "raise the learning rate linearly from near zero over this many epochs "
                                             "(fractions allowed), then follow --schedule over the rest (default: "
                                             "none; linear keeps its first fifth)", min=0)
    max_steps: int | None = _opt(None, "stop after this many training steps in all, cutting the last epoch short "
                                       "(--time-budget sets it)", min=1)
    time_budget: str | None = _opt(None, "finish the whole run (data, training, test, report) within this time, "
                                         "e.g. 90s, 6m, 1h: the epochs are planned from speed measured at the start",
                                   numbers_as_text=True)
    ema: float = _opt(0.0, "keep an exponential moving average of the weights with this decay per step (e.g. 0.99); "
                           "the average is validated, tested and saved (0: off)", min=0, below=1,
                     note="0: off; 0.99 averages about the last 100 steps")
    whiten_bias_epochs: int = _opt(0, "models with a whitening stem (airnet, airnet-small): train its bias for this "
                                      "many epochs, then keep it fixed (airbench: 3; 0: trained throughout)", min=0)
    progressive_resize: list[int] | None = _opt(
        None, "progressive resizing: train the first epochs on images scaled down to these sizes, one per epoch (the "
              "shorter side in pixels, e.g. 24 28: epoch 1 at 24, epoch 2 at 28, then full size; the run's last epoch "
              "is always at full size): fewer FLOPs early; needs a model that takes any image size (global pooling: "
              "airnet, airnet-small, resnet8, speednet); validation, test and prediction stay at full size; 0 alone: "
              "off (as --recipe fast would choose it for 32x32 colour images)",
        lengths=(1, None), min=0, metavar="PX")
    lookahead: bool = _opt(False, "lookahead (airbench's): every 5 steps a slow copy of the weights moves toward the "
                                  "trained ones, by less and less as the run ends, and training restarts from it; the "
                                  "slow copy is validated, tested and saved (instead of --ema)")
    tta: str = _opt("none", "test-time augmentation for the final evaluation (calibration, test, report; each epoch's "
                            "validation takes one view): flip averages the logits of each image and its mirror image; "
                            "flip-translate adds the two views shifted by one pixel (6 passes); unsure: one view, and "
                            "flip-translate's 6 only for the least confident quarter of each batch (all need flip in "
                            "--augment)", choices=TTA_MODES)
    patience: int = _opt(0, "stop after this many epochs without a better validation accuracy (0: never)",
                         resume=True, min=0)
    select: str = _opt("val", "how weights/best.pt, the weights tested and used afterwards, is chosen: val (the epoch "
                              "with the best validation accuracy) or last (the last epoch's: for schedules that decay "
                              "to zero, where a small validation set would choose by noise)", choices=SELECTIONS)
    # system
    device: str = _opt("auto", "device: cuda when available, else cpu", choices=DEVICES)
    precision: str = _opt("auto", "fp32, bf16 or fp16 autocast; auto: bf16 on CPUs that compute it natively (AVX512-BF16, AMX) and on CUDA, else fp32", choices=PRECISIONS)
    channels_last: bool = _opt(True, "keep conv activations in channels-last memory format (faster on CPU and GPU)")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice, one per core)", resume=True,
                               min=1, max=1024)
    seed: int = _opt(0, "random seed for weights, splits, data order and augmentation", min=0, max=SEED_MAX)
    deterministic: bool = _opt(True, "use deterministic algorithms (bit-exact reruns on CPU)")
    sync_bn: bool = _opt(False, "under torchrun: BatchNorm layers use the batch statistics of all processes "
                                "(SyncBatchNorm; for small per-process batches on GPUs)")
    dist_timeout: float = _opt(10.0, "under torchrun: minutes a process waits for the others (at start-up, at "
                                     "each step, at each save) before it fails instead of hanging", resume=True,
                              above=0, max=100_000, note="minutes")
    # output
    project: str = _opt("runs", "folder that holds run folders")
    name: str | None = _opt(None, "run folder name (default: <data>-<model>, numbered when taken)")
    exist_ok: bool = _opt(False, "reuse the run folder if it exists instead of numbering a new one")
    log: str = _opt("none", "also log to runs/<run>/tensorboard/ for TensorBoard (per-step loss and learning rate, "
                            "epoch metrics, confusion matrix, sample predictions, settings with final metrics); needs "
                            "the tensorboard extra. results.csv and report.html are always written", choices=LOGS,
                    resume=True)
    save_every_minutes: float = _opt(5.0, "also save the training state (train_state.pt) this often within an epoch "
                                     "(0: at epoch ends only)", resume=True, min=0)
    save_every_steps: int = _opt(0, "also save the training state every this many steps (0: never)", resume=True,
                                 advanced=True, min=0)

    def __post_init__(self) -> None:
        check_settings(self)  # each value's type and range, as its field declares them
        _check(self.val_fraction + self.test_fraction < 1, "--val-fraction plus --test-fraction must be below 1")
        _check(not (self.patience and self.select == "last"), "give --patience or --select last, not both: early "
                                                              "stopping keeps the best validated epoch")
        _check(self.warmup_epochs is None or self.warmup_epochs < self.epochs,
               f"--warmup-epochs must be fewer than --epochs ({self.epochs}); got {self.warmup_epochs}")
        _check(not (self.ema and self.lookahead), "give --ema or --lookahead, not both: each keeps the weights that are "
                                                  "validated and saved")
        _check(all(0 <= v <= 1 for v in self.linear_ends), f"--linear-ends takes two factors from 0 to 1; got "
                                                            f"{' '.join(map(str, self.linear_ends))}")
        _check(not (self.optimizer == "muon" and self.precision == "fp16"), "--optimizer muon takes --precision "
                                                                           "fp32 or bf16, not fp16")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        _check(all(size >= 4 for size in self.resize_sizes),
               f"--progressive-resize takes sizes of at least 4 pixels, or 0 alone (off); got "
               f"{' '.join(map(str, self.progressive_resize or []))}")
        resized = len(self.resize_sizes)
        _check(self.time_budget is not None or resized < self.epochs,
               f"--progressive-resize gives {resized} epoch(s) at smaller sizes but the run has {self.epochs}: leave "
               f"at least the last epoch at full size (fewer sizes or more --epochs)")
        _check(not (resized and self.cache_features), "--cache-features trains on features computed once from "
                                                      "full-size images: drop --progressive-resize")
        _check((self.mean is None) == (self.std is None), "give --mean and --std together")
        _check(self.std is None or all(s > 0 for s in self.std), "--std values must be positive")
        _check(self.mean is None or len(self.mean) == len(self.std or []), "--mean and --std need as many values")
        self._check_transfer()
        self.augment = self.augment.replace(" ", "").lower() or "none"
        if self.augment not in ("auto", "none"):
            for op in self.augment.split(","):
                if op not in AUGMENT_OPS:
                    raise UsageError(f"unknown augmentation {op!r} in --augment; use {', '.join(AUGMENT_OPS)}, none or auto")

    @property
    def resize_sizes(self) -> list[int]:
        """--progressive-resize's sizes, one per early epoch ([] when not given, or given as 0: off)."""
        return [] if self.progressive_resize in (None, [0]) else list(self.progressive_resize or [])

    def _check_transfer(self) -> None:
        """The transfer-learning options: which models take them, and which go together."""
        transfer = self.pretrained or self.weights is not None
        if self.freeze_epochs is None:
            self.freeze_epochs = 1 if transfer else 0  # fastai's fine_tune: one epoch for the new head alone
        backbones = "|".join(TRANSFER_MODELS)
        _check(not (self.pretrained and self.weights is not None), "give --pretrained or --weights, not both")
        _check(not self.pretrained or self.model in TRANSFER_MODELS,
               f"--pretrained: model {self.model!r} has no pretrained weights; use --model {backbones}")
        _check(self.weights is None or self.model in TRANSFER_MODELS,
               f"--weights: model {self.model!r} has no backbone to transfer; use --model {backbones}")
        _check(transfer or not (self.freeze or self.freeze_epochs),
               "--freeze and --freeze-epochs need --pretrained or --weights: a random backbone has no features to keep")
        _check(not self.cache_features or self.freeze,
               "--cache-features needs --freeze: features can be computed once only while the backbone never changes")
        _check(not self.cache_features or self.augment.strip().lower() in ("auto", "none", ""),
               "--cache-features trains on features computed once, so images cannot be augmented: drop --augment")
        _check(not self.cache_features or not (self.mixup or self.cutmix),
               "--cache-features trains on features computed once, so images cannot be mixed: drop --mixup/--cutmix")

    @property
    def data_root(self) -> str:
        """The folder that holds named data sets."""
        return self.data_dir or default_data_dir()

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so the dict can live in a weights-only checkpoint and in YAML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a dict, refusing unknown keys with the nearest valid name as a hint."""
        if not isinstance(values, dict):
            raise UsageError(f"{source} must hold a mapping of settings, not {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"unknown setting {key!r} in {source}{hint}")
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong type, e.g. a string for a number
            raise UsageError(f"bad value in {source}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (what `--config` reads back)."""
        Path(path).write_text(self.to_yaml())

    def to_yaml(self) -> str:
        """The config as YAML text (what config.yaml holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_duration(text: str) -> float:
    """'90s', '6m', '1.5h' or a plain number of seconds -> seconds; anything else is a one-line usage error."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    value = str(text).strip().lower()
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"--time-budget {text!r}: give a positive duration such as 90s, 6m or 1h")
    return seconds


def resume_safe_settings() -> list[str]:
    """The settings a resumed run may change (marked resume=True): none of them alters what is learnt so far."""
    return [f.name for f in fields(RunConfig) if f.metadata.get("resume")]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; a missing or malformed file is a one-line error."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"config file {path} is a folder; give a YAML file")
        if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
            raise UsageError(f"config file {path} is not a regular file; give a YAML file")
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise UsageError(f"config file {path} is over {CONFIG_MAX_BYTES // 2**20} MiB: not a settings file")
        values = yaml.safe_load(data.decode("utf-8"))
    except FileNotFoundError:
        raise ImgrecError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ImgrecError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UsageError(f"config file {path} is not valid YAML: {first}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def check_settings(cfg: RunConfig) -> None:
    """Check every setting against its field's type and allowed values, normalising plain numbers (an integer for a
    float, a tuple for a list); the first bad one is a one-line UsageError naming it, its value and what is allowed."""
    hints = _field_types()
    for f in fields(cfg):
        setattr(cfg, f.name, _checked_value(f, hints[f.name], getattr(cfg, f.name)))


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _checked_value(f: Field[Any], kind: Any, value: Any) -> Any:
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    meta, flag = f.metadata, f"--{flag_name(f.name)}"

    def refuse(allowed: str) -> typing.NoReturn:
        raise UsageError(f"{flag} must be {allowed}; got {_show(value)}")

    if meta.get("words"):  # a number or one of a few words (--lr 0.01, --lr find); a number's text is the number
        word = value.strip().lower() if isinstance(value, str) else None
        if word in meta["words"]:
            return word
        number = _finite(_float_or_none(value) if isinstance(value, str) else value)
        if number is None:
            refuse(f"a finite number or {' or '.join(meta['words'])}")
        _check_range(number, meta, flag)
        return number

    if kind is bool:
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    if kind is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            refuse("an integer")
        value = int(value)
        _check_range(value, meta, flag, INT_MAX)
        return value
    if kind is float:
        number = _finite(value)
        if number is None:
            refuse("a finite number")
        _check_range(number, meta, flag)
        return number
    if kind is str:
        if meta.get("numbers_as_text") and _finite(value) is not None:
            value = str(value)
        if not isinstance(value, str):
            refuse("text")
        if "\0" in value:
            refuse("text without NUL characters")
        if meta.get("choices") and value not in meta["choices"]:
            refuse(f"one of {', '.join(meta['choices'])}")
        return value
    if typing.get_origin(kind) is list:
        return _checked_list(typing.get_args(kind)[0], meta, flag, value, refuse)
    raise TypeError(f"RunConfig.{f.name}: no check for {kind}")  # a new field of a new type: add its check above


def _checked_list(item_kind: type, meta: Any, flag: str, value: Any, refuse: Callable[[str], typing.NoReturn],
                  ) -> list[Any]:
    """A list[float] of finite numbers, or a list[int] (a single integer: a list of one) each in the field's range;
    its length within the field's lengths."""
    low, high = meta.get("lengths", (1, None))
    count = f"{low} or {high}" if high else f"at least {low}"
    if item_kind is int:
        items = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
        if (not isinstance(items, (list, tuple)) or not low <= len(items) <= (high or len(items))
                or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items)):
            refuse(f"a list of {count} integers")
        for item in items:
            _check_range(int(item), meta, flag, INT_MAX)
        return [int(i) for i in items]
    items = list(value) if isinstance(value, (list, tuple)) else None
    converted = [_finite(item) for item in items] if items is not None else []
    if items is None or not low <= len(items) <= (high or len(items)) or None in converted:
        refuse(f"a list of {count} finite numbers")
    return converted


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _finite(value: Any) -> float | None:
    """A real number (not a bool) as a finite float, else None."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_range(value: float, meta: Any, flag: str, cap: float | None = None) -> None:
    """min/max (inclusive) and above/below (exclusive) from the field's metadata; cap bounds integers that set no max."""
    low, high = meta.get("min", meta.get("above")), meta.get("max", meta.get("below"))
    low_open, high_open = "above" in meta, "below" in meta
    if high is None and cap is not None and value > cap:
        high = cap
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = ("positive" if low == 0 else f"above {low}") if low_open else (
            "not be negative" if low == 0 else f"at least {low}")
    else:
        allowed = f"below {high}" if high_open else f"at most {high}"
    note = f" ({meta['note']})" if meta.get("note") else ""
    raise UsageError(f"{flag} must {'' if allowed.startswith('not') else 'be '}{allowed}{note}; got {_show(value)}")


def _show(value: Any, limit: int = 60) -> str:
    """A value as one short line for an error message."""
    text = " ".join(repr(value).split()) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def flag_name(name: str) -> str:
    """A setting's command-line flag without its dashes: batch_size -> batch-size."""
    return name.replace("_", "-")
