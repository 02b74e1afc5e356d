"""Figures: plot_results and plot_image_grid write PNGs that PIL can open, for grey and colour images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.evaluation.plots import plot_image_grid, plot_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _open_png(path: Path) -> Image.Image:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.copy()


def _rows(epochs: int, with_val: bool = True) -> list[dict[str, float]]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append({
            "epoch": float(e), "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e,
            "val_loss": 2.2 / e if with_val else math.nan, "val_acc": 1 - 0.6 / e if with_val else math.nan,
            "lr": 1e-3, "seconds": 1.0,
        })
    return rows


@pytest.mark.parametrize("epochs,with_val", [(1, True), (5, True), (3, False)])
def test_plot_results_writes_png(tmp_path: Path, epochs: int, with_val: bool) -> None:
    out = plot_results(_rows(epochs, with_val), tmp_path / "results.png")
    assert out == tmp_path / "results.png"
    img = _open_png(out)
    assert img.width > 300 and img.height > 200


def test_plot_results_accepts_rows_without_val_keys(tmp_path: Path) -> None:
    rows = [{"epoch": 1.0, "train_loss": 1.0, "train_acc": 0.5}, {"epoch": 2.0, "train_loss": 0.5, "train_acc": 0.7}]
    _open_png(plot_results(rows, tmp_path / "r.png"))


def test_plot_results_reads_a_real_results_csv(tmp_path: Path) -> None:
    from imgrec.engine.runs import ResultsLog, read_results

    log = ResultsLog(tmp_path / "results.csv")
    log.append({"epoch": 1, "train_loss": 1.5, "train_acc": 0.4, "val_loss": None, "val_acc": None, "lr": 0.001,
                "seconds": 0.5})
    log.append({"epoch": 2, "train_loss": 1.0, "train_acc": 0.6, "val_loss": None, "val_acc": None, "lr": 0.001,
                "seconds": 0.5})
    rows = read_results(tmp_path / "results.csv")
    assert math.isnan(rows[0]["val_acc"])
    _open_png(plot_results(rows, tmp_path / "results.png"))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 8, 19])
def test_plot_image_grid_writes_png(tmp_path: Path, channels: int, n: int) -> None:
    rng = np.random.default_rng(n)
    images = rng.random((n, channels, 12, 10), dtype=np.float32)  # (N, C, H, W) in [0, 1]
    titles = [f"class {i}" for i in range(n)]
    out = plot_image_grid(images, titles, tmp_path / f"grid-{channels}-{n}.png")
    img = _open_png(out)
    assert img.width > 50 and img.height > 50


def test_plot_image_grid_more_images_make_a_taller_figure(tmp_path: Path) -> None:
    images = np.full((24, 3, 16, 16), 0.5, dtype=np.float32)
    small = _open_png(plot_image_grid(images[:8], ["x"] * 8, tmp_path / "a.png"))
    tall = _open_png(plot_image_grid(images, ["x"] * 24, tmp_path / "b.png"))
    assert tall.height > 2 * small.height
    assert tall.width == small.width


def test_plot_image_grid_with_colours_and_columns(tmp_path: Path) -> None:
    images = np.zeros((6, 1, 8, 8), dtype=np.float32)
    images[:, :, 2:6, 2:6] = 1.0
    colors = ["green", "red", "green", "red", "green", "red"]
    img = _open_png(plot_image_grid(images, [str(i) for i in range(6)], tmp_path / "c.png", colors=colors, columns=3))
    assert img.width > 50
    # the grey images were drawn: the figure has dark (black background) and white pixels
    grey = np.asarray(img.convert("L"))
    assert grey.min() < 30 and grey.max() > 225
