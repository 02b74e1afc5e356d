"""`imgrec explain`: heat-maps of where a run's model looks, over image files or its worst test mistakes.

Files are read with the project's one decoder (data.imageio.read_image: load_image + resize_center) at the
size and channels the weights record, and normalised with the weights' mean/std. The heat-maps come from
evaluation.explain (Grad-CAM, or saliency for models without convolutions); one PNG per image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgrec.data.imageio import read_image
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import denormalize, weights_transform
from imgrec.engine.checkpoint import run_dir_of
from imgrec.engine.system import select_device
from imgrec.errors import UsageError
from imgrec.evaluation.explain import Explanation, explain
from imgrec.evaluation.metrics import worst_mistakes
from imgrec.reporting import EVAL_BATCH_SIZE, model_inputs, predict
from imgrec.saved_runs import DataSource, load_run, load_run_data, own_run_folder


@dataclass
class ExplainedImage:
    """One written heat-map and the prediction it explains."""

    source: str  # the image file, or "test image #i"
    png: Path
    predicted: str
    probability: float
    true: str | None
    method: str


@dataclass
class ExplainOutcome:
    out_dir: Path
    images: list[ExplainedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def explain_run(run_or_weights: str | Path, images: Sequence[str] = (), mistakes: int = 0, out: str | Path | None = None,
                method: str = "auto", device: str | None = None, data_dir: str | None = None,
                source: DataSource | None = None) -> ExplainOutcome:
    """Write one heat-map PNG per image file and per worst test mistake (the first `mistakes` of them).
    source: the run's data when it was passed from Python (its test split holds the mistakes)."""
    if not images and not mistakes:
        raise UsageError("nothing to explain: give image files, or --mistakes N for the N worst test mistakes")
    if mistakes < 0:
        raise UsageError("--mistakes must not be negative")
    path, ckpt, cfg, model = load_run(run_or_weights, data_dir)
    if device:
        cfg.device = device
    # Decode every file before any work, so a bad file fails at once and names itself.
    pixels = [read_image(image, ckpt["channels"], tuple(ckpt["image_size"])) for image in images]
    out_dir = Path(out) if out else run_dir_of(path) / "explanations"
    outcome = ExplainOutcome(out_dir)
    target = select_device(cfg.device)
    model.to(target)
    with own_run_folder(path, out_dir):  # one command at a time writes into a run folder
        out_dir.mkdir(parents=True, exist_ok=True)
        if pixels:
            x = weights_transform(ckpt)(torch.stack(pixels))
            names = _unique_names([Path(image).stem for image in images])
            for image, name, xi in zip(images, names, x):
                _explain_one(model, xi, ckpt, method, str(image), None, out_dir / f"{name}.png", outcome)
        if mistakes:
            _explain_mistakes(model, ckpt, cfg, path, mistakes, method, out_dir, outcome, source)
    return outcome


def _explain_mistakes(model: torch.nn.Module, ckpt: dict[str, Any], cfg: Any, path: Path, n: int, method: str,
                      out_dir: Path, outcome: ExplainOutcome, source: DataSource | None = None) -> None:
    bundle = load_run_data(cfg, ckpt, path, source)
    loader = make_loader(bundle.test, EVAL_BATCH_SIZE, weights_transform(ckpt), train=False,
                         workers=cfg.workers)
    p = predict(model, loader, cfg)
    worst = worst_mistakes(p.logits, p.targets, n)
    if len(worst) < n:
        outcome.notes.append(f"the test split has {len(worst)} mistakes, fewer than the {n} asked for")
    if not len(worst):
        return
    classes = ckpt["classes"]
    x = model_inputs(bundle.test, worst, ckpt)
    for rank, (index, xi) in enumerate(zip(worst.tolist(), x), start=1):
        true = classes[int(p.targets[index])]
        predicted = classes[int(p.logits[index].argmax())]
        name = f"mistake-{rank:02d}-{_safe(true)}-as-{_safe(predicted)}"
        _explain_one(model, xi, ckpt, method, f"test image #{index}", true, out_dir / f"{name}.png", outcome)


def _explain_one(model: torch.nn.Module, x: torch.Tensor, ckpt: dict[str, Any], method: str, source: str,
                 true: str | None, png: Path, outcome: ExplainOutcome) -> None:
    from imgrec.evaluation.plots import plot_explanation

    device = next(model.parameters()).device
    e = explain(model, x[None].to(device), method, temperature=ckpt.get("temperature"))
    if e.note and e.note not in outcome.notes:
        outcome.notes.append(e.note)
    predicted, probability = ckpt["classes"][e.target], float(e.probabilities[e.target])
    title = f"{Path(source).name}: {predicted} {probability:.1%}" + (f" (true: {true})" if true else "")
    image = denormalize(x[None].cpu(), ckpt["mean"], ckpt["std"])[0].numpy()
    plot_explanation(image, e.heatmap.numpy(), title, _method_label(e), png)
    outcome.images.append(ExplainedImage(source, png, predicted, probability, true, _method_label(e)))


def _method_label(e: Explanation) -> str:
    if e.method == "Grad-CAM":
        h, w = e.feature_size or (0, 0)
        return f"Grad-CAM on {e.layer} ({h}x{w})"
    return "input-gradient saliency"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "class"


def _unique_names(stems: list[str]) -> list[str]:
    """File stems made safe and unique (a second cat.jpg becomes cat-2)."""
    seen: dict[str, int] = {}
    names = []
    for stem in stems:
        base = _safe(stem)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names
