"""Seeded trainings through the `imgrec` command, and the SHA-256 of the weights each saves.

A refactor that must not change behaviour keeps these hashes: run this before and after and compare. The data is
a small folder of seeded random PNGs this script writes; each run is a few seconds on one CPU thread.

    PYTHONPATH=src python benchmarks/weights_fingerprint.py [work folder]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

COMMON = ["--threads", "1", "--workers", "0", "--device", "cpu", "--seed", "3", "--batch-size", "16"]
RUNS = {
    "lenet": ["--model", "lenet", "--epochs", "2"],
    "fast-recipe": ["--recipe", "fast", "--epochs", "2"],  # airnet-small: whitening stem, lookahead, linear schedule, TTA
    "transfer-freeze": ["--model", "resnet18", "--weights", "{backbone}", "--freeze-epochs", "1", "--epochs", "2",
                        "--lr", "0.01"],
    "lr-find": ["--model", "lenet", "--epochs", "1", "--lr", "find"],
}


def make_data(root: Path) -> Path:
    """Three classes of 28x28 grey images, 40 each: a bright square in a class-specific corner, plus noise."""
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / "data" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(40):
            image = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            image[4 + 8 * c:12 + 8 * c, 4 + 6 * c:12 + 6 * c] = 220
            Image.fromarray(image).save(folder / f"{i:03}.png")
    return root / "data"


def make_backbone(root: Path) -> Path:
    """A seeded random resnet18 saved as torchvision saves its weights (nothing is downloaded)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def sha(path: Path) -> str:
    """The hash of a weights file's tensors (the file also records versions and a git commit)."""
    import torch

    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    digest = hashlib.sha256()
    for key, value in sorted(ckpt["state_dict"].items()):
        digest.update(key.encode())
        digest.update(value.contiguous().numpy().tobytes())
    for key in ("temperature", "ood"):
        digest.update(repr(ckpt.get(key)).encode())
    return digest.hexdigest()[:16]


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fingerprint-"))
    data = make_data(work)
    backbone = make_backbone(work)
    env = {**os.environ, "IMGREC_CACHE": str(work / "cache")}
    for name, extra in RUNS.items():
        cmd = [sys.executable, "-m", "imgrec", "train", "--data", str(data), "--project", str(work / "runs"),
               "--name", name, "--exist-ok", "--quiet", *COMMON, *(a.format(backbone=backbone) for a in extra)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            continue
        weights = work / "runs" / name / "weights"
        print(f"{name:16} best {sha(weights / 'best.pt')}  last {sha(weights / 'last.pt')}")


if __name__ == "__main__":
    main()
