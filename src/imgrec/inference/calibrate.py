"""After training: calibration, and what prediction needs besides the weights, measured once and written into
the weights files.

`calibrate_run` is the one post-fit step of `workflows.train`. It rewrites weights/best.pt and weights/last.pt once
each (atomically, through engine.checkpoint.save_atomic), adding to each:
  temperature  the temperature of that file's weights, fitted on the validation split with the run's precision and
               test-time augmentation (evaluation.calibration; none without a validation split, with fewer
               than 50 images or no mistake in it, or where it would not lower the split's ECE)
  ood          {score, threshold, keep, split, count}: the out-of-distribution threshold of that file's own
               weights, set so that `keep` of the validation images score above it (with fewer than
               MIN_CALIBRATION validation images, up to MAX_CALIBRATION_TRAIN training images count too)
  background   "dark" or "light": the training images' border brightness (light strokes on dark, or not)
  object_extent  how much of the frame the training images' objects span (median over a sample)
  object_centred whether those objects sit in the middle of the frame (else photos are not re-centred)
Prediction (inference.predictor) reads them; files without them still predict, with a note.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.config import RunConfig
from imgrec.data.imageio import read_image
from imgrec.data.info import ArraySplit, DataBundle, FileSplit, Split
from imgrec.data.loaders import make_loader
from imgrec.data.photo import MEASURE_SAMPLES, measure_foreground
from imgrec.data.transforms import BatchTransform
from imgrec.engine.checkpoint import WEIGHTS_NAMES, load_model_state, load_weights_file, save_atomic
from imgrec.engine.system import EVAL_BATCH_SIZE, Compute
from imgrec.engine.trainer import evaluate
from imgrec.evaluation.calibration import TemperatureChoice, choose_temperature
from imgrec.evaluation.ood import DEFAULT_KEEP, DEFAULT_SCORE, OOD_SCORES, ood_threshold
from imgrec.models.registry import build_model

log = logging.getLogger(__name__)

MIN_CALIBRATION = 200  # a threshold from fewer validation images than this also uses the training images
MAX_CALIBRATION_TRAIN = 5000  # ... at most this many of them, evenly spaced
FILE_SAMPLES = 300  # streamed (file) training splits: images decoded for the background measurement


def calibrate_run(model: torch.nn.Module, val_loader: Any, run_dir: str | Path, bundle: DataBundle, cfg: RunConfig,
                  transform: BatchTransform, compute: Compute | None = None) -> dict[str, Any]:
    """Fit the temperature, measure the OOD threshold and the training images' background; add them to the run's
    weights files, each rewritten once.

    model: the trained model (it is loaded with each file's weights in turn); val_loader: the validation split
    (None: no temperature); transform: the model's evaluation preprocessing (normalisation, and its input size and
    channels); compute: the run's (default: from cfg). The temperature comes from the logits the run's precision and
    test-time augmentation give (those the report scales), the threshold from raw fp32 logits (those prediction
    computes) on calibration_split's images: two passes, as the two logits differ."""
    compute = compute or Compute.of(cfg)
    weights_dir = Path(run_dir) / "weights"
    foreground = measure_foreground(training_sample(bundle.train))
    split_name, split = calibration_split(bundle)
    loader = make_loader(split, EVAL_BATCH_SIZE, transform, train=False, workers=cfg.workers)
    # best.pt and last.pt often hold the same epoch's weights
    fitted: dict[Any, TemperatureChoice] = {}
    by_epoch: dict[Any, dict[str, Any]] = {}
    for name in WEIGHTS_NAMES:
        path = weights_dir / name
        if not path.is_file():
            continue
        ckpt = load_weights_file(path)
        key = ckpt.get("epoch")
        if key not in by_epoch:
            if val_loader is not None:
                fitted[key] = fit_file_temperature(model, ckpt, val_loader, cfg.tta, compute, path)
            by_epoch[key] = ood_entry(ckpt, loader, compute.fp32(), split_name, str(path))
        if val_loader is not None:
            ckpt["temperature"] = fitted[key].temperature
        ckpt.update(ood=by_epoch[key], **foreground)
        save_atomic(ckpt, path)
    _log_calibration(next(iter(fitted.values()), None), next(iter(by_epoch.values()), None), foreground, split_name)
    return {**foreground, "ood": next(iter(by_epoch.values()), None)}


