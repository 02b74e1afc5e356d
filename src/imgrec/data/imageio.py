"""The one image decoder of imgrec: training, evaluation and prediction all read files through `load_image`.

Pillow does the decoding, with its decompression-bomb limits left on and truncated files refused (never
`LOAD_TRUNCATED_IMAGES`); whatever a broken file makes the decoder raise comes out as ImageDecodeError (its
subclasses NotAnImageError, ImageTooLargeError, EmptyFileError and NotRegularFileError say which common case it
was, worded once here for doctor, training and predict). Only regular files are opened (`open_regular`): a named
pipe, a device, a socket or a broken link is refused from its stat, never read. Files and in-memory bytes (an
upload) decode alike. EXIF orientation is applied, and every mode is turned into grey ("L") or colour
("RGB") the same way everywhere: transparency is composited on white, 16-bit values are scaled, not clipped.
Imports: Pillow, numpy and torch only (and imgrec.errors).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imgrec.errors import ImgrecError, printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


# One wording per kind of bad file, the same in `imgrec doctor`, skipped.txt, train's warning and predict.
EMPTY_FILE = "empty file (0 bytes)"
NOT_REGULAR = "not a regular file"
NOT_AN_IMAGE = "not an image file imgrec can read"


class ImageDecodeError(ImgrecError):
    """A file that is not a readable image; the message names the file and why, `reason` is the why alone."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


class NotAnImageError(ImageDecodeError):
    """Bytes that no decoder recognises as an image (a text file, an archive, random data)."""


class ImageTooLargeError(ImageDecodeError):
    """An image that declares more pixels than Pillow's decompression-bomb limit: never decoded."""


class EmptyFileError(ImageDecodeError):
    """A file of 0 bytes (an interrupted copy or download)."""


class NotRegularFileError(ImageDecodeError):
    """A path that is not a regular file: a named pipe, a device, a socket, a dangling or looping link."""


def _bad(cls: type[ImageDecodeError], label: object, reason: str) -> ImageDecodeError:
    """The error for one file: the name and reason kept to one line (a newline in a file name is escaped)."""
    reason = printable(reason)
    return cls(f"{printable(str(label))}: {reason}", reason)


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension is one imgrec decodes."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


_FILE_TYPES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _not_regular(path: str | Path, label: object) -> ImageDecodeError | None:
    """Why `path` cannot be read as an image file (missing, not a regular file, empty), or None when it can."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return _bad(NotRegularFileError, label, f"{NOT_REGULAR} (a symbolic link to nothing)")
        return _bad(ImageDecodeError, label, "file not found")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _bad(NotRegularFileError, label, f"{NOT_REGULAR} (a loop of symbolic links)")
        return _bad(ImageDecodeError, label, f"cannot read the file ({exc.strerror or exc})")
    return _irregular(st, label)


def _irregular(st: os.stat_result, label: object) -> ImageDecodeError | None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _FILE_TYPES if test(st.st_mode)), "not a file")
        return _bad(NotRegularFileError, label, f"{NOT_REGULAR} ({kind})")
    if st.st_size == 0:
        return _bad(EmptyFileError, label, EMPTY_FILE)
    return None


def open_regular(path: str | Path, label: object = None) -> BinaryIO:
    """Open an image file for reading, only if it is a regular, non-empty file: a named pipe is never opened in a
    way that blocks, a link to /dev/zero never read (it never ends). The check is made again on what was opened.

    Raises ImageDecodeError (NotRegularFileError, EmptyFileError) naming `label` (default: the path).
    """
    label = path if label is None else label
    problem = _not_regular(path, label)
    if problem is not None:
        raise problem
    try:
        # O_NONBLOCK: should the path have become a pipe since the check, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise _not_regular(path, label) or _bad(ImageDecodeError, label, f"cannot read the file ({exc.strerror or exc})") from None
    try:
        problem = _irregular(os.fstat(fd), label)
    except OSError as exc:
        problem = _bad(ImageDecodeError, label, f"cannot read the file ({exc.strerror or exc})")
    if problem is not None:
        os.close(fd)
        raise problem
    return os.fdopen(fd, "rb")


def read_file(path: str | Path, label: object = None) -> bytes:
    """The bytes of a regular, non-empty image file (see open_regular), no more than its size when opened."""
    with open_regular(path, label) as f:
        try:
            return f.read(os.fstat(f.fileno()).st_size)
        except OSError as exc:
            raise _bad(ImageDecodeError, path if label is None else label,
                       f"cannot read the file ({exc.strerror or exc})") from None


def load_image(path: str | Path | BinaryIO, channels: int, name: str | None = None) -> Image.Image:
    """Decode a path or an open binary file to "L" (channels=1) or "RGB" (3), upright per EXIF; errors name `name`.

    A path is opened through `open_regular` (regular, non-empty files only)."""
    label = name if name is not None else path
    if isinstance(path, (str, Path)):
        with open_regular(path, label) as f:
            return _decode(f, channels, label)
    return _decode(path, channels, label)


def _decode(source: BinaryIO, channels: int, label: object) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on huge images; keep the error, make the warning one too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_pixels(img)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_mode(img, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bad(ImageTooLargeError, label, f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        if _is_empty(source):  # an empty upload or stream
            raise _bad(EmptyFileError, label, EMPTY_FILE) from None
        raise _bad(NotAnImageError, label, NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _bad(ImageDecodeError, label, f"cannot decode image ({exc})") from None
    except Exception as exc:  # hostile bytes can trip any error inside a decoder: still just a bad file
        raise _bad(ImageDecodeError, label, f"cannot decode image ({type(exc).__name__}: {exc})") from None


def _is_empty(stream: BinaryIO) -> bool:
    try:
        return stream.seek(0, io.SEEK_END) == 0
    except (OSError, ValueError, AttributeError):  # not seekable, or closed
        return False


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


def read_image(path: str | Path, channels: int, size: tuple[int, int], content: bytes | None = None) -> torch.Tensor:
    """Decode, convert and resize one file (or `content`, that file's bytes held in memory): uint8 tensor
    (channels, H, W). Whatever goes wrong with the file is an ImageDecodeError naming it (a bad file to skip or
    report), never a traceback from inside Pillow."""
    image = load_image(path, channels) if content is None else load_image(io.BytesIO(content), channels, str(path))
    try:
        return image_to_tensor(resize_center(image, size))
    except Exception as exc:  # an image that decodes but does not resize is still one bad file
        raise _bad(ImageDecodeError, path, f"cannot resize image ({type(exc).__name__}: {exc})") from None
