"""RunConfig: every setting of a training run, its defaults, its validation, and its YAML form.

The `train` command's flags are generated from these fields, so a setting is written down once: here.
This module imports neither torch nor anything of imgrec but `errors`, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from imgrec.errors import ImgrecError, UsageError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle", "linear")
TTA_MODES = ("none", "flip", "flip-translate")
RECIPES = ("none", "fast")
LOADERS = ("auto", "memory", "stream")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SELECTIONS = ("val", "last")
BALANCE_MODES = ("none", "weights", "sampler")
AUGMENT_OPS = ("crop", "flip", "translate", "erase", "resized-crop")
# Models built on torchvision backbones: they take --pretrained, --weights and the freezing options.
# models/backbones.py describes each one; tests/models/test_transfer.py keeps the two lists equal.
TRANSFER_MODELS = ("resnet18", "resnet50", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                   "convnext_tiny")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose help text (and choices) the CLI reads from its metadata."""
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
    image_size: int | None = _opt(None, "resize folder images to this size (default: their own size when uniform)")
    val_fraction: float = _opt(0.1, "fraction of the training split held out for validation when the data has none")
    test_fraction: float = _opt(0.2, "fraction held out for testing when an image folder has no test or val split")
    split_seed: int = _opt(0, "seed of the train/val/test splits imgrec makes (fixed, so runs share a test set)")
    train_samples: int | None = _opt(None, "train on a seeded, stratified subset of this many training images")
    balance: str = _opt("none", "imbalanced classes: weights (each class's loss weighted by the inverse of its share of "
                                "the training images) or sampler (each epoch draws every class equally often)",
                        choices=BALANCE_MODES)
    loader: str = _opt("auto", "data path: memory (one uint8 tensor), stream (DataLoader workers) or auto", choices=LOADERS)
    workers: int | None = _opt(None, "DataLoader worker processes for decoding (default: CPU count, at most 4)",
                               resume=True)
    strict: bool = _opt(False, "fail on image files that do not decode instead of skipping them (with one warning)")
    augment: str = _opt("auto", "comma list of crop, flip, translate, erase, resized-crop; none; or auto (colour data: "
                             "resized-crop,flip for torchvision backbones, crop,flip for the others)")
    mean: list[float] | None = _opt(None, "per-channel mean for normalisation (default: the data set's)")
    std: list[float] | None = _opt(None, "per-channel std for normalisation (default: the data set's)")
    # model
    model: str = _opt("lenet", "model name; `imgrec models` lists them")
    recipe: str = _opt("none", "fast: choose the model, optimiser, schedule, augmentation and precision for the data "
                               "(28x28 grey or 32x32 colour); settings given explicitly win", choices=RECIPES)
    # transfer learning (torchvision backbones)
    pretrained: bool = _opt(False, "start from torchvision's ImageNet weights for --model (found in torch's cache)")
    weights: str | None = _opt(None, "start from these weights: a torchvision state dict file, or an imgrec run "
                                     "folder or weights file of the same model")
    freeze_epochs: int | None = _opt(None, "epochs that train only the new head before the backbone is unfrozen "
                                           "(default: 1 with --pretrained or --weights, else 0)")
    freeze: bool = _opt(False, "keep the backbone frozen all through: train only the new head (a feature extractor)")
    lr_backbone_mult: float = _opt(0.1, "after unfreezing, the learning rate of the earliest backbone layers is "
                                        "--lr times this; later layers get rates between it and --lr")
    cache_features: bool = _opt(False, "with --freeze: compute the backbone's features of the training and "
                                       "validation images once and train the head on them (no augmentation)")
    # optimisation
    optimizer: str = _opt("adam", "optimiser", choices=OPTIMIZERS)
    lr: float | str = _opt(1e-3, "learning rate (the peak rate for onecycle), or find: run the learning-rate range "
                                 "test first (imgrec lr-find) and train with its suggestion", words=("find",))
    weight_decay: float = _opt(0.0, "weight decay")
    momentum: float = _opt(0.9, "momentum for sgd (Nesterov)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value")
    batch_size: int = _opt(100, "images per training step")
    epochs: int = _opt(10, "training epochs (with --resume: train the run to this many epochs)", resume=True)
    schedule: str = _opt("constant", "learning-rate schedule (linear: warm up over the first fifth of the steps, then "
                                     "decay linearly to zero)", choices=SCHEDULES)
    warmup_epochs: float | None = _opt(None, "raise the learning rate linearly from near zero over this many epochs "
                                             "(fractions allowed), then follow --schedule over the rest (default: "
                                             "none; linear keeps its first fifth)")
    max_steps: int | None = _opt(None, "stop after this many training steps in all, cutting the last epoch short "
                                       "(--time-budget sets it)")
    time_budget: str | None = _opt(None, "finish the whole run (data, training, test, report) within this time, "
                                         "e.g. 90s, 6m, 1h: the epochs are planned from speed measured at the start")
    ema: float = _opt(0.0, "keep an exponential moving average of the weights with this decay per step (e.g. 0.99); "
                           "the average is validated, tested and saved (0: off)")
    lookahead: bool = _opt(False, "lookahead (airbench's): every 5 steps a slow copy of the weights moves toward the "
                                  "trained ones, by less and less as the run ends, and training restarts from it; the "
                                  "slow copy is validated, tested and saved (instead of --ema)")
    tta: str = _opt("none", "test-time augmentation for the final evaluation (calibration, test, report; each epoch's "
                            "validation takes one view): flip averages the logits of each image and its mirror image; "
                            "flip-translate adds the two views shifted by one pixel (6 passes; both need flip in --augment)",
                    choices=TTA_MODES)
    patience: int = _opt(0, "stop after this many epochs without a better validation accuracy (0: never)",
                         resume=True)
    select: str = _opt("val", "how weights/best.pt, the weights tested and used afterwards, is chosen: val (the epoch "
                              "with the best validation accuracy) or last (the last epoch's: for schedules that decay "
                              "to zero, where a small validation set would choose by noise)", choices=SELECTIONS)
    # system
    device: str = _opt("auto", "device: cuda when available, else cpu", choices=DEVICES)
    precision: str = _opt("auto", "fp32, bf16 or fp16 autocast; auto: bf16 on CPUs that compute it natively (AVX512-BF16, AMX) and on CUDA, else fp32", choices=PRECISIONS)
    channels_last: bool = _opt(True, "keep conv activations in channels-last memory format (faster on CPU and GPU)")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice, one per core)", resume=True)
    seed: int = _opt(0, "random seed for weights, splits, data order and augmentation")
    deterministic: bool = _opt(True, "use deterministic algorithms (bit-exact reruns on CPU)")
    sync_bn: bool = _opt(False, "under torchrun: BatchNorm layers use the batch statistics of all processes "
                                "(SyncBatchNorm; for small per-process batches on GPUs)")
    dist_timeout: float = _opt(10.0, "under torchrun: minutes a process waits for the others (at start-up, at "
                                     "each step, at each save) before it fails instead of hanging", resume=True)
    # output
    project: str = _opt("runs", "folder that holds run folders")
    name: str | None = _opt(None, "run folder name (default: <data>-<model>, numbered when taken)")
    exist_ok: bool = _opt(False, "reuse the run folder if it exists instead of numbering a new one")
    save_every_minutes: float = _opt(5.0, "also save the training state (train_state.pt) this often within an epoch "
                                     "(0: at epoch ends only)", resume=True)
    save_every_steps: int = _opt(0, "also save the training state every this many steps (0: never)", resume=True,
                                 advanced=True)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.epochs >= 1, "--epochs must be at least 1")
        self.lr = _number_or_word(self.lr, "--lr", ("find",))
        _check(self.lr == "find" or self.lr > 0, "--lr must be positive (or find)")
        _check(self.weight_decay >= 0, "--weight-decay must not be negative")
        _check(0 <= self.momentum < 1, "--momentum must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)")
        _check(0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)")
        _check(0 < self.test_fraction < 1, "--test-fraction must be in (0, 1)")
        _check(self.val_fraction + self.test_fraction < 1, "--val-fraction plus --test-fraction must be below 1")
        _check(self.patience >= 0, "--patience must not be negative")
        _check(not (self.patience and self.select == "last"), "give --patience or --select last, not both: early "
                                                              "stopping keeps the best validated epoch")
        _check(self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be positive")
        _check(self.image_size is None or 4 <= self.image_size <= 1024, "--image-size must be in [4, 1024]")
        _check(self.train_samples is None or self.train_samples >= 1, "--train-samples must be at least 1")
        _check(self.workers is None or self.workers >= 0, "--workers must not be negative")
        _check(self.threads is None or self.threads >= 1, "--threads must be at least 1")
        _check(self.save_every_minutes >= 0, "--save-every-minutes must not be negative")
        _check(self.save_every_steps >= 0, "--save-every-steps must not be negative")
        _check(self.warmup_epochs is None or 0 <= self.warmup_epochs < self.epochs,
               "--warmup-epochs must be at least 0 and fewer than --epochs")
        _check(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        _check(0 <= self.ema < 1, "--ema must be in [0, 1) (0: off; 0.99 averages about the last 100 steps)")
        _check(not (self.ema and self.lookahead), "give --ema or --lookahead, not both: each keeps the weights that are "
                                                  "validated and saved")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        _check(self.dist_timeout > 0, "--dist-timeout must be positive (minutes)")
        _check((self.mean is None) == (self.std is None), "give --mean and --std together")
        _check(self.std is None or all(s > 0 for s in self.std), "--std values must be positive")
        _check(self.mean is None or len(self.mean) == len(self.std or []), "--mean and --std need as many values")
        self._check_transfer()
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UsageError(f"--{_flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")
        self.augment = self.augment.replace(" ", "").lower() or "none"
        if self.augment not in ("auto", "none"):
            for op in self.augment.split(","):
                if op not in AUGMENT_OPS:
                    raise UsageError(f"unknown augmentation {op!r} in --augment; use {', '.join(AUGMENT_OPS)}, none or auto")

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
        _check(self.freeze_epochs >= 0, "--freeze-epochs must not be negative")
        _check(transfer or not (self.freeze or self.freeze_epochs),
               "--freeze and --freeze-epochs need --pretrained or --weights: a random backbone has no features to keep")
        _check(0 < self.lr_backbone_mult <= 1, "--lr-backbone-mult must be in (0, 1]")
        _check(not self.cache_features or self.freeze,
               "--cache-features needs --freeze: features can be computed once only while the backbone never changes")
        _check(not self.cache_features or self.augment.strip().lower() in ("auto", "none", ""),
               "--cache-features trains on features computed once, so images cannot be augmented: drop --augment")

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
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ImgrecError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _number_or_word(value: Any, flag: str, words: tuple[str, ...]) -> float | str:
    """A number, or one of words (any case); a string of a number (YAML's 1e-3) is the number."""
    if isinstance(value, str):
        if value.strip().lower() in words:
            return value.strip().lower()
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{flag} must be a number or {' or '.join(words)}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{flag} must be a number or {' or '.join(words)}; got {value!r}")
    return float(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _flag(name: str) -> str:
    return name.replace("_", "-")
