"""Figures of images written to PNG: training curves, image grids, predictions and explanation overlays.

matplotlib (Agg backend) is imported only when a figure is drawn. Imports: numpy and matplotlib only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RIGHT, WRONG = "#1b7f3b", "#c62828"  # title and frame colours of right and wrong predictions


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use (keeps `imgrec --help` light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.93, wspace=0.18)  # no layout pass: one draw
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train")
        val = [r.get(f"val_{key}", math.nan) for r in rows]
        if not all(math.isnan(v) for v in val):
            ax.plot(epochs, val, "o-", label="validation")
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(epochs)  # whole epochs only, even for a single one
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_image_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, colors: Sequence[str] | None = None,
                    columns: int = 8) -> Path:
    """A grid of images (N, C, H, W) with values in [0, 1], one title under each."""
    plt = pyplot()
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.85 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = np.transpose(images[i], (1, 2, 0))  # (C, H, W) -> (H, W, C), the tutorial's imgConvert order
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_prediction_grid(images: np.ndarray, titles: Sequence[str], wrong: Sequence[bool], path: str | Path,
                         heading: str | None = None, columns: int = 8) -> Path:
    """Images (N, C, H, W) in [0, 1] with their prediction titles; wrong ones framed and titled in red.

    One axes in inch coordinates holds every image (an axes per image would cost seconds per figure).
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    cell_w, side, band = 1.5, 1.3, 0.05 + 0.2 * lines  # inches: cell width, image box, title band
    top = 0.45 if heading else 0.1
    width, height = cell_w * columns, top + (side + band + 0.1) * rows
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # y grows downwards, like the rows
    ax.axis("off")
    h, w = images.shape[2:] if n else (1, 1)
    scale = side / max(h, w)
    for i in range(n):
        row, col = divmod(i, columns)
        x0 = col * cell_w + (cell_w - w * scale) / 2
        y0 = top + row * (side + band + 0.1) + band + (side - h * scale) / 2
        extent = (x0, x0 + w * scale, y0 + h * scale, y0)
        picture = np.transpose(images[i], (1, 2, 0))  # (C, H, W) -> (H, W, C)
        if picture.shape[2] == 1:
            ax.imshow(picture[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", extent=extent)
        else:
            ax.imshow(picture, interpolation="nearest", extent=extent)
        colour = WRONG if wrong[i] else RIGHT
        ax.add_patch(Rectangle((x0, y0), w * scale, h * scale, fill=False, edgecolor=colour,
                               linewidth=3 if wrong[i] else 1))
        ax.text(col * cell_w + cell_w / 2, y0 - 0.04, titles[i], ha="center", va="bottom", fontsize=9, color=colour,
                linespacing=1.15)
    if heading:
        ax.text(width / 2, 0.08, heading, ha="center", va="top", fontsize=11)
    ax.set_aspect("auto")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_explanation(image: np.ndarray, heatmap: np.ndarray, title: str, method: str, path: str | Path) -> Path:
    """One image (C, H, W) in [0, 1] beside its heat-map (H, W) in [0, 1] laid over it."""
    plt = pyplot()
    fig, (ax_image, ax_heat) = plt.subplots(1, 2, figsize=(6.4, 3.6))
    for ax in (ax_image, ax_heat):
        ax.axis("off")
        _show_image(ax, image, dim=ax is ax_heat)
    overlay = ax_heat.imshow(heatmap, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
    ax_image.set_title("input", fontsize=9)
    ax_heat.set_title(method, fontsize=9)
    fig.colorbar(overlay, ax=ax_heat, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)



def _show_image(ax, image: np.ndarray, dim: bool = False) -> None:
    """Draw one (C, H, W) image in [0, 1]; dim=True greys it down so an overlay reads well."""
    picture = np.transpose(image, (1, 2, 0))  # (C, H, W) -> (H, W, C)
    if dim:
        picture = picture.mean(axis=2, keepdims=True) * 0.8
    if picture.shape[2] == 1:
        ax.imshow(picture[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest")


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float,
                 path: str | Path) -> Path:
    """The learning-rate range test: each step's loss and its smoothed curve against the rate (log scale), with
    the suggested rate marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.plot(lrs, losses, color="#9e9e9e", linewidth=0.8, label="loss of each step")
    ax.plot(lrs, smoothed, color="#1565c0", linewidth=2, label="smoothed")
    ax.axvline(suggestion, color=RIGHT, linestyle="--", label=f"suggested --lr {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(smoothed) * 0.95, max(smoothed[0], min(smoothed)) * 1.3)
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
