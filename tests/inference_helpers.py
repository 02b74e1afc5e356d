"""Helpers of the prediction tests: tiny trained runs, photo-like renderings and broken image files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_image_folder
from imgrec.config import RunConfig
from imgrec.workflows import train


def train_tiny(root: Path, channels: int = 3, epochs: int = 15) -> Path:
    """A LeNet trained on a make_image_folder tree (3 classes, 16x16, 12 images each); returns the run folder."""
    data = make_image_folder(root / f"data{channels}", channels=channels)
    cfg = RunConfig(data=str(data), epochs=epochs, batch_size=8, threads=1, workers=0, device="cpu",
                    project=str(root / "runs"), name=f"tiny{channels}")
    return train(cfg).run_dir


def photo_like(image: np.ndarray, rng: np.random.Generator, side: int = 200) -> Image.Image:
    """A light-on-dark (H, W) uint8 image as a photo: dark object on a light, noisy background, off-centre, larger."""
    obj = int(rng.integers(int(side * 0.55), int(side * 0.75)))
    background = float(rng.integers(200, 240))
    up = np.asarray(Image.fromarray(image).resize((obj, obj), Image.Resampling.BICUBIC), dtype=np.float32)
    canvas = np.full((side, side), background, np.float32)
    top, left = rng.integers(side // 20, side - obj - side // 20, size=2)
    canvas[top:top + obj, left:left + obj] = background - up * (background - 20) / 255
    canvas += rng.normal(0, 6, canvas.shape)
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb_png(path: Path, side: int = 20_000) -> Path:
    """A small, valid-looking PNG whose header claims side x side pixels: a decompression bomb for Pillow."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" * (side + 1) * 4)  # a few rows; Pillow refuses before decoding
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def write_truncated(path: Path, image: Image.Image) -> Path:
    """The image saved in the path's format, then cut to half its bytes."""
    image.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
