"""Batches for training and evaluation, from memory or from files, with one semantics.

Both loaders draw the epoch's order from a generator seeded by (seed, epoch), gather uint8 images, then
apply the same BatchTransform with the same generator. For the same seed they give the same batches,
whichever path the images come from. Imports: torch and the data package.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from imgrec.data.imageio import ImageDecodeError, read_image
from imgrec.data.info import ArraySplit, FileSplit, Split
from imgrec.data.transforms import BatchTransform
from imgrec.errors import ImgrecError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that decides one epoch's order and augmentation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _batch_order(n: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class TensorLoader:
    """Batches of an in-memory split: index the uint8 tensor, transform the whole batch. No workers."""

    def __init__(self, split: ArraySplit, batch_size: int, transform: BatchTransform, *, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False) -> None:
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = epoch_generator(self.seed, self.epoch)
        for idx in _batch_order(len(self.split), self.batch_size, self.shuffle, self.drop_last, generator):
            images = self.split.images[idx]
            yield self.transform(images, generator if self.augment else None), self.split.labels[idx]


class FileDataset(Dataset):
    """Decodes one file per item with the shared image loader: (uint8 (C, H, W), label)."""

    def __init__(self, split: FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.split.paths[index]
        return read_image(path, self.split.channels, self.split.image_size), int(self.split.labels[index])


class _EpochBatches:
    """The batch sampler of StreamLoader: the same order TensorLoader would draw, set at the start of each epoch.

    It holds the batches, not the loader: a loader -> DataLoader -> sampler -> loader cycle would keep the
    persistent worker processes alive after the loader is dropped, until the garbage collector happens to run.
    """

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(idx.tolist() for idx in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader:
    """Batches of a file split, decoded by DataLoader workers; transformed in the main process."""

    def __init__(self, split: FileSplit, batch_size: int, transform: BatchTransform, *, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False, workers: int | None = None) -> None:
        self.split, self.batch_size, self.transform = split, batch_size, transform
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.epoch = 0
        self._batches = _EpochBatches()
        workers = default_workers() if workers is None else workers
        self._loader = DataLoader(FileDataset(split), batch_sampler=self._batches, num_workers=workers,
                                  persistent_workers=workers > 0, collate_fn=_collate_uint8)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = epoch_generator(self.seed, self.epoch)
        self._batches.batches = _batch_order(len(self.split), self.batch_size, self.shuffle, self.drop_last, generator)
        try:
            for images, labels in self._loader:
                yield self.transform(images, generator if self.augment else None), labels
        except (ImageDecodeError, RuntimeError) as exc:
            if "DataLoader worker" not in str(exc) and not isinstance(exc, ImageDecodeError):
                raise
            traceback.clear_frames(exc.__traceback__)  # frees the worker pool now, not at some later garbage collection
            raise ImgrecError(worker_error_message(exc)) from None


def _collate_uint8(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    return images, labels


def worker_error_message(exc: BaseException) -> str:
    """The user-facing line of an error raised in a DataLoader worker (which arrives with a traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("Error: ", 1)[-1] if "Traceback" in str(exc) else last


def default_workers() -> int:
    """Worker processes for decoding: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def make_loader(split: Split, batch_size: int, transform: BatchTransform, *, train: bool, seed: int = 0,
                workers: int | None = None) -> TensorLoader | StreamLoader:
    """A loader for one split: shuffled and augmented for training, in order and plain otherwise."""
    # A last training batch of one image makes BatchNorm fail ("Expected more than 1 value per channel"): drop it.
    # The order is shuffled, so it is another image each epoch.
    lone = train and len(split) > batch_size and len(split) % batch_size == 1
    options = dict(shuffle=train, augment=train, seed=seed, drop_last=lone)
    if isinstance(split, ArraySplit):
        return TensorLoader(split, batch_size, transform, **options)
    return StreamLoader(split, batch_size, transform, workers=workers, **options)
