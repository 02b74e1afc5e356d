"""Whole-batch preprocessing: normalisation, seeded augmentation, statistics."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from imgrec.data.transforms import (
    KNOWN_STATS,
    BatchMix,
    BatchTransform,
    channel_stats,
    convert_channels,
    cut_box,
    denormalize,
    normalize_stats,
    parse_augment,
    rand_augment,
    random_crop,
    random_erase,
    random_flip,
    random_resized_crop,
    random_translate,
    resize,
    trivial_augment,
)
from imgrec.errors import UsageError

MEAN, STD = [0.2, 0.5, 0.7], [0.3, 0.25, 0.1]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def batch(n: int = 8, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved down by dy and right by dx, zeros shifted in."""
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
        image[..., max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)]
    return out


# --- normalisation -----------------------------------------------------------------------------------------


def test_normalisation_formula() -> None:
    images = batch()
    out = BatchTransform(MEAN, STD)(images)
    expected = (images.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert images.dtype == torch.uint8  # the input is not modified


def test_single_channel_normalisation() -> None:
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = BatchTransform([0.2], [0.4])(images)
    assert torch.allclose(out, torch.tensor([[[[-0.5, 2.0], [0.0, 0.5]]]]), atol=1e-6)


def test_no_generator_means_no_augmentation() -> None:
    images = batch()
    plain = BatchTransform(MEAN, STD)(images)
    for ops in (["crop", "flip"], ["translate", "erase"], ["crop", "flip", "translate", "erase"]):
        assert torch.equal(BatchTransform(MEAN, STD, ops)(images), plain)
        assert torch.equal(BatchTransform(MEAN, STD, ops)(images, None), plain)


def test_generator_without_ops_changes_nothing() -> None:
    images = batch()
    assert torch.equal(BatchTransform(MEAN, STD)(images, gen(0)), BatchTransform(MEAN, STD)(images))


@pytest.mark.parametrize("ops", [["flip"], ["crop"], ["translate"], ["erase"], ["crop", "flip", "translate", "erase"],
                                 ["randaugment"], ["trivialaugment", "flip"]])
def test_augmentation_is_seeded(ops: list[str]) -> None:
    images = batch(n=32)
    transform = BatchTransform(MEAN, STD, ops)
    a = transform(images, gen(1))
    b = transform(images, gen(1))
    c = transform(images, gen(2))
    plain = BatchTransform(MEAN, STD)(images)
    assert a.shape == images.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, plain)


