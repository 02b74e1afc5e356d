"""What can be predicted: paths (files, folders, globs) expanded to files, and images in memory turned into Pillow images.

Files are decoded later by the one image decoder (data.imageio.load_image); this module only finds them and
names what is missing. Images in memory: Pillow images, numpy arrays (H, W) or (H, W, C) of uint8 or 16-bit
grey, and uint8 tensors (H, W) or (C, H, W), as torchvision's decoders return them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from imgrec.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, is_image_file
from imgrec.errors import printable
from imgrec.inference.results import Failure

GLOB_CHARACTERS = "*?["


def expand_paths(specs: Sequence[str | Path]) -> tuple[list[str], list[Failure]]:
    """Files named, image files in folders (recursively) and glob matches, in order, once each; and what was not found.

    A file named on its own is kept whatever its extension (it is reported if it cannot be decoded); folders and
    globs contribute the files with an image extension.
    """
    files: list[str] = []
    failures: list[Failure] = []
    seen: set[str] = set()
    for spec in specs:
        text = str(spec)
        path, shown = Path(text), printable(text)
        if path.is_dir():
            found = folder_images(path)
            why = f"{shown}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)"
        elif path.exists() or path.is_symlink():  # a broken link is named as the decoder words it
            found, why = [text], ""
        elif any(c in text for c in GLOB_CHARACTERS):
            found = _glob_images(text)
            why = f"{shown}: no image files match this pattern"
        else:
            found, why = [], f"{shown}: file not found"
        if not found:
            failures.append(Failure(text, why))
        for name in found:
            if name not in seen:
                seen.add(name)
                files.append(name)
    return files, failures


def folder_images(folder: Path) -> list[str]:
    """Image files under a folder, recursively, sorted; hidden files and folders are skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


def _glob_images(pattern: str) -> list[str]:
    found: list[str] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(match):
            found += folder_images(Path(match))
        elif is_image_file(match):
            found.append(match)
    return found


def to_pil(image: object) -> Image.Image:
    """A Pillow image, numpy array or uint8 tensor -> a Pillow image, upright per its EXIF orientation."""
    if isinstance(image, Image.Image):
        try:
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"cannot decode image ({exc})") from None
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 (C, H, W), got {image.dtype}; use (x * 255).round().byte()")
        if image.ndim == 3:
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    raise TypeError(f"cannot predict a {type(image).__name__}: give a path, a PIL image, a numpy array or a uint8 tensor")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        raise TypeError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {array.shape}")
    if array.ndim not in (2, 3):
        raise TypeError(f"an image array must be (H, W) or (H, W, C); got shape {array.shape}")
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array))  # "I;16": the loader scales it to 8 bits
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (or 16-bit grey), got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))
