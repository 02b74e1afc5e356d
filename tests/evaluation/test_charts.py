"""The report's figures: confusion matrices, reliability diagrams, comparisons, prediction grids, heat-maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.evaluation.charts import plot_comparison, plot_confusion_matrix, plot_reliability
from imgrec.evaluation.metrics import calibration_bins, reliability_table
from imgrec.evaluation.plots import plot_explanation, plot_prediction_grid


def _png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.convert("RGB")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n", [2, 10, 40])
def test_confusion_matrix_png(tmp_path: Path, n: int, normalize: bool) -> None:
    rng = np.random.default_rng(n)
    matrix = rng.integers(0, 50, size=(n, n)).tolist()
    matrix[0] = [0] * n  # a class absent from the split: no division by zero
    classes = [f"class name {i}" for i in range(n)]
    img = _png(plot_confusion_matrix(matrix, classes, tmp_path / "cm.png", normalize=normalize))
    assert img.width > 400 and img.height > 400


def test_confusion_matrix_grows_with_the_classes(tmp_path: Path) -> None:
    small = _png(plot_confusion_matrix(np.eye(3, dtype=int).tolist(), list("abc"), tmp_path / "a.png"))
    large = _png(plot_confusion_matrix(np.eye(20, dtype=int).tolist(), [str(i) for i in range(20)], tmp_path / "b.png"))
    assert large.width > small.width and large.height > small.height


def test_reliability_diagram_one_and_two_panels(tmp_path: Path) -> None:
    logits = torch.randn(300, 5) * 3
    targets = torch.arange(300) % 5
    rows = reliability_table(*calibration_bins(logits, targets))
    one = _png(plot_reliability([("softmax", rows, 0.2)], tmp_path / "one.png"))
    two = _png(plot_reliability([("before", rows, 0.2), ("after", rows, 0.05)], tmp_path / "two.png"))
    assert two.width > 1.7 * one.width and two.height == one.height
    empty = reliability_table(*calibration_bins(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)))
    _png(plot_reliability([("nothing", empty, 0.0)], tmp_path / "empty.png"))


def test_comparison_png(tmp_path: Path) -> None:
    runs = [{"name": "a", "train_seconds": 12.0, "test_accuracy": 0.8, "val_acc": [0.5, 0.7, 0.8]},
            {"name": "b", "train_seconds": 40.0, "test_accuracy": 0.9, "val_acc": [float("nan")] * 2}]
    img = _png(plot_comparison(runs, tmp_path / "compare.png"))
    assert img.width > 800


@pytest.mark.parametrize("channels", [1, 3])
def test_prediction_grid_frames_the_wrong_ones_in_red(tmp_path: Path, channels: int) -> None:
    images = np.full((4, channels, 12, 20), 0.5, dtype=np.float32)  # not square
    titles = ["cat 90%", "dog 80%\ntrue: cat", "cat 99%", "fox 51%\ntrue: dog"]
    img = _png(plot_prediction_grid(images, titles, [False, True, False, True], tmp_path / "g.png", heading="four"))
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 170) & (pixels[:, 1] < 90) & (pixels[:, 2] < 90)
    green = (pixels[:, 1] > 100) & (pixels[:, 0] < 60) & (pixels[:, 2] < 90)
    assert red.sum() > 100 and green.sum() > 20


@pytest.mark.parametrize("channels", [1, 3])
def test_explanation_png(tmp_path: Path, channels: int) -> None:
    image = np.random.default_rng(0).random((channels, 20, 24), dtype=np.float32)
    heatmap = np.zeros((20, 24), dtype=np.float32)
    heatmap[:5, :5] = 1.0
    img = _png(plot_explanation(image, heatmap, "x.png: cat 91.0%", "Grad-CAM on features.3 (8x8)", tmp_path / "e.png"))
    assert img.width > 500 and img.height > 250
