"""Fuzzing the one image loader: random bytes, and valid images of every format with bytes flipped, cut,
inserted or repeated. Whatever the bytes, the loader returns an image of the asked-for mode and size or
raises its own ImageDecodeError, nothing else (and the process survives). Plus the resize: its crop box stays
inside the image for every source and target size, and a tiny file of extreme aspect ratio never becomes a huge
image."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgrec.data.imageio import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    cover_box,
    load_image,
    read_image,
    resize_center,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _seed_images() -> dict[str, bytes]:
    """Small valid files of the formats and modes a folder may hold."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8))
    grey16 = Image.fromarray((rng.integers(0, 65536, size=(12, 10))).astype(np.uint16))
    cases = {
        "png-rgb": (rgb, "PNG"), "png-rgba": (rgb.convert("RGBA"), "PNG"), "png-palette": (rgb.convert("P"), "PNG"),
        "png-16bit": (grey16, "PNG"), "jpeg": (rgb, "JPEG"), "jpeg-cmyk": (rgb.convert("CMYK"), "JPEG"),
        "gif": (rgb.convert("P"), "GIF"), "bmp": (rgb, "BMP"), "tiff": (rgb, "TIFF"), "tiff-16bit": (grey16, "TIFF"),
        "webp": (rgb, "WEBP"), "ppm": (rgb, "PPM"),
    }
    seeds = {}
    for name, (img, fmt) in cases.items():
        buffer = io.BytesIO()
        img.save(buffer, format=fmt)
        seeds[name] = buffer.getvalue()
    return seeds


SEEDS = _seed_images()


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    """A valid image file with a few random edits: the decoder gets past the header, then meets damage."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


def assert_loads_or_refuses(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    for channels in (1, 3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings about odd files are not failures
                image = read_image(path, channels, (8, 8))
        except ImageDecodeError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            continue
        assert image.shape == (channels, 8, 8) and image.dtype == torch.uint8


@FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from(IMAGE_EXTENSIONS))
def test_random_bytes_never_escape_the_loader(tmp_path: Path, data: bytes, ext: str) -> None:
    assert_loads_or_refuses(tmp_path / f"fuzz{ext}", data)


@FUZZ
@given(data=mutated_image())
def test_damaged_images_never_escape_the_loader(tmp_path: Path, data: bytes) -> None:
    assert_loads_or_refuses(tmp_path / "fuzz.img", data)


@FUZZ
@given(data=st.sampled_from(sorted(SEEDS.values())), keep=st.integers(0, 400))
def test_every_prefix_of_a_valid_image(tmp_path: Path, data: bytes, keep: int) -> None:
    assert_loads_or_refuses(tmp_path / "cut.img", data[:keep])


def test_the_seed_images_themselves_load(tmp_path: Path) -> None:
    for name, data in SEEDS.items():
        (tmp_path / name).write_bytes(data)
        assert load_image(tmp_path / name, 3).size == (10, 12), name


def test_unexpected_decoder_errors_become_decode_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors of kinds Pillow does not document (struct.error, IndexError, ...) still name the file."""
    path = tmp_path / "odd.png"
    path.write_bytes(SEEDS["png-rgb"])

    def broken_load(self: Image.Image) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(Image.Image, "load", broken_load)
    with pytest.raises(ImageDecodeError, match=r"odd.png: cannot decode image \(IndexError: list index out of range\)"):
        load_image(path, 3)


def test_an_extreme_aspect_ratio_never_builds_a_huge_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 x 200,000 PNG is a few hundred bytes; resized to cover 16 x 16 it would be 16 x 3.2 million pixels.
    Only the centre region is resampled, straight to the target size."""
    path = tmp_path / "thread.png"
    Image.new("L", (200_000, 1), 200).save(path)
    assert path.stat().st_size < 2000
    requested: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def spy(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        requested.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    image = read_image(path, 3, (16, 16))
    assert image.shape == (3, 16, 16) and int(image.min()) == int(image.max()) == 200
    assert requested and all(w * h <= 16 * 16 for w, h in requested)


def test_resize_center_matches_resize_then_crop_on_an_exact_fit() -> None:
    """Where resize-then-crop needs no sub-pixel offset, both give the same pixels."""
    array = np.random.default_rng(1).integers(0, 256, size=(8, 24), dtype=np.uint8)
    img = Image.fromarray(array)
    covered = img.resize((24, 8), Image.Resampling.BILINEAR).crop((8, 0, 16, 8))
    assert np.array_equal(np.asarray(resize_center(img, (8, 8))), np.asarray(covered))


SOURCE_SIDES = st.integers(1, 5000)
TARGET_SIDES = st.integers(8, 512)


@settings(max_examples=3000, deadline=None)
@given(source_width=SOURCE_SIDES, source_height=SOURCE_SIDES, width=TARGET_SIDES, height=TARGET_SIDES)
@example(444, 500, 224, 224)  # a camera photo whose box came out at left = -2.8e-14 (Pillow refuses it)
@example(1, 4000, 512, 8)
@example(4000, 1, 8, 512)
def test_the_cover_box_lies_inside_the_image_and_keeps_its_centre(source_width: int, source_height: int,
                                                                  width: int, height: int) -> None:
    left, top, right, bottom = cover_box(source_width, source_height, width, height)
    assert 0.0 <= left < right <= source_width and 0.0 <= top < bottom <= source_height
    assert abs((left + right) / 2 - source_width / 2) <= 0.5 and abs((top + bottom) / 2 - source_height / 2) <= 0.5
    box_w, box_h = right - left, bottom - top
    assert box_w == source_width or box_h == source_height  # it covers: one side whole
    assert math.isclose(box_w * height, box_h * width, rel_tol=1e-9)  # and the target's aspect ratio on the other


@settings(max_examples=40, deadline=None)
@given(source_width=SOURCE_SIDES, source_height=SOURCE_SIDES, width=TARGET_SIDES, height=TARGET_SIDES)
@example(444, 500, 224, 224)
@example(444, 500, 96, 96)
@example(1, 4000, 96, 96)
@example(4000, 1, 224, 224)
def test_resize_center_gives_the_target_size_for_any_shape(source_width: int, source_height: int,
                                                           width: int, height: int) -> None:
    out = resize_center(Image.new("L", (source_width, source_height), 77), (height, width))
    assert out.size == (width, height) and out.getextrema() == (77, 77)


@settings(max_examples=40, deadline=None)
@given(source_width=st.integers(1, 600), source_height=st.integers(1, 600), width=TARGET_SIDES,
       height=TARGET_SIDES, seed=st.integers(0, 2**16))
@example(444, 500, 224, 224, 0)
def test_resize_center_keeps_a_symmetric_image_symmetric(source_width: int, source_height: int, width: int,
                                                         height: int, seed: int) -> None:
    """A box off the centre (even by half a pixel) would turn a mirror-symmetric image lopsided."""
    array = np.random.default_rng(seed).integers(0, 256, size=(source_height, source_width), dtype=np.uint8)
    array = np.maximum(array, array[:, ::-1])
    array = np.maximum(array, array[::-1, :])
    out = np.asarray(resize_center(Image.fromarray(array), (height, width))).astype(np.int16)
    assert out.shape == (height, width)
    assert np.abs(out - out[:, ::-1]).max() <= 1 and np.abs(out - out[::-1, :]).max() <= 1  # Pillow's rounding
