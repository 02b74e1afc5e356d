"""The one image decoder: every Pillow mode to L/RGB the same way, EXIF orientation, and clear errors."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.data.imageio import (
    EmptyFileError,
    ImageDecodeError,
    ImageTooLargeError,
    NotAnImageError,
    image_to_tensor,
    is_image_file,
    load_image,
    read_image,
    resize_center,
    to_mode,
)
from imgrec.errors import ImgrecError


def pixels(path: Path, channels: int) -> np.ndarray:
    img = load_image(path, channels)
    assert img.mode == ("L" if channels == 1 else "RGB")
    return np.asarray(img)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# --- modes -------------------------------------------------------------------------------------------------


def test_rgb_is_unchanged_and_grey_uses_luma(tmp_path: Path) -> None:
    array = noise(5, 7)
    Image.fromarray(array).save(tmp_path / "rgb.png")
    assert np.array_equal(pixels(tmp_path / "rgb.png", 3), array)
    grey = pixels(tmp_path / "rgb.png", 1)
    assert grey.shape == (5, 7)
    assert np.array_equal(grey, np.asarray(Image.fromarray(array).convert("L")))


def test_grey_l_to_one_and_three_channels(tmp_path: Path) -> None:
    array = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(array, mode="L").save(tmp_path / "l.png")
    assert np.array_equal(pixels(tmp_path / "l.png", 1), array)
    rgb = pixels(tmp_path / "l.png", 3)
    assert rgb.shape == (6, 8, 3)
    for c in range(3):
        assert np.array_equal(rgb[:, :, c], array)


def test_la_transparency_is_composited_on_white(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), dtype=np.uint8)  # black everywhere
    la[0, 0, 1] = 255  # opaque black
    la[0, 1, 1] = 0  # fully transparent black -> white
    la[1, :, 1] = 128  # half transparent black -> mid grey
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    grey = pixels(tmp_path / "la.png", 1)
    assert grey[0, 0] == 0
    assert grey[0, 1] == 255
    assert 120 <= grey[1, 0] <= 135
    assert pixels(tmp_path / "la.png", 3)[0, 1].tolist() == [255, 255, 255]


def test_rgba_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque red stays red
    rgba[0, 1] = (200, 10, 20, 0)  # transparent red becomes white (not red, not black)
    rgba[1, 0] = (0, 0, 0, 0)  # transparent black becomes white
    rgba[1, 1] = (0, 0, 255, 128)  # half-transparent blue on white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = pixels(tmp_path / "rgba.png", 3)
    assert rgb[0, 0].tolist() == [200, 10, 20]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert 120 <= rgb[1, 1, 0] <= 135 and rgb[1, 1, 2] == 255
    assert pixels(tmp_path / "rgba.png", 1)[1, 0] == 255


def test_palette_with_transparency_is_composited_not_dropped(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    img.save(tmp_path / "p.png", transparency=0)  # palette entry 0 (black) is transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    rgb = pixels(tmp_path / "p.png", 3)
    assert rgb[0].tolist() == [[255, 255, 255], [255, 0, 0], [0, 0, 255]]
    assert pixels(tmp_path / "p.png", 1)[0, 0] == 255


def test_palette_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png")
    assert pixels(tmp_path / "p.png", 3)[0].tolist() == [[0, 0, 0], [0, 255, 0]]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_png_transparent_colour_is_composited_on_white(tmp_path: Path, mode: str) -> None:
    """A tRNS colour key in a grey or RGB PNG marks pixels transparent: white, as a browser on white shows it."""
    array = np.zeros((2, 2) if mode == "L" else (2, 2, 3), dtype=np.uint8)
    array[0, 0] = 100
    Image.fromarray(array, mode=mode).save(tmp_path / "t.png", transparency=0 if mode == "L" else (0, 0, 0))
    grey = pixels(tmp_path / "t.png", 1)
    assert grey[0, 0] == 100
    assert (grey.ravel()[1:] == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb = pixels(tmp_path / "cmyk.jpg", 3).astype(int)
    assert rgb.shape == (16, 16, 3)
    assert (rgb[:, :, 0] > 240).all() and (rgb[:, :, 1] < 15).all() and (rgb[:, :, 2] < 15).all()


def test_one_bit_image(tmp_path: Path) -> None:
    img = Image.new("1", (4, 2), 1)
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    grey = pixels(tmp_path / "bits.png", 1)
    assert grey.dtype == np.uint8
    assert grey.tolist() == [[0, 255, 255, 255], [255, 255, 255, 255]]
    assert pixels(tmp_path / "bits.png", 3)[0, 0].tolist() == [0, 0, 0]


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    grey = pixels(tmp_path / "deep.png", 1).astype(int)
    assert grey[0].tolist() == [0, 1, 128, 255]  # clipping would give [0, 255, 255, 255]
    assert np.abs(grey - values / 257.0).max() <= 0.5
    rgb = pixels(tmp_path / "deep.png", 3)
    assert rgb[0, 2].tolist() == [128, 128, 128]


def test_32bit_integer_and_float_modes_are_scaled() -> None:
    assert np.asarray(to_mode(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), mode="I"), 1)).tolist() == [
        [0, 128, 255]
    ]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_mode(unit, 1)).tolist() == [[0, 128, 255]]


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    """A camera JPEG stored sideways with Orientation=6 decodes like the same picture rotated for real."""
    array = np.zeros((32, 48, 3), dtype=np.uint8)
    array[:16, :24] = (255, 255, 255)  # white top-left quarter
    array[16:, 24:] = (0, 0, 255)  # blue bottom-right quarter
    img = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    img.rotate(-90, expand=True).save(tmp_path / "upright.jpg", quality=95)

    assert np.asarray(Image.open(tmp_path / "sideways.jpg")).shape == (32, 48, 3)  # stored, not displayed
    decoded = pixels(tmp_path / "sideways.jpg", 3).astype(int)
    expected = pixels(tmp_path / "upright.jpg", 3).astype(int)
    assert decoded.shape == expected.shape == (48, 32, 3)
    assert np.abs(decoded - expected).max() <= 8  # JPEG noise only
    assert np.abs(decoded - np.rot90(array, k=-1).astype(int)).mean() < 4
    assert decoded[:16, 16:].min() > 240  # the white block moved to the top-right


# --- errors ------------------------------------------------------------------------------------------------


def assert_decode_error(path: Path, *words: str) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, 3)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(info.value, ImgrecError)
    return info.value


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    error = assert_decode_error(tmp_path / "empty.png", "empty file (0 bytes)")
    assert isinstance(error, EmptyFileError) and error.reason == "empty file (0 bytes)"


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    assert_decode_error(tmp_path / "notes.png", "not an image")


def test_missing_file(tmp_path: Path) -> None:
    assert_decode_error(tmp_path / "gone.png", "not found")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    Image.fromarray(noise(64, 64)).save(tmp_path / f"full{ext}")
    data = (tmp_path / f"full{ext}").read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) // 2])
    load_image(tmp_path / f"full{ext}", 3)  # the whole file is fine
    assert_decode_error(tmp_path / f"cut{ext}", "cannot decode")


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR says width x height (with a correct CRC): a decompression bomb header."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    assert_decode_error(bomb, "too large")


@pytest.mark.parametrize("side", [12, 16])  # 144 pixels: over the limit (a warning); 256: over twice (an error)
def test_over_pixel_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    Image.fromarray(noise(side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert_decode_error(tmp_path / "big.png", "too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(tmp_path / "big.png", 3).size == (side, side)


def test_the_pixel_limit_holds_even_when_warnings_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread can reset the process-wide warning filters mid-decode (a threaded server): still refused."""
    Image.fromarray(noise(12, 12)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # the "error" filter never lands
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        with pytest.raises(ImageTooLargeError, match="144 pixels"):
            load_image(tmp_path / "big.png", 3)


def test_bytes_in_memory_decode_like_files_and_errors_say_which_kind(tmp_path: Path) -> None:
    Image.fromarray(noise(20, 30)).save(tmp_path / "a.png")
    from_bytes = load_image(io.BytesIO((tmp_path / "a.png").read_bytes()), 3, name="upload.png")
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(tmp_path / "a.png", 3)))
    with pytest.raises(NotAnImageError, match=r"^notes.txt: not an image file"):
        load_image(io.BytesIO(b"plain text"), 1, name="notes.txt")
    bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageTooLargeError, match=r"^upload: image too large"):
        load_image(io.BytesIO(bomb.read_bytes()), 1, name="upload")
    with pytest.raises(ImageDecodeError) as info:
        load_image(io.BytesIO((tmp_path / "a.png").read_bytes()[:60]), 3, name="cut.png")
    assert not isinstance(info.value, (NotAnImageError, ImageTooLargeError)) and "cut.png" in str(info.value)


