"""The photo conversion (data.photo): background, inversion, noise, crop, centring, extent; the training-image
measurement it relies on; and the grid of model inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgrec.data.photo import (
    CAPTION_HEIGHT,
    _border_rings,
    _foreground_boxes,
    _normalize_foregrounds,
    border_ring,
    foreground_box,
    measure_foreground,
    normalize_foreground,
    object_extent,
    prepare_photo,
    tile_images,
)


def square(side: int, top: int, left: int, size: int, value: int = 255, background: int = 0) -> np.ndarray:
    image = np.full((side, side), background, np.uint8)
    image[top:top + size, left:left + size] = value
    return image


def test_border_ring_takes_the_outer_five_percent() -> None:
    image = np.zeros((40, 40), np.uint8)
    image[2:-2, 2:-2] = 1  # 2 px = 5% of 40
    ring = border_ring(image)
    assert ring.size == 40 * 40 - 36 * 36 and not ring.any()
    assert border_ring(np.ones((3, 3))).size == 8
    assert border_ring(np.ones((2, 2))).size == 4  # too small for a ring: everything


def test_a_dark_background_is_kept_and_stretched() -> None:
    out, inverted = normalize_foreground(square(28, 8, 8, 12, value=120, background=10))
    assert not inverted
    assert out[0, 0] == 0 and out[14, 14] == 255  # background to black, object to full brightness


def test_a_light_background_is_inverted() -> None:
    dark_on_light = square(28, 8, 8, 12, value=30, background=230)
    out, inverted = normalize_foreground(dark_on_light)
    assert inverted and out[0, 0] == 0 and out[14, 14] == 255


def test_background_noise_becomes_black() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(square(100, 30, 30, 40, value=40, background=220) + rng.normal(0, 8, (100, 100)), 0, 255)
    out, _ = normalize_foreground(image.astype(np.uint8))
    assert (out[:20] == 0).mean() > 0.99  # noise of the (inverted) background is gone
    assert out[40:60, 40:60].mean() > 200


def test_a_blank_image_stays_black() -> None:
    out, _ = normalize_foreground(np.full((20, 20), 200, np.uint8))
    assert not out.any()
    assert foreground_box(out) is None
    assert not np.asarray(prepare_photo(Image.new("L", (50, 50), 200), (28, 28), 0.9)).any()


def test_foreground_box_is_exact_and_ignores_a_speck() -> None:
    image = square(50, 10, 20, 15).astype(np.float32)
    assert foreground_box(image, trim=0) == (10, 25, 20, 35)
    image[48, 1] = 255  # one speck far away: under 0.5% of the mass
    assert foreground_box(image) == (10, 25, 20, 35)
    assert object_extent((10, 25, 20, 35), (50, 50)) == pytest.approx(0.3)


def test_measure_foreground_on_mnist_like_and_on_scans() -> None:
    rng = np.random.default_rng(0)
    centred = np.stack([square(28, 4 + o, 4 + o, 20) for o in rng.integers(-1, 2, 50)])[:, None]
    measured = measure_foreground(centred)
    assert measured == {"background": "dark", "object_extent": pytest.approx(20 / 28, abs=0.01), "object_centred": True}
    assert measure_foreground(255 - centred)["background"] == "light"
    # classes told apart by position (a square in one corner or another): not centred
    corners = np.stack([square(16, top, left, 8) for top in (0, 8) for left in (0, 8)] * 5)[:, None]
    assert measure_foreground(corners)["object_centred"] is False
    colour = np.repeat(centred, 3, axis=1)
    assert measure_foreground(colour)["background"] == "dark"
    with pytest.raises(ValueError):
        measure_foreground(np.zeros((0, 1, 8, 8), np.uint8))


def _one_at_a_time(images: np.ndarray) -> dict[str, object]:
    """measure_foreground as normalize_foreground and foreground_box give it, image by image."""
    grey = images.astype(np.float32).mean(axis=1)
    levels = [float(np.median(border_ring(g))) for g in grey]
    boxes = [foreground_box(normalize_foreground(g)[0]) for g in grey]
    found = [b for b in boxes if b is not None]
    size = grey.shape[1:]
    offsets = [max(abs((t + b) / 2 / size[0] - 0.5), abs((le + r) / 2 / size[1] - 0.5)) for t, b, le, r in found]
    return {"background": "light" if float(np.median(levels)) > 127.5 else "dark",
            "object_extent": round(float(np.median([object_extent(b, size) for b in found])), 4) if found else 1.0,
            "object_centred": bool(float(np.median(offsets)) < 0.1) if found else True}


@pytest.mark.parametrize("seed", range(6))
def test_measure_foreground_gives_the_numbers_of_the_image_by_image_conversion(seed: int) -> None:
    """Batched for speed, it must still measure each image as the photo conversion does: random sizes (a ring as
    wide as the image included), dark and light backgrounds, noise, blank and colour images, objects anywhere."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(3, 40, 2))
    channels = int(rng.choice([1, 3]))
    images = rng.normal(rng.uniform(0, 255), rng.uniform(0, 30), (60, channels, height, width))
    for image in images[: 45]:
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[:, top:top + int(rng.integers(1, height + 1)), left:left + int(rng.integers(1, width + 1))] = \
            rng.uniform(0, 255)
    images[45:50] = rng.uniform(0, 255)  # blank
    images = np.clip(images, 0, 255).astype(np.uint8)
    for sample in (images, images[:1], images[45:50]):
        assert measure_foreground(sample) == _one_at_a_time(sample)
    grey = images.astype(np.float32).mean(axis=1)
    boxes = _foreground_boxes(_normalize_foregrounds(grey, np.median(_border_rings(grey), axis=1))[0])
    for image, box in zip(grey, boxes):
        expected = foreground_box(normalize_foreground(image)[0])
        assert (np.isnan(box).all() if expected is None else tuple(box) == expected), (box, expected)


