"""What the commands do, end to end: train a run, evaluate weights, show samples.

This is the one place where data, models, the engine and evaluation meet; the CLI only parses arguments and
calls these functions, which return plain results (and raise ImgrecError for the user to read).
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgrec.config import RunConfig, default_cache_dir
from imgrec.data.datasets import DataOptions, load_data
from imgrec.data.info import DataBundle, DatasetInfo
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchTransform, denormalize, parse_augment
from imgrec.engine.checkpoint import load_model_state, load_weights_file, resolve_weights, run_dir_of
from imgrec.engine.runs import create_run_dir, default_run_name, read_results, write_json
from imgrec.engine.system import (
    autocast_dtype,
    git_commit,
    seed_everything,
    select_device,
    set_threads,
    versions,
)
from imgrec.engine.trainer import FitResult, evaluate, fit
from imgrec.errors import ImgrecError
from imgrec.evaluation.metrics import classification_report
from imgrec.finetune import InputSpec, fit_on_features, input_spec, load_source, resolve_source, transfer_plan
from imgrec.models.registry import build_model, count_parameters
from imgrec.models.transfer import TransferModel

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 500


@dataclass
class TrainOutcome:
    run_dir: Path
    summary: dict[str, Any]


def data_options(cfg: RunConfig, **overrides: Any) -> DataOptions:
    """DataOptions from the run's config, with overrides (inference rebuilds data as the model saw it)."""
    opts = DataOptions(
        data_dir=cfg.data_root, cache_dir=default_cache_dir(), download=cfg.download, image_size=cfg.image_size,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed,
        train_samples=cfg.train_samples, loader=cfg.loader, workers=cfg.workers, mean=cfg.mean, std=cfg.std,
    )
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


def train(cfg: RunConfig) -> TrainOutcome:
    """Load the data, build the model, fit, test the best weights, and write the run folder."""
    set_threads(cfg.threads)
    select_device(cfg.device)  # a bad --device fails before any data is loaded
    started = time.perf_counter()
    source = resolve_source(cfg)  # --pretrained / --weights: a missing or foreign file fails before the data loads
    bundle = load_data(cfg.data, data_options(cfg))
    info = bundle.info
    for note in bundle.notes:
        log.info(note)
    # Seed after loading: decoding a folder the first time draws from torch's generator, a cached load does not.
    seed_everything(cfg.seed, cfg.deterministic)
    spec = input_spec(info, source)
    model = build_model(cfg.model, info.num_classes, spec.channels, spec.size)  # a new head for the data's classes
    if source:
        load_source(model, cfg.model, source)
    params = count_parameters(model)
    run_dir = create_run_dir(cfg.project, cfg.name or default_run_name(cfg.data, cfg.model), cfg.exist_ok)
    cfg.save(run_dir / "config.yaml")
    if bundle.manifest:
        _write_manifest(bundle.manifest, run_dir / "split.csv")
    log.info(f"run folder: {run_dir}")
    log.info(f"data: {info.name}: {len(bundle.train)} train / {len(bundle.val) if bundle.val else 0} val / "
             f"{len(bundle.test)} test, {info.num_classes} classes, {info.channels}x{info.image_size[0]}x{info.image_size[1]}")
    log.info(f"model: {cfg.model}, {params:,} parameters" + (f", weights from {source.description}" if source else ""))
    if source:
        log.info(transfer_plan(cfg, info, spec))
    plain = BatchTransform(spec.mean, spec.std, size=spec.size, channels=spec.channels)
    meta = weights_meta(cfg, info, model, spec)
    result, feature_seconds = _fit(cfg, bundle, model, spec, plain, run_dir, meta)

    best = load_weights_file(run_dir / "weights" / "best.pt")
    load_model_state(model, best["state_dict"], run_dir / "weights" / "best.pt")
    test_loader = make_loader(bundle.test, EVAL_BATCH_SIZE, plain, train=False, workers=cfg.workers)
    metrics = _evaluate_split(model, test_loader, info.classes, cfg)
    metrics.update(split="test", data=cfg.data, weights=str(run_dir / "weights" / "best.pt"))
    write_json(run_dir / "metrics.json", metrics)
    summary = {
        "data": cfg.data, "model": cfg.model, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
        "best_val_accuracy": result.best_val_accuracy, "params": params,
        "train_seconds": round(result.train_seconds, 3), "images_per_second": round(result.images_per_second, 1),
        "total_seconds": round(time.perf_counter() - started, 3), "stopped_early": result.stopped_early,
        "train_images": len(bundle.train), "classes": info.classes, "versions": versions(), "git_commit": git_commit(),
    }
    if source:
        summary.update(weights_source=source.description, feature_cache_seconds=feature_seconds)
    write_json(run_dir / "summary.json", summary)
    from imgrec.evaluation.plots import plot_results

    plot_results(read_results(run_dir / "results.csv"), run_dir / "results.png")
    return TrainOutcome(run_dir, summary)


def _fit(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec, plain: BatchTransform,
         run_dir: Path, meta: dict[str, Any]) -> tuple[FitResult, float | None]:
    """fit() on batches of images, or (--cache-features) on the backbone's features computed once."""
    if cfg.cache_features:
        assert isinstance(model, TransferModel)
        return fit_on_features(model, bundle.train, bundle.val, plain, cfg, run_dir, meta, EVAL_BATCH_SIZE)
    augment = parse_augment(cfg.augment, bundle.info.channels, photos=isinstance(model, TransferModel))
    transform = BatchTransform(spec.mean, spec.std, augment, size=spec.size, channels=spec.channels)
    train_loader = make_loader(bundle.train, cfg.batch_size, transform, train=True, seed=cfg.seed, workers=cfg.workers)
    val_loader = make_loader(bundle.val, EVAL_BATCH_SIZE, plain, train=False, workers=cfg.workers) if bundle.val else None
    return fit(model, train_loader, val_loader, cfg, run_dir, meta), None


