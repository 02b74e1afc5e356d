"""Prediction speed after start-up: batched prediction from decoded tensors (images/s) and one image from a file (ms).

Trains a quick LeNet on Fashion-MNIST (1 epoch on 10,000 images: speed does not depend on accuracy), or takes
--run, then times, with the thread count given:
  batched tensors  Predictor.predict_batch on the 10,000 decoded test images (uint8), --batch-size at a time,
                   and Predictor.predict on the same tensor (the same plus one Prediction dataclass per image)
  files            Predictor.predict_files on a folder of 1,000 of those images as 28x28 PNGs
  single image     Predictor.predict(path) on one 28x28 PNG, and on one 200x200 photo-like PNG (dark garment on a
                   light, noisy background: the photo conversion runs), median and 90th percentile of 200 calls
each for channels-last and contiguous memory (the run's setting is what `imgrec predict` uses).

    python benchmarks/predict_speed.py --data-dir ../shared/data --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (  # benchmarks/common.py (a script's folder is on its path)
    cpu_name,
    load_average,
    quick_run,
)
from PIL import Image
from torchvision import datasets

from imgrec.engine.system import versions
from imgrec.inference import Predictor


def time_batched(predictor: Predictor, images: torch.Tensor, batch_size: int, repeats: int) -> dict[str, float]:
    """Images/s of predict_batch and of predict over the whole tensor: the median and the best of `repeats` passes.

    On a shared machine other processes slow some passes down; the best pass is the least disturbed one.
    """

    def core() -> None:
        for start in range(0, len(images), batch_size):
            predictor.predict_batch(images[start:start + batch_size])

    def full() -> None:
        predictor.predict(images, batch_size=batch_size)

    out = {}
    for name, fn in (("predict_batch", core), ("predict", full)):
        fn()  # warm-up: oneDNN builds its kernels for these shapes
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        out[f"{name}_images_per_s"] = round(len(images) / statistics.median(seconds), 1)
        out[f"{name}_best_images_per_s"] = round(len(images) / min(seconds), 1)
    return out


def time_single(predictor: Predictor, path: Path, calls: int = 200) -> dict[str, float]:
    """Milliseconds for one predict(path): decode, prepare, model, result (median and p90 of `calls`)."""
    for _ in range(3):
        predictor.predict(str(path))
    ms = []
    for _ in range(calls):
        start = time.perf_counter()
        predictor.predict(str(path))
        ms.append(1000 * (time.perf_counter() - start))
    ms.sort()
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(0.9 * len(ms)) - 1], 2)}


def time_files(predictor: Predictor, folder: Path, batch_size: int) -> float:
    """Images/s of predict_files over every PNG in the folder (one pass after a warm-up pass)."""
    paths = sorted(str(p) for p in folder.glob("*.png"))
    list(predictor.predict_files(paths, batch_size=batch_size))
    start = time.perf_counter()
    list(predictor.predict_files(paths, batch_size=batch_size))
    return round(len(paths) / (time.perf_counter() - start), 1)


def measure(run: str | Path, channels_last: bool, images: torch.Tensor, folder: Path, photo: Path, batch_size: int,
            repeats: int) -> dict[str, object]:
    """Every figure for one memory format."""
    base = Predictor.from_run(run, device="cpu")
    predictor = Predictor(base.model, base.classes, base.preprocessing, ood=base.ood, temperature=base.temperature,
                          device="cpu", channels_last=channels_last)
    return {
        **time_batched(predictor, images, batch_size, repeats),
        "files_images_per_s": time_files(predictor, folder, batch_size),
        "single_png_28": time_single(predictor, folder / "0000.png"),
        "single_photo_200": time_single(predictor, photo),
    }


def photo_like(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28x28 Fashion-MNIST image as a 200x200 photo: dark object on a light, noisy background."""
    side = 140
    up = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    canvas = np.full((200, 200), 225.0, np.float32)
    canvas[30:30 + side, 30:30 + side] -= up * (225 - 20) / 255
    canvas += rng.normal(0, 6, canvas.shape)
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder or weights file of a 1x28x28 model (default: train a quick LeNet)")
    parser.add_argument("--data-dir", default=os.environ.get("IMGREC_DATA", "../shared/data"))
    parser.add_argument("--threads", type=int, required=True, help="torch CPU threads (say it: results depend on it)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = datasets.FashionMNIST(args.data_dir, train=False)
    images = test.data.unsqueeze(1).contiguous()  # (10000, 1, 28, 28) uint8
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or quick_run(args.data_dir, args.threads, tmp, "speed")
        folder = Path(tmp) / "pngs"
        folder.mkdir()
        for i in range(1000):
            Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:04d}.png")
        photo = Path(tmp) / "photo.png"
        photo_like(images[0, 0].numpy(), np.random.default_rng(0)).save(photo)
        results = {"load_average_before": load_average(), "threads": args.threads, "batch_size": args.batch_size,
                   "cpu": cpu_name(), "cores": os.cpu_count(), "versions": versions(), "platform": platform.platform()}
        for channels_last in (True, False):
            key = "channels_last" if channels_last else "contiguous"
            results[key] = measure(run, channels_last, images, folder, photo, args.batch_size, args.repeats)
            print(f"{key:>13}: predict_batch {results[key]['predict_batch_images_per_s']:,.0f} img/s "
                  f"(best {results[key]['predict_batch_best_images_per_s']:,.0f}), "
                  f"predict {results[key]['predict_images_per_s']:,.0f} img/s, "
                  f"files {results[key]['files_images_per_s']:,.0f} img/s, "
                  f"one 28x28 PNG {results[key]['single_png_28']['median_ms']} ms, "
                  f"one 200x200 photo {results[key]['single_photo_200']['median_ms']} ms")
    results["load_average_after"] = load_average()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
