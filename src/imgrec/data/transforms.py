"""Whole-batch preprocessing: uint8 images in, normalised (and, for training, augmented) float images out.

Both data paths (in-memory tensors and streamed files) end here, so they share one definition of
normalisation and augmentation. Every random choice comes from the generator the loader passes in,
which makes data order and augmentation reproducible from (seed, epoch). A model that expects another input
(pretrained weights: 224 px, three channels) gets it here too: batches are resized and their channels
converted on the fly, so images stay stored at their own size. MixUp and CutMix (BatchMix) mix a training
batch after it is normalised, with the same generator. Imports: torch (and torchvision's RandAugment and
TrivialAugment, when chosen).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from imgrec.errors import UsageError

# Known statistics of the named data sets (train split, pixel values in [0, 1]); others are computed.
KNOWN_STATS: dict[str, tuple[list[float], list[float]]] = {
    "mnist": ([0.1307], [0.3081]),
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


def parse_augment(spec: str, channels: int, photos: bool = False) -> list[str]:
    """Turn the --augment value into a list of ops.

    auto: nothing for grey data; for colour data crop+flip, or resized-crop+flip when `photos` (models pretrained
    on photographs, whose usual fine-tuning recipe is a random resized crop and a flip).
    """
    if spec == "auto":
        if channels != 3:
            return []
        return ["resized-crop", "flip"] if photos else ["crop", "flip"]
    if spec == "none":
        return []
    return spec.split(",")


class BatchTransform:
    """uint8 (B, C, H, W) -> float32 (B, C', H', W'), normalised; augmented when a generator is given.

    size: the (H', W') the model takes (default: the images' own); channels: the C' it takes (1 <-> 3 converted;
    default: the images' own). mean and std have C' values.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Sequence[str] = (),
                 size: Sequence[int] | None = None, channels: int | None = None, alternate_flip: bool = False) -> None:
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.augment = list(augment)
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.channels = channels
        self.alternate_flip = alternate_flip  # flip: each image on alternate epochs (needs where: see __call__)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 where: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
        """where: the batch's (indices in the split, epoch, seed), which alternate_flip's flips follow."""
        ops = self.augment if generator is not None else []
        for op in ops:
            if op == "flip" and self.alternate_flip and where is not None:
                images = torch.where(alternating_flips(*where)[:, None, None, None], images.flip(-1), images)
            elif op in _AUGMENTS:
                images = _AUGMENTS[op](images, generator)
        x = images.float()
        size = self.size or (x.shape[-2], x.shape[-1])
        # one interpolation: a random crop resized to the model's size, or just the resize
        crop = "resized-crop" in ops
        x = random_resized_crop(x, generator, size) if crop else resize(x, size)  # type: ignore[arg-type]
        if self.channels is not None:
            x = convert_channels(x, self.channels)
        x = torch.addcmul(self.shift, x, self.scale)
        if "erase" in ops:
            x = random_erase(x, generator)  # type: ignore[arg-type]
        return x


def weights_transform(weights: Mapping[str, Any]) -> BatchTransform:
    """The evaluation preprocessing a weights file records: its mean/std, and the model's input size and channels
    when they differ from the decoded images' (pretrained backbones; older files lack them)."""
    return BatchTransform(weights["mean"], weights["std"], size=weights.get("input_size"),
                          channels=weights.get("input_channels"))


def normalize_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[list[float], list[float]]:
    """Broadcast one-value statistics to every channel and check their length."""
    mean, std = list(mean), list(std)
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"--mean/--std have {len(mean)} values but the images have {channels} channels")
    return mean, std


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo normalisation for display (the tutorial's imgConvert): (B, C, H, W) -> values clipped to [0, 1]."""
    mean_t = torch.tensor(list(mean), dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=x.dtype).view(1, -1, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a uint8 (N, C, H, W) tensor, in float64 chunks."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-3), 6) for v in std.tolist()]


def _pad_amount(images: torch.Tensor, fraction: int) -> int:
    return max(1, min(images.shape[-2:]) // fraction)


def random_shift(images: torch.Tensor, generator: torch.Generator, mode: str, fraction: int) -> torch.Tensor:
    """Shift each image by up to 1/fraction of its size: pad (zeros or reflection), then crop at a random offset."""
    batch, _, height, width = images.shape
    pad = _pad_amount(images, fraction)
    padded = torch.nn.functional.pad(images if mode == "constant" else images.float(), (pad,) * 4, mode=mode)
    padded = padded.to(images.dtype)
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(batch)[:, None, None, None]
    c = torch.arange(images.shape[1])[None, :, None, None]
    return padded[b, c, rows, cols]


def random_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) for a whole batch: zero padding of 1/8 of the size (4 px for 32x32,
    3 px for 28x28), random offsets."""
    return random_shift(images, generator, "constant", 8)


def random_translate(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/16 of the size (2 px for 32x32, 1 px for 28x28; airbench's), borders reflected
    (no black frame): milder than crop, for short runs."""
    return random_shift(images, generator, "reflect", 16)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def alternating_flips(indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Which images of a batch to mirror in an epoch (airbench's alternating flip): each image is mirrored or not
    in epoch 1 by a coin of its own (a hash of its index and the seed), then the other way in each next epoch, so
    that every two epochs show each image both ways."""
    x = (indices.to(torch.int64) + seed * 0x2545F491) * 0x5851F42D4C957F2D  # wraps around: an integer hash
    x = x ^ (x >> 29)
    x = x * 0x14057B7EF767814F
    coin = ((x >> 31) & 1).bool()
    return coin ^ (epoch % 2 == 0)


def random_erase(x: torch.Tensor, generator: torch.Generator, probability: float = 0.5) -> torch.Tensor:
    """Cutout: with the given probability, set a random square of half the image size to the mean (0)."""
    batch, _, height, width = x.shape
    side = max(1, min(height, width) // 2)
    cy = torch.randint(0, height, (batch,), generator=generator)[:, None]
    cx = torch.randint(0, width, (batch,), generator=generator)[:, None]
    apply = (torch.rand(batch, generator=generator) < probability)[:, None, None, None]
    ys = torch.arange(height)[None, :]
    xs = torch.arange(width)[None, :]
    in_rows = ((ys - cy).abs() <= side // 2)[:, None, :, None]  # (B, 1, H, 1)
    in_cols = ((xs - cx).abs() <= side // 2)[:, None, None, :]  # (B, 1, 1, W)
    return x.masked_fill(apply & in_rows & in_cols, 0.0)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, size: Sequence[int],
                        scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        ) -> torch.Tensor:
    """torchvision's RandomResizedCrop for a float batch, as one grid sample: (B, C, H, W) -> (B, C, *size).

    Each image gets a box of 35-100% of its area (fastai's milder minimum for small data; torchvision's is 8%)
    and aspect ratio 3/4-4/3, at a random place inside it, resized bilinearly to `size`.
    """
    batch, _, height, width = x.shape
    area = torch.empty(batch).uniform_(*scale, generator=generator) * height * width
    log_ratio = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    box_w = (area * log_ratio.exp()).sqrt().clamp(max=width) / width  # fractions of the image
    box_h = (area / log_ratio.exp()).sqrt().clamp(max=height) / height
    # centres in affine_grid's [-1, 1] coordinates, keeping the box inside the image
    centre_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - box_w)
    centre_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - box_h)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = box_w, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = box_h, centre_y
    grid = torch.nn.functional.affine_grid(theta, [batch, x.shape[1], int(size[0]), int(size[1])], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a float batch to (H, W) (antialiased when shrinking); a no-op at the same size."""
    if tuple(x.shape[-2:]) == (int(size[0]), int(size[1])):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return torch.nn.functional.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False,
                                           antialias=shrink)


# ITU-R 601-2 luma, the weights PIL's convert("L") uses
_LUMA = (0.299, 0.587, 0.114)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> colour by repeating the channel (as PIL's convert("RGB")); colour -> grey by luma; else unchanged."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise UsageError(f"cannot feed {have}-channel images to a model that takes {channels} channels")


def _seed_from(generator: torch.Generator) -> int:
    """A seed drawn from the loader's generator, for the code that draws from a generator of its own."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _policy(name: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandAugment or TrivialAugmentWide, each image its own operations, on uint8 (B, C, H, W).

    torchvision draws from torch's global generator: it is forked and seeded from the loader's generator, so
    the batches are the same for the same seed (and on resume), and nothing else's random numbers change."""
    from torchvision.transforms import v2

    augment = v2.RandAugment() if name == "randaugment" else v2.TrivialAugmentWide()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(generator))
        return torch.stack([augment(image) for image in images])


def rand_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandAugment (torchvision's defaults: two operations of magnitude 9 of 31 per image)."""
    return _policy("randaugment", images, generator)


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment (torchvision's TrivialAugmentWide: one operation of a random magnitude per image)."""
    return _policy("trivialaugment", images, generator)


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), decided by the generator (torch's Beta takes none)."""
    return random.Random(_seed_from(generator)).betavariate(alpha, alpha)


def cut_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (y0, y1, x0, x1): sides sqrt(1 - lam) of the image's, centred anywhere in it, clipped to it."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


class BatchMix:
    """MixUp and CutMix of a training batch (torchvision.transforms.v2's maths): (x, labels) -> (x, soft targets).

    Each image is mixed with its neighbour in the batch (the batch rolled by one), with lam ~ Beta(alpha, alpha):
    MixUp blends the pixels, lam * x + (1 - lam) * x_rolled; CutMix pastes the neighbour's pixels into one box
    for the batch, and lam becomes the share of the area kept. The targets are mixed by the same lam, as
    probabilities (B, num_classes). With both on, each batch gets one of them, at even odds.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        if mixup < 0 or cutmix < 0 or not (mixup or cutmix):
            raise ValueError("BatchMix needs a positive mixup or cutmix alpha")
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or bool(torch.rand(1, generator=generator) < 0.5))
        lam = sample_beta(self.cutmix if use_cutmix else self.mixup, generator)
        rolled = x.roll(1, 0)
        if use_cutmix:
            height, width = x.shape[-2:]
            y0, y1, x0, x1 = cut_box(height, width, lam, generator)
            x = x.clone()
            x[..., y0:y1, x0:x1] = rolled[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        else:
            x = x * lam + rolled * (1.0 - lam)
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        return x, targets * lam + targets.roll(1, 0) * (1.0 - lam)


_AUGMENTS = {"crop": random_crop, "translate": random_translate, "flip": random_flip, "randaugment": rand_augment,
             "trivialaugment": trivial_augment}