def weights_meta(cfg: RunConfig, info: DatasetInfo, model: torch.nn.Module, spec: InputSpec | None = None,
                 ) -> dict[str, Any]:
    """What a weights file records besides the tensors: enough to rebuild the model and its preprocessing.

    image_size and channels say how images are decoded; input_size and input_channels what the model takes
    (batches are resized and converted on the fly); mean and std have input_channels values.
    """
    spec = spec or input_spec(info, None)
    return {
        "kind": "imgrec-weights",
        "model": {"name": cfg.model, "num_classes": info.num_classes, "in_channels": spec.channels,
                  "image_size": list(spec.size)},
        "classes": list(info.classes), "channels": info.channels, "image_size": list(info.image_size),
        "input_channels": spec.channels, "input_size": list(spec.size),
        "mean": list(spec.mean), "std": list(spec.std), "data": cfg.data, "config": cfg.to_dict(),
        "params": count_parameters(model), "versions": versions(), "git_commit": git_commit(),
    }


def eval_transform(ckpt: dict[str, Any]) -> BatchTransform:
    """The preprocessing a weights file's model was trained with (older files: the images as decoded)."""
    return BatchTransform(ckpt["mean"], ckpt["std"], size=ckpt.get("input_size"), channels=ckpt.get("input_channels"))


def _evaluate_split(model: torch.nn.Module, loader: Any, classes: list[str], cfg: RunConfig) -> dict[str, Any]:
    device = select_device(cfg.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    result = evaluate(model, loader, device, autocast_dtype(cfg.precision, device), memory_format, collect=True)
    assert result.logits is not None and result.targets is not None
    return classification_report(result.logits, result.targets, classes)


def load_run(run_or_weights: str | Path) -> tuple[Path, dict[str, Any], RunConfig, torch.nn.Module]:
    """Weights path, checkpoint, config and a model with the weights loaded."""
    path = resolve_weights(run_or_weights)
    ckpt = load_weights_file(path)
    cfg = RunConfig.from_dict(ckpt.get("config") or {}, source=str(path))
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    load_model_state(model, ckpt["state_dict"], path)
    return path, ckpt, cfg, model


def evaluate_run(run_or_weights: str | Path, data: str | None = None, split: str = "test",
                 out: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate saved weights on a split of their data set (or another with the same classes); write metrics.json."""
    path, ckpt, cfg, model = load_run(run_or_weights)
    if data:
        cfg.data = data
    if device:
        cfg.device = device
    # The data's own statistics are not used (the weights file's are); passing them skips computing them,
    # unless the model takes other channels than the images have (grey images fed to a colour backbone).
    stats = len(ckpt["mean"]) == ckpt["channels"]
    bundle = load_data(cfg.data, data_options(cfg, image_size=tuple(ckpt["image_size"]), channels=ckpt["channels"],
                                              mean=ckpt["mean"] if stats else None, std=ckpt["std"] if stats else None,
                                              train_samples=None))
    check_classes(bundle, ckpt["classes"], path)
    try:
        chosen = bundle.split(split)
    except KeyError:
        raise ImgrecError(f"{cfg.data} has no {split} split") from None
    loader = make_loader(chosen, EVAL_BATCH_SIZE, eval_transform(ckpt), train=False)
    metrics = _evaluate_split(model, loader, ckpt["classes"], cfg)
    metrics.update(split=split, data=cfg.data, weights=str(path))
    out_path = Path(out) if out else run_dir_of(path) / "metrics.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, metrics)
    metrics["written_to"] = str(out_path)
    return metrics


def check_classes(bundle: DataBundle, classes: list[str], source: Path) -> None:
    """The data must have the classes the weights were trained on, in the same order."""
    have = bundle.info.classes
    if len(have) != len(classes):
        raise ImgrecError(f"{source} was trained on {len(classes)} classes but {bundle.info.name} has {len(have)}")
    if list(have) != list(classes):
        raise ImgrecError(f"{source} was trained on classes {classes[:4]}... but {bundle.info.name} has {have[:4]}...")


def show_samples(cfg: RunConfig, out: str | Path, n: int = 32, split: str = "train", augmented: bool = False) -> Path:
    """A PNG grid of de-normalised images with their labels (optionally as training augments them)."""
    bundle = load_data(cfg.data, data_options(cfg, train_samples=None))
    info = bundle.info
    try:
        chosen = bundle.split(split)
    except KeyError:
        raise ImgrecError(f"{cfg.data} has no {split} split") from None
    augment = parse_augment(cfg.augment, info.channels) if augmented else []
    # train=True: a shuffled sample; augmentation only when asked for (augment is empty otherwise)
    loader = make_loader(chosen, min(n, len(chosen)), BatchTransform(info.mean, info.std, augment), train=True,
                         seed=cfg.seed, workers=0)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    images = denormalize(x, info.mean, info.std).numpy()
    titles = [info.classes[int(label)] for label in y]
    from imgrec.evaluation.plots import plot_image_grid

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_image_grid(images, titles, out)


def _write_manifest(rows: list[tuple[str, str, str]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "class", "split"))
        writer.writerows(rows)