def test_measure_foreground_gives_the_numbers_of_the_image_by_image_conversion_on_fashion_mnist(
        shared_data: Path) -> None:
    from imgrec.data.datasets import read_idx

    images = read_idx(shared_data / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", 3).numpy()[::60, None]
    assert measure_foreground(images) == _one_at_a_time(images) == {
        "background": "dark", "object_extent": 1.0, "object_centred": True}


def test_prepare_photo_crops_centres_and_scales_to_the_extent() -> None:
    rng = np.random.default_rng(1)
    photo = np.clip(square(300, 20, 150, 90, value=25, background=225) + rng.normal(0, 5, (300, 300)), 0, 255)
    out = np.asarray(prepare_photo(Image.fromarray(photo.astype(np.uint8)), (28, 28), 0.5))
    assert out.shape == (28, 28)
    box = foreground_box(out.astype(np.float32), trim=0.02)
    assert box is not None
    top, bottom, left, right = box
    assert object_extent(box, (28, 28)) == pytest.approx(0.5, abs=0.08)  # 14 px of 28
    assert (top + bottom) / 2 == pytest.approx(14, abs=1) and (left + right) / 2 == pytest.approx(14, abs=1)
    assert out[14, 14] > 200 and out[0, 0] == 0


def test_prepare_photo_is_nearly_the_identity_on_training_like_images() -> None:
    image = square(28, 4, 4, 20, value=255)
    out = np.asarray(prepare_photo(Image.fromarray(image), (28, 28), 20 / 28)).astype(int)
    assert np.abs(out - image).mean() < 8


def test_prepare_photo_leaves_objects_in_place_when_training_objects_are_not_centred() -> None:
    corner = square(64, 0, 0, 32, value=30, background=230)  # dark square top-left on light
    out = np.asarray(prepare_photo(Image.fromarray(corner), (16, 16), 0.5, centre=False))
    assert out[:6, :6].min() > 200 and out[10:, 10:].max() <= 2  # inverted, still top-left


def test_prepare_photo_keeps_the_aspect_ratio_of_the_model_input() -> None:
    out = prepare_photo(Image.fromarray(square(80, 10, 10, 30, background=0)), (24, 32), 0.8)
    assert out.size == (32, 24) and out.mode == "L"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.integers(0, 255), st.integers(0, 2**31 - 1))
def test_prepare_photo_always_gives_the_model_size(height: int, width: int, level: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(level, 30, (height, width)), 0, 255).astype(np.uint8)
    out = prepare_photo(Image.fromarray(image), (28, 28), 0.9)
    assert out.size == (28, 28) and out.mode == "L"


@pytest.mark.parametrize("shape", [(500, 444), (375, 500), (333, 500), (4000, 1), (1, 4000)])
@pytest.mark.parametrize("centre", [True, False])
def test_prepare_photo_takes_photos_of_ordinary_and_extreme_shapes(shape: tuple[int, int], centre: bool) -> None:
    """(H, W) camera shapes whose float crop box once fell a hair outside the image at 224 px."""
    image = np.full(shape, 220, np.uint8)
    image[shape[0] // 4 : shape[0] // 2 + 1, shape[1] // 4 : shape[1] // 2 + 1] = 20
    for size in ((224, 224), (96, 96)):
        out = prepare_photo(Image.fromarray(image), size, 0.8, centre=centre)
        assert out.size == size and out.mode == "L"


def test_tile_images_keeps_every_pixel() -> None:
    images = np.arange(3 * 2 * 4 * 5, dtype=np.uint8).reshape(3, 2, 4, 5)[:, :1]  # 3 grey 4x5 images
    sheet = tile_images(images, columns=2, min_tile=10, gap=2)
    factor = 2  # ceil(10 / 5)
    assert sheet.mode == "L" and sheet.size == (2 * 5 * factor + 2, 2 * 4 * factor + 2)
    a = np.asarray(sheet)
    second = a[:4 * factor, 5 * factor + 2:][::factor, ::factor]
    assert np.array_equal(second, images[1, 0])
    colour = tile_images(np.zeros((1, 3, 8, 8), np.uint8))
    assert colour.mode == "RGB" and colour.size == (96, 96)


def test_tile_images_writes_each_caption_under_its_tile() -> None:
    images = np.zeros((3, 1, 8, 8), np.uint8)
    sheet = np.asarray(tile_images(images, columns=2, gap=2, captions=["cat.jpg: dog 87%", "b.png: unsure"]))
    assert sheet.shape == (2 * (96 + CAPTION_HEIGHT) + 2, 2 * 96 + 2)
    strips = [sheet[96:96 + CAPTION_HEIGHT, :96], sheet[96:96 + CAPTION_HEIGHT, 98:],
              sheet[2 * 96 + CAPTION_HEIGHT + 2:, :96]]
    assert (strips[0] > 200).any() and (strips[1] > 200).any()  # light text on a dark strip
    assert (strips[2] == 128).all()  # the third tile has no caption
    assert not sheet[:96, :96].any()  # the tiles keep their pixels
