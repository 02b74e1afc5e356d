"""The one image decoder of imgrec: training, evaluation and prediction all read files through `load_image`.

Pillow does the decoding, with its decompression-bomb limits left on and truncated files refused (never
`LOAD_TRUNCATED_IMAGES`); whatever a broken file makes the decoder raise comes out as ImageDecodeError (its
subclasses NotAnImageError and ImageTooLargeError say which of the two common cases it was). Files and in-memory
bytes (an upload) decode alike. EXIF orientation is applied, and every mode is turned into grey ("L") or colour
("RGB") the same way everywhere: transparency is composited on white, 16-bit values are scaled, not clipped.
Imports: Pillow, numpy and torch only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imgrec.errors import ImgrecError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImageDecodeError(ImgrecError):
    """A file that is not a readable image; the message names the file and why."""


class NotAnImageError(ImageDecodeError):
    """Bytes that no decoder recognises as an image (a text file, an archive, random data)."""


class ImageTooLargeError(ImageDecodeError):
    """An image that declares more pixels than Pillow's decompression-bomb limit: never decoded."""


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension is one imgrec decodes."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path | BinaryIO, channels: int, name: str | None = None) -> Image.Image:
    """Decode a path or an open binary file to "L" (channels=1) or "RGB" (3), upright per EXIF; errors name `name`."""
    label = name if name is not None else path
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on huge images; keep the error, make the warning one too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(img)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_mode(img, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{label}: image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{label}: not an image file imgrec can read") from None
    except FileNotFoundError:
        raise ImageDecodeError(f"{label}: file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: cannot decode image ({exc})") from None
    except Exception as exc:  # hostile bytes can trip any error inside a decoder: still just a bad file
        raise ImageDecodeError(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _check_pixels(img: Image.Image) -> None:
    """Pillow's bomb warning as an error, checked here too: warning filters are process-wide, and in a threaded
    server another thread leaving its `catch_warnings` can restore the filters while this one decodes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width} x {img.height} = {img.width * img.height:,} pixels, "
                                           f"more than the limit of {limit:,}")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to "L" or "RGB": composite transparency on white, scale 16/32-bit to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # a PNG tRNS colour: transparent, not black
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to 8 bits by its type's range (not by clipping)."""
    array = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0 if array.max(initial=0) <= 1.0 else np.clip(array, 0, 255)
    elif img.mode.startswith("I;16") or array.max(initial=0) <= 65535:
        scaled = array.astype(np.float64) / 257.0  # 65535 -> 255
    else:
        scaled = array.astype(np.float64) / 16843009.0  # 2**32-1 -> 255
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def cover_box(source_width: int, source_height: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) region of a source that, resized to (width, height), covers it with the
    aspect ratio kept and the centre kept: the source's full extent on one axis, its centre part on the other.

    Always inside the source (Pillow refuses a box a hair outside it, which `width / (width / W)` can give): the
    cropped side is one division of whole numbers, never more than the source's side, and the box is clamped.
    """
    if width * source_height >= height * source_width:  # the width covers: all of it, the middle rows
        box_w, box_h = float(source_width), min(height * source_width / width, float(source_height))
    else:  # the height covers: all of it, the middle columns
        box_w, box_h = min(width * source_height / height, float(source_width)), float(source_height)
    left, top = max(0.0, (source_width - box_w) / 2), max(0.0, (source_height - box_h) / 2)
    return left, top, min(left + box_w, float(source_width)), min(top + box_h, float(source_height))


def resize_center(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers (H, W), keeping its aspect ratio, and keep the centre.

    One resampling of the source's centre region (`cover_box`) straight to (H, W): an image of extreme aspect
    ratio (say 1 x 80 million pixels, a 100 kB PNG) never becomes a huge intermediate image on its way.
    """
    height, width = size
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.BILINEAR, box=cover_box(img.width, img.height, width, height),
                      reducing_gap=None)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL "L" or "RGB" image -> uint8 tensor (C, H, W)."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode, convert and resize one file: uint8 tensor (channels, H, W). Whatever goes wrong with the file is
    an ImageDecodeError naming it (a bad file to skip or report), never a traceback from inside Pillow."""
    image = load_image(path, channels)
    try:
        return image_to_tensor(resize_center(image, size))
    except Exception as exc:  # an image that decodes but does not resize is still one bad file
        raise ImageDecodeError(f"{path}: cannot resize image ({type(exc).__name__}: {exc})") from None
