"""Whole-batch preprocessing: uint8 images in, normalised (and, for training, augmented) float images out.

Both data paths (in-memory tensors and streamed files) end here, so they share one definition of
normalisation and augmentation. Every random choice comes from the generator the loader passes in,
which makes data order and augmentation reproducible from (seed, epoch). Imports: torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imgrec.errors import UsageError

# Known statistics of the named data sets (train split, pixel values in [0, 1]); others are computed.
KNOWN_STATS: dict[str, tuple[list[float], list[float]]] = {
    "mnist": ([0.1307], [0.3081]),
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


def parse_augment(spec: str, channels: int) -> list[str]:
    """Turn the --augment value into a list of ops; auto is crop+flip for colour data, nothing for grey."""
    if spec == "auto":
        return ["crop", "flip"] if channels == 3 else []
    if spec == "none":
        return []
    return spec.split(",")


class BatchTransform:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W), normalised; augmented when a generator is given."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Sequence[str] = ()) -> None:
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.augment = list(augment)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:
            for op in self.augment:
                if op != "erase":
                    images = _AUGMENTS[op](images, generator)
        x = torch.addcmul(self.shift, images.float(), self.scale)
        if generator is not None and "erase" in self.augment:
            x = random_erase(x, generator)
        return x


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


def _pad_amount(images: torch.Tensor) -> int:
    return max(1, min(images.shape[-2:]) // 8)  # 4 px for 32x32, 3 px for 28x28


def random_shift(images: torch.Tensor, generator: torch.Generator, mode: str) -> torch.Tensor:
    """Shift each image by up to 1/8 of its size: pad (zeros or reflection), then crop at a random offset."""
    batch, _, height, width = images.shape
    pad = _pad_amount(images)
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
    """torchvision's RandomCrop(size, padding) for a whole batch: zero padding, random offsets."""
    return random_shift(images, generator, "constant")


def random_translate(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation with reflected borders (no black frame)."""
    return random_shift(images, generator, "reflect")


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


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


_AUGMENTS = {"crop": random_crop, "translate": random_translate, "flip": random_flip}