# --- resizing and tensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [(40, 20), (20, 40), (16, 16), (7, 9), (100, 100)])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_resize_center_output_size(source: tuple[int, int], size: tuple[int, int]) -> None:
    img = Image.new("RGB", source)
    out = resize_center(img, size)
    assert (out.height, out.width) == size


def test_resize_center_keeps_the_centre_and_aspect() -> None:
    array = np.zeros((10, 30), dtype=np.uint8)
    array[:, 10:20] = 255  # a white middle third of a wide image
    out = np.asarray(resize_center(Image.fromarray(array), (10, 10)))
    assert out.shape == (10, 10)
    assert out.min() == 255  # the centre crop is all white: no squashing of the black sides into view
    same = Image.fromarray(array)
    assert resize_center(same, (10, 30)) is same


def test_read_image_shape_dtype_and_content(tmp_path: Path) -> None:
    array = noise(20, 30)
    Image.fromarray(array).save(tmp_path / "x.png")
    colour = read_image(tmp_path / "x.png", 3, (20, 30))
    assert colour.shape == (3, 20, 30) and colour.dtype == torch.uint8 and colour.is_contiguous()
    assert torch.equal(colour, torch.from_numpy(array).permute(2, 0, 1))
    grey = read_image(tmp_path / "x.png", 1, (8, 12))
    assert grey.shape == (1, 8, 12) and grey.dtype == torch.uint8
    assert image_to_tensor(Image.new("L", (5, 3))).shape == (1, 3, 5)


def test_is_image_file() -> None:
    assert is_image_file("a/b/cat.PNG") and is_image_file("x.jpeg") and is_image_file(Path("y.webp"))
    assert not is_image_file(".DS_Store")
    assert not is_image_file("._cat.png")  # macOS resource fork
    assert not is_image_file("notes.txt") and not is_image_file("archive.zip")
