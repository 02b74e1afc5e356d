"""Charts of numbers: confusion matrices, reliability diagrams and run comparisons (matplotlib Agg, lazily).

Each function takes plain values (lists, numbers, class names) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgrec.evaluation.plots import pyplot


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                          normalize: bool = False) -> Path:
    """Rows = true class, columns = predicted; normalize=True divides each row by its count (recall on the diagonal)."""
    plt = pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    values = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    side = min(16.0, max(4.5, 0.42 * n + 2.4)) - 1.4  # inches: the matrix's square
    label_size = 10 if n <= 20 else 8 if n <= 40 else 5
    # Margins from the longest class name (DejaVu Sans averages about 0.6 em a character), set once: a tight
    # layout would measure every text by drawing the figure an extra time (about a third of its cost).
    label = max((len(c) for c in classes), default=1) * label_size * 0.6 / 72
    left, bottom, top, right = label + 0.65, 0.71 * label + 0.65, 0.45, 1.1  # right: the colour bar
    fig, ax = plt.subplots(figsize=(left + side + right, bottom + side + top))
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor", fontsize=label_size)
    ax.set_yticks(range(n), labels=list(classes), fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix, normalised by true class" if normalize else "confusion matrix (counts)")
    if n <= 30:
        threshold = values.max() / 2 if values.max() > 0 else 1
        for (row, col), value in np.ndenumerate(values):
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            if not normalize and value == 0:
                text = "·"
            ax.text(col, row, text, ha="center", va="center", fontsize=9 if n <= 12 else 7,
                    color="white" if value > threshold else "#222222")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_reliability(panels: Sequence[tuple[str, Sequence[dict[str, Any]], float]], path: str | Path) -> Path:
    """Reliability diagrams side by side: (title, reliability rows, ECE) each; accuracy per confidence bin
    against the diagonal of perfect calibration, with the gap shaded and the bin counts below."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 5.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = 4.6 * len(panels)  # fixed margins in inches (fixed labels): no layout pass that draws the figure twice
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.6 / 5.4, top=1 - 0.55 / 5.4,
                        wspace=0.9 * len(panels) / width, hspace=0.08)
    for col, (title, rows, error) in enumerate(panels):
        ax, ax_count = axes[0, col], axes[1, col]
        centres = [(r["low"] + r["high"]) / 2 for r in rows]
        width = rows[0]["high"] - rows[0]["low"] if rows else 0.1
        accuracy = [r["accuracy"] or 0.0 for r in rows]
        confidence = [r["confidence"] if r["confidence"] is not None else c for r, c in zip(rows, centres)]
        filled = [r["count"] > 0 for r in rows]
        ax.bar(centres, [a if f else 0 for a, f in zip(accuracy, filled)], width=width * 0.95,
               color="#3b6fb6", edgecolor="white", label="accuracy")
        gap_bottom = [min(a, c) if f else 0 for a, c, f in zip(accuracy, confidence, filled)]
        gap_height = [abs(c - a) if f else 0 for a, c, f in zip(accuracy, confidence, filled)]
        ax.bar(centres, gap_height, bottom=gap_bottom, width=width * 0.95, color="#e0584f", alpha=0.45,
               edgecolor="#c62828", hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "--", color="#555555", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}\nECE {error:.2%}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.25)
        ax_count.bar(centres, [r["count"] for r in rows], width=width * 0.95, color="#8a8a8a")
        ax_count.set_xlabel("confidence (top softmax probability)")
        ax_count.set_ylabel("images")
        ax_count.grid(alpha=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_comparison(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Left: test accuracy against training time, one point per run. Right: validation accuracy per epoch.

    Each run is {"name", "train_seconds", "test_accuracy", "val_acc": [per epoch, nan when missing]}.
    """
    plt = pyplot()
    fig, (ax_time, ax_curve) = plt.subplots(1, 2, figsize=(11, 4.3))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        ax_time.scatter(run["train_seconds"], 100 * run["test_accuracy"], s=60, color=colour, zorder=3)
        ax_time.annotate(run["name"], (run["train_seconds"], 100 * run["test_accuracy"]), textcoords="offset points",
                         xytext=(6, 4), fontsize=8, color=colour)
        val = [100 * v for v in run["val_acc"]]
        if val and not all(math.isnan(v) for v in val):
            ax_curve.plot(range(1, len(val) + 1), val, "o-", color=colour, label=run["name"], markersize=4)
    ax_time.set_xlabel("training time (s)")
    ax_time.set_ylabel("test accuracy (%)")
    ax_time.set_title("test accuracy against training time")
    ax_time.set_xlim(left=0)
    ax_time.margins(x=0.25, y=0.2)
    ax_time.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("validation accuracy (%)")
    ax_curve.set_title("validation accuracy per epoch")
    ax_curve.grid(alpha=0.3)
    if ax_curve.get_legend_handles_labels()[0]:
        ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
