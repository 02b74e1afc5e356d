"""report.html as a pure function: every section, embedded images that decode, escaped text, missing parts."""

from __future__ import annotations

import base64
import io
import re

import torch
from PIL import Image

from imgrec.evaluation.calibration import calibration_summary
from imgrec.evaluation.html import SECTIONS, render_report
from imgrec.evaluation.metrics import classification_report


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _metrics(classes: list[str], temperature: float | None = 1.5) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(60, len(classes), generator=gen) * 3
    targets = torch.arange(60) % len(classes)
    m = classification_report(logits, targets, classes)
    m.update(split="test", data="toy", weights="runs/toy/weights/best.pt",
             calibration=calibration_summary(logits, targets, temperature),
             dataset={"name": "toy", "classes": classes, "channels": 3, "image_size": [32, 32], "mean": [0.5] * 3,
                      "std": [0.25] * 3, "split_sizes": {"train": 100, "val": None, "test": 60}},
             timing={"seconds": 0.5, "images_per_second": 120.0, "device": "cpu"})
    return m


def _images(html: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    images = []
    for data in found:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            images.append(img.copy())
    return images


def test_every_section_and_image_is_in_the_page() -> None:
    names = ("results", "confusion_matrix", "confusion_matrix_normalized", "mistakes", "samples", "calibration")
    images = {name: _png_bytes((i * 40, 100, 200)) for i, name in enumerate(names)}
    summary = {"model": "lenet", "epochs": 3, "train_seconds": 4.2, "images_per_second": 900.0, "total_seconds": 6.0,
               "train_images": 100, "versions": {"imgrec": "0.1.0"}, "git_commit": "a" * 40}
    results = [{"epoch": 1.0, "train_loss": 1.0, "train_acc": 0.5, "val_loss": float("nan"), "val_acc": float("nan"),
                "lr": 0.001, "seconds": 1.5}]
    html = render_report({"title": "toy-lenet", "metrics": _metrics(["a", "b", "c", "d", "e"]), "summary": summary,
                          "config": {"model": "lenet", "lr": 0.001}, "results": results}, images)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for key, title in SECTIONS:
        assert f'<section id="{key}">' in html and f'href="#{key}"' in html and title in html
    decoded = _images(html)
    assert len(decoded) == len(names) and all(img.size == (30, 20) for img in decoded)
    for needle in ("top-5 accuracy", "macro average", "weighted average", "T = 1.500", "ECE before / after",
                   "4.2s", "trained on", "100 images", "imgrec train --config config.yaml", "aaaaaaaaaaaa"):
        assert needle in html, needle
    # self-contained: nothing fetched from anywhere, no script
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html


def test_text_is_escaped() -> None:
    classes = ["<b>cat</b>", 'dog "quoted"', "fox & hen"]
    html = render_report({"title": "<run>", "metrics": _metrics(classes), "summary": None, "config": None,
                          "results": None}, {})
    assert "<b>cat</b>" not in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    assert "fox &amp; hen" in html and "&lt;run&gt;" in html


def test_missing_parts_say_so() -> None:
    html = render_report({"title": "loose", "metrics": _metrics(["a", "b"], temperature=None), "summary": None,
                          "config": None, "results": None}, {})
    assert _images(html) == []
    assert "no training curves" in html and "No configuration recorded" in html
    assert "No temperature was fitted" in html and "top-5" not in html
    for key, _ in SECTIONS:
        assert f'<section id="{key}">' in html
