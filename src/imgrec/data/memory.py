"""Data handed over from Python -> DataBundle: torch Datasets of (image, label), NumPy (x, y) pairs, or a dict of them.

Every image is converted once into one uint8 tensor per split (the in-memory path of named sets and small
folders): PIL images, uint8 tensors (C, H, W) or (H, W), float tensors in [0, 1] (ToTensor; a Normalize in the
data set's transform is undone), and arrays (H, W) or (H, W, C). to_splits does that conversion (once);
python_bundle then splits and measures as the options say (it runs for every training or resumed run).
Imports: torch, numpy, Pillow and the data package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgrec.data.datasets import MEMORY_LIMIT_BYTES, DataOptions, finish_bundle
from imgrec.data.folders import stratified_split
from imgrec.data.imageio import image_to_tensor, resize_center, to_mode
from imgrec.data.info import ArraySplit, DataBundle, DatasetInfo
from imgrec.data.transforms import channel_stats, normalize_stats
from imgrec.errors import ImgrecError, UsageError

SPLITS = ("train", "val", "test")
PYTHON_PREFIX = "python:"  # the data name of a run trained on data passed from Python


@dataclass
class PythonSplits:
    """What the user's data became: uint8 splits (val and test may be missing), class names, a name."""

    name: str
    classes: list[str]
    splits: dict[str, ArraySplit]
    notes: list[str] = field(default_factory=list)


def is_python_data(data: object) -> bool:
    """Whether data is a Python object to convert (not a data set name, folder or archive path)."""
    return not isinstance(data, str) and not hasattr(data, "__fspath__")


