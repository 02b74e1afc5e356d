"""A run as other commands find it: its data options from its config, its weights file loaded into its model, and
its data as its weights saw it (evaluate, explain and export start here; train builds its data options here).

Joins config, data, models and the engine like workflows; the command modules and the front doors import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from imgrec.config import RunConfig, default_cache_dir
from imgrec.data.datasets import DataOptions, load_data
from imgrec.data.info import DataBundle
from imgrec.data.verify import skipped_warning
from imgrec.engine.checkpoint import load_model_state, load_weights_file, resolve_weights, run_dir_of
from imgrec.engine.runs import RunLock
from imgrec.errors import ImgrecError, UsageError
from imgrec.models.registry import build_model

log = logging.getLogger(__name__)

DataSource = Callable[[DataOptions], DataBundle]  # data options -> the run's data, for data that has no name


def data_options(cfg: RunConfig, **overrides: Any) -> DataOptions:
    """DataOptions from the run's config, with overrides (inference rebuilds data as the model saw it)."""
    opts = DataOptions(
        data_dir=cfg.data_root, cache_dir=default_cache_dir(), download=cfg.download, image_size=cfg.image_size,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed,
        train_samples=cfg.train_samples, loader=cfg.loader, workers=cfg.workers, mean=cfg.mean, std=cfg.std,
        strict=cfg.strict,
    )
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


def load_run(run_or_weights: str | Path, data_dir: str | None = None,
             ) -> tuple[Path, dict[str, Any], RunConfig, torch.nn.Module]:
    """Weights path, checkpoint, config and a model with the weights loaded.

    The config's data_dir is where the run's named data set is looked for: data_dir (--data-dir) when given, else
    the folder the run was trained from while it exists, else $IMGREC_DATA or the default."""
    path = resolve_weights(run_or_weights)
    ckpt = load_weights_file(path)
    try:
        cfg = RunConfig.from_dict(ckpt.get("config") or {}, source=str(path))
    except UsageError as exc:  # a setting the file records, not one the user gave: a bad file (exit 1)
        raise ImgrecError(f"{path} records settings this imgrec refuses: {exc}") from None
    if data_dir:
        cfg.data_dir = data_dir
    elif cfg.data_dir and not Path(cfg.data_dir).is_dir():
        cfg.data_dir = None
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    load_model_state(model, ckpt["state_dict"], path)
    return path, ckpt, cfg, model


def own_run_folder(weights: Path, out_dir: Path) -> AbstractContextManager[Any]:
    """The run folder's lock while a command writes into it (out_dir is the run folder of weights/x.pt, or in it);
    nothing to lock for other folders."""
    run_dir = run_dir_of(weights)
    inside = out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents
    return RunLock(run_dir) if weights.parent.name == "weights" and inside else nullcontext()


def load_run_data(cfg: RunConfig, ckpt: dict[str, Any], source: Path, data: DataSource | None = None) -> DataBundle:
    """The run's data as its weights saw it (their size, channels and statistics), all training images included."""
    # The data's own statistics are not used (the weights file's are); passing them skips computing them,
    # unless the model takes other channels than the images have (grey images fed to a colour backbone).
    stats = len(ckpt["mean"]) == ckpt["channels"]
    opts = data_options(cfg, image_size=tuple(ckpt["image_size"]), channels=ckpt["channels"],
                        mean=ckpt["mean"] if stats else None, std=ckpt["std"] if stats else None, train_samples=None,
                        offer_download=False)
    bundle = data(opts) if data is not None else load_data(cfg.data, opts)
    if bundle.skipped:
        log.warning(skipped_warning(bundle.skipped))
    check_classes(bundle, ckpt["classes"], source)
    return bundle


def check_classes(bundle: DataBundle, classes: list[str], source: Path) -> None:
    """The data must have the classes the weights were trained on, in the same order."""
    have = bundle.info.classes
    if len(have) != len(classes):
        raise ImgrecError(f"{source} was trained on {len(classes)} classes but {bundle.info.name} has {len(have)}")
    if list(have) != list(classes):
        raise ImgrecError(f"{source} was trained on classes {classes[:4]}... but {bundle.info.name} has {have[:4]}...")