def fit_file_temperature(model: torch.nn.Module, ckpt: dict[str, Any], val_loader: Any, tta: str, compute: Compute,
                         source: Path) -> TemperatureChoice:
    """The temperature of a weights file's model on the validation split (None where none is worth keeping), with
    the split's ECE before and after it."""
    load_model_state(model, ckpt["state_dict"], source)
    model.to(device=compute.device, memory_format=compute.memory_format)
    p = evaluate(model, val_loader, compute.device, compute.dtype, compute.memory_format, collect=True, tta=tta)
    assert p.logits is not None and p.targets is not None
    return choose_temperature(p.logits, p.targets)


def _log_calibration(fitted: TemperatureChoice | None, best: dict[str, Any] | None, foreground: dict[str, Any],
                     split_name: str) -> None:
    """The temperature (or why there is none) and what prediction will use, as the log shows them."""
    if fitted is None:
        log.info("no validation split: no temperature fitted (calibration is reported uncorrected)")
    elif fitted.temperature is None:
        log.info(f"no temperature: {fitted.why_not} (calibration is reported uncorrected)")
    else:
        log.info(f"temperature scaling: T = {fitted.temperature:.3f} (validation ECE {fitted.ece_before:.2%} -> "
                 f"{fitted.ece_after:.2%})")
    if best is not None:
        log.info(f"prediction: {foreground['background']} background, objects span {foreground['object_extent']:.0%} "
                 f"of the frame{'' if foreground['object_centred'] else ' (not centred)'}; "
                 f"'unsure' (unlike the training images) below a familiarity score of {best['threshold']:.3f} "
                 f"({best['score']} of the logits; {best['keep']:.0%} of {best['count']} {split_name} images are above)")


def ood_entry(ckpt: dict[str, Any], loader: Any, compute: Compute, split_name: str, source: str,
              score: str = DEFAULT_SCORE, keep: float = DEFAULT_KEEP) -> dict[str, Any]:
    """The OOD threshold of a weights file's model on one split's images (raw logits, fp32, no temperature)."""
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    load_model_state(model, ckpt["state_dict"], source)
    model.to(compute.device)
    result = evaluate(model, loader, compute.device, compute.dtype, compute.memory_format, collect=True)
    assert result.logits is not None
    scores = OOD_SCORES[score](result.logits)
    threshold = ood_threshold(scores, keep)
    if not math.isfinite(threshold):
        raise ValueError(f"non-finite OOD threshold from {source}")
    return {"score": score, "threshold": threshold, "keep": keep, "split": split_name, "count": int(scores.numel())}


def calibration_split(bundle: DataBundle) -> tuple[str, Split]:
    """The images the threshold is set on: the validation split, joined by training images when small (an evenly
    spaced sample of up to MAX_CALIBRATION_TRAIN of them: a 95% quantile needs no more, and a run without
    validation would otherwise pass over its whole training set once more)."""
    val = bundle.val
    if val is not None and len(val) >= MIN_CALIBRATION:
        return "val", val
    train = _evenly_spaced(bundle.train, MAX_CALIBRATION_TRAIN)
    if val is None or len(val) == 0:
        return "train", train
    if isinstance(val, ArraySplit) and isinstance(train, ArraySplit):
        return "val+train", ArraySplit(torch.cat([val.images, train.images]), torch.cat([val.labels, train.labels]))
    if isinstance(val, FileSplit) and isinstance(train, FileSplit):
        return "val+train", FileSplit(val.paths + train.paths, torch.cat([val.labels, train.labels]), val.channels,
                                      val.image_size)
    return "val", val


def _evenly_spaced(split: Split, most: int) -> Split:
    """The split itself, or every k-th of its images when it has more than `most`."""
    if len(split) <= most:
        return split
    return split.subset(torch.arange(0, len(split), math.ceil(len(split) / most)))


def training_sample(split: Split) -> np.ndarray:
    """Up to MEASURE_SAMPLES training images (FILE_SAMPLES for streamed files), evenly spaced: uint8 (N, C, H, W)."""
    if isinstance(split, ArraySplit):
        return _evenly_spaced(split, MEASURE_SAMPLES).images.numpy()
    files = _evenly_spaced(split, FILE_SAMPLES)
    return np.stack([read_image(p, files.channels, files.image_size).numpy() for p in files.paths])