def to_splits(data: Any, classes: Sequence[str] | None = None,
              image_size: int | Sequence[int] | None = None) -> PythonSplits:
    """Convert a Dataset, an (x, y) pair or a dict {"train", "val", "test"} of them into uint8 splits; images
    of another size than image_size (default: the first image's) are resized to it when it is given."""
    parts = dict(data) if isinstance(data, Mapping) else {"train": data}
    unknown = [k for k in parts if k not in SPLITS]
    if unknown:
        raise UsageError(f"data dict key {unknown[0]!r} is not a split: use train, val and test")
    if "train" not in parts:
        raise UsageError("the data dict has no 'train' entry: give at least {'train': ...}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size) if image_size else None
    resize = size is not None
    converted: dict[str, ArraySplit] = {}
    channels: int | None = None
    for name in SPLITS:
        if name in parts and parts[name] is not None:
            converted[name], channels, size = _convert(parts[name], name, channels, size, resize)
    found = _classes_of(parts["train"])
    if found is not None and classes is not None and list(map(str, classes)) != found:
        raise UsageError(f"the data set names its classes ({', '.join(found[:4])}...): leave out classes=, or "
                         f"give the same names")
    names = found if found is not None else [str(c) for c in classes] if classes is not None else None
    top = max(int(split.labels.max()) for split in converted.values())
    if names is None:
        names = [str(i) for i in range(top + 1)]
    for name, split in converted.items():
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= len(names):
            bad = low if low < 0 else high
            index = int((split.labels == bad).nonzero()[0])
            raise ImgrecError(f"label {bad} of item {index} of the {name} data is out of range: there are "
                              f"{len(names)} classes (0..{len(names) - 1})")
    if len(names) < 2:
        raise ImgrecError(f"the data has {len(names)} class: a classifier needs at least 2")
    return PythonSplits(PYTHON_PREFIX + _data_name(parts["train"]), names, converted)


def python_bundle(data: PythonSplits, opts: DataOptions) -> DataBundle:
    """The splits as a DataBundle: a missing val carved from train (seeded, stratified), a missing test replaced
    by val, mean and std from the training split (unless given), then train_samples and the split checks."""
    train, val, test = data.splits["train"], data.splits.get("val"), data.splits.get("test")
    notes = list(data.notes)
    if val is None and opts.val_fraction > 0:
        val_idx, train_idx = stratified_split(train.labels.numpy(), [opts.val_fraction], opts.split_seed)
        train, val = train.subset(torch.from_numpy(train_idx)), train.subset(torch.from_numpy(val_idx))
    if test is None:
        if val is None:
            raise UsageError("give a test split ({'train': ..., 'test': ...}) or a val_fraction above 0: "
                             "the final test needs held-out images")
        test = val
        notes.append("no test data given: the validation split is also used for the final test (report on val)")
    channels, size = train.images.shape[1], tuple(train.images.shape[2:])
    mean, std = (opts.mean, opts.std) if opts.mean is not None else channel_stats(train.images)
    mean, std = normalize_stats(mean, std or [], channels)
    info = DatasetInfo(data.name, list(data.classes), channels, size, mean, std)  # type: ignore[arg-type]
    return finish_bundle(DataBundle(info, train, val, test, notes=notes), opts)


def _data_name(data: Any) -> str:
    inner = getattr(data, "dataset", None)  # torch.utils.data.Subset
    source = inner if inner is not None and hasattr(inner, "__getitem__") else data
    return "arrays" if isinstance(data, (tuple, list)) else type(source).__name__


def _classes_of(data: Any) -> list[str] | None:
    for candidate in (data, getattr(data, "dataset", None)):
        classes = getattr(candidate, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return [str(c) for c in classes]
    return None


def _normalize_of(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and std of a torchvision Normalize in the data set's transform (to undo it), if any."""
    for candidate in (data, getattr(data, "dataset", None)):
        transform = getattr(candidate, "transform", None)
        steps = getattr(transform, "transforms", [transform])
        for step in steps:
            if type(step).__name__ == "Normalize" and hasattr(step, "mean") and hasattr(step, "std"):
                return (torch.as_tensor(step.mean, dtype=torch.float32).view(-1, 1, 1),
                        torch.as_tensor(step.std, dtype=torch.float32).view(-1, 1, 1))
    return None


def _convert(data: Any, split: str, channels: int | None, size: tuple[int, int] | None, resize: bool,
             ) -> tuple[ArraySplit, int, tuple[int, int]]:
    """One split -> ArraySplit; channels and size are those of the splits before (else the first image's)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (np.ndarray, torch.Tensor)):
        return _convert_arrays(data[0], data[1], split, channels, size, resize)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise UsageError(f"the {split} data is a {type(data).__name__}: give a torch Dataset of (image, label), "
                         f"an (x, y) pair of arrays, or a dict of them")
    count = len(data)
    if count == 0:
        raise ImgrecError(f"the {split} data set is empty")
    undo = _normalize_of(data)
    images: torch.Tensor | None = None
    labels = torch.empty(count, dtype=torch.int64)
    for index in range(count):
        item = data[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ImgrecError(f"item {index} of the {split} data is a {type(item).__name__}: expected a pair "
                              f"(image, label)")
        image = _to_uint8(item[0], undo, f"item {index} of the {split} data")
        if images is None:
            channels = channels or (1 if image.shape[0] == 1 else 3)
            size = size or (int(image.shape[1]), int(image.shape[2]))
            _check_fits(count, channels, size, split)
            images = torch.empty((count, channels, *size), dtype=torch.uint8)
        images[index] = _fit(image, channels, size, f"item {index} of the {split} data", resize)  # type: ignore[arg-type]
        labels[index] = _label(item[1], f"item {index} of the {split} data")
    assert images is not None and channels is not None and size is not None
    return ArraySplit(images, labels), channels, size


def _convert_arrays(x: Any, y: Any, split: str, channels: int | None, size: tuple[int, int] | None, resize: bool,
                    ) -> tuple[ArraySplit, int, tuple[int, int]]:
    """(x, y): x (N, H, W), (N, H, W, C) or (N, C, H, W) of uint8, or floats in [0, 1] or [0, 255]."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(x) == 0:
        raise ImgrecError(f"the {split} arrays are empty")
    if len(x) != len(y) or y.ndim != 1:
        raise UsageError(f"the {split} arrays do not pair up: x has {len(x)} images, y has shape {y.shape} "
                         f"(expected ({len(x)},))")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ImgrecError(f"the {split} images have shape {x.shape}: expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if x.dtype != np.uint8:
        x = _scaled(x.astype(np.float64), f"the {split} images")
    whole = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))
    if not whole:
        raise ImgrecError(f"the {split} labels are {y.dtype}: give whole numbers 0..K-1")
    images = torch.from_numpy(np.ascontiguousarray(x[:, :3]))
    channels = channels or (1 if images.shape[1] == 1 else 3)
    size = size or (int(images.shape[2]), int(images.shape[3]))
    if images.shape[1] != channels or tuple(images.shape[2:]) != size:
        images = torch.stack([_fit(image, channels, size, f"the {split} images", resize)
                              for i, image in enumerate(images)])
    return ArraySplit(images, torch.from_numpy(y.astype(np.int64))), channels, size


def _scaled(x: np.ndarray, what: str) -> np.ndarray:
    """Floats -> uint8: [0, 1] (ToTensor's range) is scaled by 255, [0, 255] is taken as it is."""
    if not np.isfinite(x).all():
        raise ImgrecError(f"{what} hold values that are not finite")
    low, high = float(x.min()), float(x.max())
    if low >= -1e-3 and high <= 1 + 1e-3:
        x = x * 255.0
    elif low < 0 or high > 255:
        raise ImgrecError(f"{what} hold values from {low:.3g} to {high:.3g}: give uint8 images, or floats in [0, 1] "
                          f"(as ToTensor makes them) or in [0, 255]")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _to_uint8(image: Any, undo: tuple[torch.Tensor, torch.Tensor] | None, where: str) -> torch.Tensor:
    """One image of a Dataset -> uint8 (C, H, W)."""
    if isinstance(image, Image.Image):
        channels = 1 if image.mode in ("1", "L", "I", "I;16", "F", "LA") else 3
        return image_to_tensor(to_mode(image, channels))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] in (1, 3, 4) and array.shape[0] not in (1, 3):
            array = array.transpose(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, torch.Tensor):
        raise ImgrecError(f"{where} has a {type(image).__name__} where an image belongs: give PIL images, "
                          f"tensors (C, H, W) or arrays (H, W, C)")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ImgrecError(f"{where} is an image of shape {tuple(image.shape)}: expected (C, H, W) with C 1 or 3")
    image = image[:3]
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ImgrecError(f"{where} is a {image.dtype} tensor: give uint8 or float images")
    pixels = image.detach().float()
    if undo is not None and undo[0].shape[0] in (1, pixels.shape[0]):
        pixels = pixels * undo[1] + undo[0]  # undo Normalize: back to ToTensor's [0, 1]
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ImgrecError(f"{where} holds values from {low:.3g} to {high:.3g}: float images must be in [0, 1] as "
                          f"ToTensor makes them (a Normalize in the transform is undone; other scalings are not)")
    return (pixels * 255).round_().clamp_(0, 255).to(torch.uint8)


def _fit(image: torch.Tensor, channels: int, size: tuple[int, int], where: str, resize: bool) -> torch.Tensor:
    """An image -> the split's channels and size; a size that differs needs image_size= (then it is resized)."""
    if image.shape[0] == channels and tuple(image.shape[1:]) == size:
        return image
    if tuple(image.shape[1:]) != size and not resize:
        raise ImgrecError(f"{where} is {image.shape[1]}x{image.shape[2]} but the images before it are "
                          f"{size[0]}x{size[1]}: give image_size= to resize them all")
    pil = Image.fromarray(image.permute(1, 2, 0).numpy().squeeze(2) if image.shape[0] == 1
                          else image.permute(1, 2, 0).numpy())
    return image_to_tensor(resize_center(to_mode(pil, channels), size))


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ImgrecError(f"{where} has the label {value!r}: labels must be whole numbers 0..K-1")
    return int(value)


def _check_fits(count: int, channels: int, size: tuple[int, int], split: str) -> None:
    needed = count * channels * size[0] * size[1]
    if needed > MEMORY_LIMIT_BYTES:
        raise ImgrecError(f"the {split} data needs {needed / 1024**3:.1f} GiB as uint8 images, more than "
                          f"{MEMORY_LIMIT_BYTES / 1024**3:.0f} GiB: save it as an image folder (class/xxx.png) and "
                          f"pass the folder's path, which streams")
