"""What a trained model learned, written into its run folder: metrics.json, figures and report.html; and
`imgrec evaluate` (evaluate_run: saved weights on a split of their data, or of another set with the same classes).

The temperature itself is fitted after training by inference.calibrate (calibrate_run), with the rest of calibration.
This module runs the model over a split and writes files; the numbers, figures and HTML come from the pure
functions of imgrec.evaluation. workflows.py calls it; it never imports workflows or cli.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from imgrec.config import RunConfig
from imgrec.data.info import DataBundle, Split
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import denormalize, weights_transform
from imgrec.engine.checkpoint import run_dir_of
from imgrec.engine.runs import read_results, write_json, write_text
from imgrec.engine.system import EVAL_BATCH_SIZE, Compute
from imgrec.engine.trainer import Loader, evaluate
from imgrec.errors import ImgrecError
from imgrec.evaluation.calibration import apply_temperature, calibration_summary
from imgrec.evaluation.drawing import FigureDrawer
from imgrec.evaluation.metrics import classification_report, worst_mistakes
from imgrec.saved_runs import DataSource, load_run, load_run_data, own_run_folder

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 32
MISTAKE_IMAGES = 24
FIGURES = ("confusion_matrix", "confusion_matrix_normalized", "mistakes", "samples", "calibration")


@dataclass
class Predictions:
    """Raw logits of a split, in the split's order, with how long they took."""

    logits: torch.Tensor  # (N, num_classes) float32, before any temperature
    targets: torch.Tensor  # (N,)
    seconds: float
    device: str


def predict(model: torch.nn.Module, loader: Loader, cfg: RunConfig, compute: Compute | None = None) -> Predictions:
    """Logits and targets of every batch of an unshuffled loader, on the run's device and precision (compute;
    default: from cfg), with the run's test-time augmentation."""
    compute = compute or Compute.of(cfg)
    model.to(device=compute.device, memory_format=compute.memory_format)
    start = time.perf_counter()
    result = evaluate(model, loader, compute.device, compute.dtype, compute.memory_format, collect=True, tta=cfg.tta)
    assert result.logits is not None and result.targets is not None
    return Predictions(result.logits, result.targets, time.perf_counter() - start, compute.device.type)


def evaluate_run(run_or_weights: str | Path, data: str | None = None, split: str = "test",
                 out: str | Path | None = None, device: str | None = None, data_dir: str | None = None,
                 source: DataSource | None = None) -> dict[str, Any]:
    """Evaluate saved weights on a split of their data set (or another with the same classes); write metrics.json,
    the figures and report.html into out (default: the run folder). source: the data when it has no name."""
    with FigureDrawer() as drawer:  # its worker loads matplotlib while the weights and the data load
        return _evaluate_run(run_or_weights, data, split, out, device, data_dir, source, drawer)


def _evaluate_run(run_or_weights: str | Path, data: str | None, split: str, out: str | Path | None,
                  device: str | None, data_dir: str | None, source: DataSource | None,
                  drawer: FigureDrawer) -> dict[str, Any]:
    path, ckpt, cfg, model = load_run(run_or_weights, data_dir)
    if data:
        cfg.data = data
    if device:
        cfg.device = device
    bundle = load_run_data(cfg, ckpt, path, source)
    try:
        chosen = bundle.split(split)
    except KeyError:
        raise ImgrecError(f"{cfg.data} has no {split} split") from None
    out_dir = Path(out) if out else run_dir_of(path)
    with own_run_folder(path, out_dir):
        metrics = report_split(model, ckpt, chosen, split, cfg, out_dir, dataset_summary(bundle), drawer)
        metrics.update(data=cfg.data, weights=str(path))
        write_json(out_dir / "metrics.json", metrics)
        drawer.finish()
        report = write_html_report(out_dir, run_dir_of(path), metrics, config=ckpt.get("config"))
    metrics["written_to"] = str(out_dir / "metrics.json")
    metrics["report"] = str(report)
    return metrics


def dataset_summary(bundle: DataBundle) -> dict[str, Any]:
    """The data's description and split sizes, as the report shows them."""
    sizes = {"train": len(bundle.train), "val": len(bundle.val) if bundle.val is not None else None,
             "test": len(bundle.test)}
    return {**bundle.info.to_dict(), "split_sizes": sizes}