# --- single augmentations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [random_flip, random_crop, random_translate, rand_augment, trivial_augment])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 8)])
def test_uint8_augmentations_keep_shape_and_dtype(op: Augment, channels: int, size: int) -> None:
    images = batch(n=6, channels=channels, size=size)
    out = op(images, gen(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(op(images, gen(0)), out)
    assert not torch.equal(op(images, gen(5)), out)


def test_flip_mirrors_some_images_and_keeps_the_others() -> None:
    images = batch(n=64)
    out = random_flip(images, gen(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 16 < sum(flipped) < 48


def test_crop_pads_with_zeros_and_shifts_content() -> None:
    pattern = (torch.arange(16 * 16).view(1, 1, 16, 16) % 250 + 1).to(torch.uint8)  # no zeros in the image
    images = pattern.repeat(64, 3, 1, 1)
    out = random_crop(images, gen(3))
    pad = 2  # 16 // 8
    shifts = set()
    for image in out:
        matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                   if torch.equal(image, shifted(images[0], dy, dx))]
        assert len(matches) == 1, "every output is the input moved by at most `pad` pixels, zeros filling in"
        shifts.add(matches[0])
    assert len(shifts) > 10  # offsets vary per image
    assert (out == 0).any()  # zero padding shows at the borders


def test_translate_reflects_instead_of_black_borders() -> None:
    images = (torch.arange(16 * 16).view(1, 1, 16, 16) % 250 + 1).to(torch.uint8).repeat(32, 3, 1, 1)
    out = random_translate(images, gen(0))
    assert (out > 0).all()  # reflection, not zeros
    moved = sum(not torch.equal(o, images[0]) for o in out)
    assert moved > 20
    # the interior is still a shifted copy: every output row appears somewhere in the (reflected) input
    assert all(any(torch.equal(o[0, 8, 2:14], images[0, 0, r, c : c + 12]) for r in range(16) for c in range(5))
               for o in out)


def test_erase_sets_a_square_to_zero_in_about_half_the_images() -> None:
    x = torch.ones(64, 3, 16, 16)
    out = random_erase(x, gen(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    erased = [(o == 0).any().item() for o in out]
    assert 16 < sum(erased) < 48
    for o, e in zip(out, erased):
        zero = o[0] == 0
        if e:
            rows, cols = zero.any(1).nonzero().ravel(), zero.any(0).nonzero().ravel()
            assert rows.numel() <= 9 and cols.numel() <= 9  # at most side 8 (+1 centre)
            assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a filled rectangle
            assert torch.equal(o[0] == 0, o[2] == 0)  # the same square in every channel
        else:
            assert torch.equal(o, x[0])


def test_erase_happens_after_normalisation() -> None:
    images = torch.full((64, 1, 8, 8), 255, dtype=torch.uint8)
    out = BatchTransform([0.5], [0.5], ["erase"])(images, gen(0))
    values = out.unique()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1.0)  # 0: the mean, not black (-1)


# --- statistics and helpers --------------------------------------------------------------------------------


def test_denormalize_inverts_normalisation() -> None:
    images = batch()
    x = BatchTransform(MEAN, STD)(images)
    restored = denormalize(x, MEAN, STD)
    assert restored.shape == images.shape
    assert torch.allclose(restored, images.float() / 255, atol=1e-5)
    assert denormalize(torch.full((1, 3, 1, 1), 100.0), MEAN, STD).max() == 1.0  # clipped for display
    assert denormalize(torch.full((1, 3, 1, 1), -100.0), MEAN, STD).min() == 0.0


def test_channel_stats_matches_numpy() -> None:
    images = batch(n=20, size=12, seed=4)
    images[:, 2] //= 4  # channels with different statistics
    mean, std = channel_stats(images, chunk=7)  # several chunks
    array = images.numpy().astype(np.float64) / 255
    assert mean == pytest.approx(array.mean(axis=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(array.std(axis=(0, 2, 3)).tolist(), abs=1e-6)
    assert len(mean) == len(std) == 3 and all(isinstance(v, float) for v in mean + std)


def test_channel_stats_of_a_constant_image_has_a_floor_on_std() -> None:
    mean, std = channel_stats(torch.full((2, 1, 4, 4), 51, dtype=torch.uint8))
    assert mean == pytest.approx([0.2]) and std[0] > 0


def test_normalize_stats() -> None:
    assert normalize_stats([0.5], [0.25], 3) == ([0.5] * 3, [0.25] * 3)
    assert normalize_stats(MEAN, STD, 3) == (MEAN, STD)
    with pytest.raises(UsageError, match="3 channels"):
        normalize_stats([0.1, 0.2], [0.1, 0.2], 3)
    assert all(len(m) == len(s) for m, s in KNOWN_STATS.values())


def test_parse_augment() -> None:
    assert parse_augment("auto", 3) == ["crop", "flip"]
    assert parse_augment("auto", 1) == []
    assert parse_augment("none", 3) == []
    assert parse_augment("flip", 1) == ["flip"]
    assert parse_augment("crop,translate,erase", 3) == ["crop", "translate", "erase"]


# --- input for pretrained models: resize, channels, random resized crop -------------------------------------


def test_parse_augment_for_photo_models() -> None:
    assert parse_augment("auto", 3, photos=True) == ["resized-crop", "flip"]
    assert parse_augment("auto", 1, photos=True) == []
    assert parse_augment("none", 3, photos=True) == []


def test_resize_to_the_models_size() -> None:
    images = batch(n=4, size=16)
    out = BatchTransform(MEAN, STD, size=(40, 24))(images)
    assert out.shape == (4, 3, 40, 24)
    # a constant image stays that constant (bilinear weights sum to one)
    flat = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    resized = BatchTransform(MEAN, STD, size=(224, 224))(flat)
    assert torch.allclose(resized, expected.view(1, 3, 1, 1).expand_as(resized), atol=1e-5)


def test_resize_to_the_same_size_changes_nothing() -> None:
    images = batch()
    assert torch.equal(BatchTransform(MEAN, STD, size=(16, 16))(images), BatchTransform(MEAN, STD)(images))
    x = images.float()
    assert resize(x, (16, 16)) is x


def test_shrinking_is_antialiased() -> None:
    """A one-pixel checkerboard averages to grey when shrunk, instead of aliasing to black or white."""
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).float().view(1, 1, 32, 32)
    small = resize(board, (8, 8))
    assert torch.allclose(small, torch.full_like(small, 127.5), atol=1.0)


def test_grey_images_for_a_colour_model_repeat_the_channel_then_use_its_statistics() -> None:
    grey = batch(n=3, channels=1)
    out = BatchTransform(MEAN, STD, channels=3)(grey)
    assert out.shape == (3, 3, 16, 16)
    as_rgb = BatchTransform(MEAN, STD)(grey.expand(-1, 3, -1, -1).contiguous())  # what PIL's convert("RGB") gives
    assert torch.allclose(out, as_rgb, atol=1e-6)


def test_colour_images_for_a_grey_model_use_pils_luma() -> None:
    from PIL import Image

    rgb = batch(n=1, channels=3, size=8)
    pil = Image.fromarray(rgb[0].permute(1, 2, 0).numpy(), "RGB").convert("L")
    expected = torch.from_numpy(np.array(pil)).float()
    got = convert_channels(rgb.float(), 1)[0, 0]
    assert got.shape == (8, 8) and (got - expected).abs().max() <= 1.0  # PIL rounds to integers
    with pytest.raises(UsageError, match="4-channel"):
        convert_channels(torch.zeros(1, 4, 2, 2), 3)


def test_resized_crop_is_seeded_and_sized() -> None:
    images = batch(n=16)
    transform = BatchTransform(MEAN, STD, ["resized-crop"], size=(24, 20))
    a, b, c = transform(images, gen(1)), transform(images, gen(1)), transform(images, gen(2))
    assert a.shape == (16, 3, 24, 20) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert transform(images).shape == (16, 3, 24, 20)  # no generator: only the resize


def test_resized_crop_of_the_whole_image_is_the_image() -> None:
    x = batch(n=4).float()
    out = random_resized_crop(x, gen(0), (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-3)


def test_resized_crop_takes_a_part_of_the_image() -> None:
    """A crop of a quarter of the area, upsampled: its values come from inside the image (no padding mixed in)."""
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(6, 1, 8, 8).contiguous() + 100
    out = random_resized_crop(x, gen(3), (8, 8), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert out.min() >= 100 and out.max() <= 163
    spans = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (spans < 63 * 0.6).all()  # a 4x4 box spans about half the range of the whole image


# --- RandAugment and TrivialAugment ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", [rand_augment, trivial_augment])
def test_policies_augment_each_image_on_its_own_and_leave_the_global_generator_alone(op: Augment) -> None:
    images = batch(n=16, size=32).repeat(2, 1, 1, 1)  # every image twice
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    out = op(images, gen(4))
    assert torch.equal(torch.rand(3), expected)  # dropout and initialisation draw what they would have drawn
    assert any(not torch.equal(out[i], out[i + 16]) for i in range(16))  # the same image, other operations


# --- MixUp and CutMix ------------------------------------------------------------------------------------------


def mixed(mix: BatchMix, seed: int, n: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    x = torch.randn(n, 3, 16, 16, generator=gen(100 + seed))
    labels = torch.arange(n) % classes
    out, targets = mix(x, labels, gen(seed))
    return x, labels, out, targets


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_are_probabilities_of_the_two_labels(mixup: float, cutmix: float) -> None:
    mix = BatchMix(5, mixup, cutmix)
    for seed in range(20):
        _, labels, out, targets = mixed(mix, seed)
        assert targets.shape == (8, 5) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets >= 0).all()
        lam = targets[0, labels[0]].item()  # image 0 (label 0) is mixed with image 7 (label 2)
        assert abs(targets[0, labels[-1]].item() - (1 - lam)) < 1e-6
        assert torch.equal(mixed(mix, seed)[2], out)  # the same generator, the same batch


def test_mixup_blends_each_image_with_its_neighbour_by_the_targets_weight() -> None:
    mix = BatchMix(8, mixup=0.4)
    x, labels, out, targets = mixed(mix, 3, classes=8)
    lam = targets[torch.arange(8), labels]
    assert torch.allclose(lam, lam[0].expand(8))  # one weight for the batch
    assert torch.allclose(out, x * lam[0] + x.roll(1, 0) * (1 - lam[0]), atol=1e-6)


def test_cutmix_weight_is_the_area_kept() -> None:
    mix = BatchMix(8, cutmix=1.0)
    for seed in range(20):
        x, labels, out, targets = mixed(mix, seed, classes=8)
        kept = (out == x).all(dim=1).float().mean(dim=(1, 2))  # the pixels not pasted over (per image)
        pasted = (out == x.roll(1, 0)).all(dim=1)
        assert ((out == x).all(dim=1) | pasted).all()  # every pixel is from one of the two images
        assert torch.allclose(targets[torch.arange(8), labels], kept, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_mixup_weight_follows_beta_alpha_alpha(alpha: float) -> None:
    """Over many batches the MixUp weights pass a Kolmogorov-Smirnov test against Beta(alpha, alpha), and fail
    one against another Beta (the test can tell)."""
    from scipy import stats

    mix = BatchMix(2, mixup=alpha)
    x, labels = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    generator = gen(0)
    weights = [mix(x, labels, generator)[1][0, 0].item() for _ in range(2000)]
    assert stats.kstest(weights, stats.beta(alpha, alpha).cdf).pvalue > 0.01
    assert stats.kstest(weights, stats.beta(alpha * 3, alpha * 3).cdf).pvalue < 0.01


@pytest.mark.parametrize("lam", [0.5, 0.75, 0.9])
def test_cutmix_box_has_the_area_one_minus_lam_away_from_the_borders(lam: float) -> None:
    """The box's sides are sqrt(1 - lam) of the image's: inside the image its area is 1 - lam (to a pixel);
    at a border it is clipped, so the area kept is then more than lam (as in torchvision and timm)."""
    areas = []
    for seed in range(500):
        y0, y1, x0, x1 = cut_box(100, 100, lam, gen(seed))
        assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 100
        area = (y1 - y0) * (x1 - x0) / 100**2
        assert area <= 1 - lam + 0.02
        if y0 > 0 and y1 < 100 and x0 > 0 and x1 < 100:
            areas.append(area)
    assert areas and all(abs(a - (1 - lam)) < 0.03 for a in areas)


def test_both_on_choose_one_per_batch() -> None:
    mix = BatchMix(8, mixup=0.4, cutmix=1.0)
    kinds = set()
    for seed in range(30):
        x, _, out, _ = mixed(mix, seed, classes=8)
        kinds.add("cutmix" if ((out == x) | (out == x.roll(1, 0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
