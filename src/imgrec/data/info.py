"""What a data set hands to the rest of imgrec: its description (DatasetInfo) and its splits.

A split is either an ArraySplit (every image decoded once into a uint8 tensor) or a FileSplit (paths decoded
as batches are drawn). Imports: torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DatasetInfo:
    """The numbers a model and its preprocessing are built from."""

    name: str
    classes: list[str]
    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass
class ArraySplit:
    """A split held in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ArraySplit:
        return ArraySplit(self.images[indices], self.labels[indices])


@dataclass
class FileSplit:
    """A split read from files as it is used; every image is resized to (H, W) with `channels` channels."""

    paths: list[str]
    labels: torch.Tensor
    channels: int
    image_size: tuple[int, int]
    contents: dict[str, bytes] | None = None  # the files' bytes by path (an archive read into memory), else read

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: torch.Tensor) -> FileSplit:
        idx = indices.tolist()
        return FileSplit([self.paths[i] for i in idx], self.labels[indices], self.channels, self.image_size,
                         self.contents)

    def content(self, index: int) -> bytes | None:
        """File `index`'s bytes when they are held in memory, else None (read the file)."""
        return None if self.contents is None else self.contents[self.paths[index]]


Split = ArraySplit | FileSplit


@dataclass
class DataBundle:
    """A loaded data set: its info, its train/val/test splits and, for folders, the file list of each split."""

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
    manifest: list[tuple[str, str, str, str]] = field(default_factory=list)  # (file, class, split, why skipped or "")
    notes: list[str] = field(default_factory=list)  # things the user should know (split made, size chosen)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, split, reason): files that do not decode

    def split(self, name: str) -> Split:
        chosen = {"train": self.train, "val": self.val, "test": self.test}[name]
        if chosen is None:
            raise KeyError(name)
        return chosen