def report_split(model: torch.nn.Module, ckpt: dict[str, Any], split: Split, split_name: str, cfg: RunConfig,
                 out_dir: Path, dataset: dict[str, Any], drawer: FigureDrawer,
                 compute: Compute | None = None) -> dict[str, Any]:
    """Run the model over a split (compute: default from cfg); return its metrics and ask the drawer for the
    figures in out_dir (its finish() waits for them)."""
    classes = ckpt["classes"]
    loader = make_loader(split, EVAL_BATCH_SIZE, weights_transform(ckpt), train=False, workers=cfg.workers)
    p = predict(model, loader, cfg, compute)
    temperature = ckpt.get("temperature")
    metrics = classification_report(p.logits, p.targets, classes)
    metrics["split"] = split_name
    metrics["calibration"] = calibration_summary(p.logits, p.targets, temperature)
    metrics["dataset"] = dataset
    metrics["timing"] = {"seconds": round(p.seconds, 3), "images_per_second": round(len(p.targets) / max(p.seconds, 1e-9), 1),
                         "device": p.device}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_figures(metrics, p, split, ckpt, out_dir, drawer)
    return metrics


def _write_figures(metrics: dict[str, Any], p: Predictions, split: Split, ckpt: dict[str, Any], out_dir: Path,
                   drawer: FigureDrawer) -> None:
    from imgrec.evaluation.charts import plot_confusion_matrix, plot_reliability
    from imgrec.evaluation.plots import plot_prediction_grid

    classes = ckpt["classes"]
    drawer.draw(plot_confusion_matrix, metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png")
    drawer.draw(plot_confusion_matrix, metrics["confusion_matrix"], classes, out_dir / "confusion_matrix_normalized.png",
                normalize=True)
    cal = metrics["calibration"]
    panels = [("before temperature scaling" if cal["temperature"] else "softmax probabilities", metrics["reliability"],
               metrics["ece"])]
    if cal["temperature"]:
        panels.append((f"after temperature scaling (T = {cal['temperature']:.3f})", cal["reliability_after"], cal["ece_after"]))
    drawer.draw(plot_reliability, panels, out_dir / "calibration.png")
    probs = torch.softmax(apply_temperature(p.logits.double(), ckpt.get("temperature")), dim=1)
    wrong_idx = worst_mistakes(p.logits, p.targets, MISTAKE_IMAGES)
    heading = f"{len(wrong_idx)} most confident mistakes of {int((p.logits.argmax(1) != p.targets).sum()):,}"
    titles = [f"true: {classes[int(p.targets[i])]}\npred: {classes[int(probs[i].argmax())]} {float(probs[i].max()):.0%}"
              for i in wrong_idx]
    if len(wrong_idx):
        drawer.draw(plot_prediction_grid, display_images(split, wrong_idx, ckpt), titles, [True] * len(titles),
                    out_dir / "mistakes.png", heading=heading)
    else:
        (out_dir / "mistakes.png").unlink(missing_ok=True)  # no mistakes: no stale figure from an earlier run
    generator = torch.Generator().manual_seed(0)
    sample_idx = torch.randperm(len(p.targets), generator=generator)[:SAMPLE_IMAGES].sort().values
    wrong = [bool(probs[i].argmax() != p.targets[i]) for i in sample_idx]
    titles = [f"{classes[int(probs[i].argmax())]} {float(probs[i].max()):.0%}"
              + (f"\ntrue: {classes[int(p.targets[i])]}" if w else "") for i, w in zip(sample_idx, wrong)]
    drawer.draw(plot_prediction_grid, display_images(split, sample_idx, ckpt), titles, wrong, out_dir / "samples.png",
                heading=f"{sum(wrong)} of {len(wrong)} sample predictions wrong (framed in red)")


def model_inputs(split: Split, indices: torch.Tensor, ckpt: dict[str, Any]) -> torch.Tensor:
    """The normalised inputs (B, C, H, W) the model saw for these rows of the split."""
    loader = make_loader(split.subset(indices), max(1, len(indices)), weights_transform(ckpt),
                         train=False, workers=0)
    return next(iter(loader))[0]


def display_images(split: Split, indices: torch.Tensor, ckpt: dict[str, Any]) -> Any:
    """Those inputs de-normalised for display: a numpy array (B, C, H, W) in [0, 1]."""
    return denormalize(model_inputs(split, indices, ckpt), ckpt["mean"], ckpt["std"]).numpy()


def write_html_report(out_dir: Path, run_dir: Path, metrics: dict[str, Any], config: dict[str, Any] | None = None,
                      summary: dict[str, Any] | None = None) -> Path:
    """report.html in out_dir from the metrics, the figures in out_dir and the run's files in run_dir
    (config: what the weights file records, for weights outside a run folder; summary: the run's, when its
    summary.json is not written yet)."""
    from imgrec.evaluation.html import render_report

    summary = summary or _read_json(run_dir / "summary.json")
    config = _read_yaml(run_dir / "config.yaml") or config
    results = read_results(run_dir / "results.csv") if (run_dir / "results.csv").is_file() else None
    images = {name: _read_bytes(out_dir / f"{name}.png") for name in FIGURES}
    images["results"] = _read_bytes(run_dir / "results.png")
    page = render_report({"title": run_dir.name, "metrics": metrics, "summary": summary, "config": config,
                          "results": results}, images)
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return values if isinstance(values, dict) else None


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None
