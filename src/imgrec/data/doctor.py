"""`imgrec doctor`: a preflight report on a data set, before any training, with a suggested fix for each problem.

For an image folder (or an archive of one): counts per class and split, image sizes, modes and formats,
files that do not decode (zero-byte, not a regular file, not an image, truncated, beyond the decompression-bomb limit, damaged),
exact duplicates (same bytes) and near duplicates (perceptual hash, confirmed on a small thumbnail) within
and across splits (leakage) and across classes (conflicting labels), class imbalance, and EXIF-rotated
files. Named data sets get the counts, duplicate and balance checks on their pixels. Files are read through
the one image loader (imageio) in DataLoader workers. diagnose() returns a plain dict (what --json prints);
format_report() (doctor_report.py) turns it into text. Imports: numpy, Pillow, imagehash, scipy, torch and
the data package.
"""

from __future__ import annotations

import hashlib
import io
import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.utils.data import Dataset

from imgrec.data.datasets import (
    NAMED_DATASETS,
    DataOptions,
    assign_splits,
    data_not_found,
    load_data,
    scan_source,
)
from imgrec.data.doctor_report import find_problems, format_report
from imgrec.data.folders import ArchiveNode, walk
from imgrec.data.imageio import (
    EMPTY_FILE,
    EmptyFileError,
    ImageDecodeError,
    ImageTooLargeError,
    NotAnImageError,
    NotRegularFileError,
    is_image_file,
    load_image,
    read_file,
)
from imgrec.data.loaders import ReadingNotes, default_workers, file_loader, worker_error_message
from imgrec.errors import ImgrecError

__all__ = ["DoctorOptions", "diagnose", "format_report", "inspect_file", "near_pairs"]

THUMB_SIZE = 16  # near duplicates are confirmed on grey thumbnails of this size
FINGERPRINT_SIDE = 256  # larger images are box-averaged to about this size before they are fingerprinted
SPLITS = ("train", "val", "test")
EXIF_ORIENTATION = 0x0112


@dataclass
class DoctorOptions:
    """What to check, and how strictly; the split settings are the training defaults, so the splits match."""

    data_dir: str
    cache_dir: str
    workers: int | None = None
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    near_bits: int = 6  # perceptual hashes (64 bits) this close are near-duplicate candidates ...
    near_pixels: float = 4.0  # ... confirmed when their thumbnails differ by at most this (mean, of 255)
    imbalance_ratio: float = 3.0  # largest / smallest training class at which imbalance is a problem


@dataclass
class _Images:
    """Every image of the data set in one order: where it is, and what the checks need of it."""

    names: list[str]  # path relative to the data folder, or "<split>[i]" for a named data set
    splits: list[str]
    labels: list[int]
    facts: list[dict[str, Any]]  # inspect_file() results


def diagnose(spec: str, options: DoctorOptions) -> dict[str, Any]:
    """Check a data set (a name, or an image folder or archive); returns the report as plain values."""
    if spec in NAMED_DATASETS:
        images, report = _named_images(spec, options)
    elif os.path.exists(spec):
        images, report = _folder_images(spec, options)
    else:
        raise data_not_found(spec)
    report["images"] = len(images.names)
    report["counts"] = _counts(images, report["classes"])
    report["sizes"] = _tally(f"{f['size'][0]}x{f['size'][1]}" for f in images.facts if f["size"])
    report["modes"] = _tally(f["mode"] for f in images.facts if f["mode"])
    report["formats"] = _tally(f["format"] for f in images.facts if f["format"])
    report["unreadable"] = [
        {"file": name, "split": split, "kind": f["problem"], "reason": f["reason"]}
        for name, split, f in zip(images.names, images.splits, images.facts) if f["problem"]
    ]
    report["exif_rotated"] = [
        {"file": name, "split": split, "orientation": f["orientation"]}
        for name, split, f in zip(images.names, images.splits, images.facts)
        if f["orientation"] not in (0, 1) and not f["problem"]
    ]
    report["duplicates"] = _duplicates(images, report["classes"], options)
    report["problems"] = find_problems(report, options.imbalance_ratio)
    return report


def _tally(values: Any) -> dict[str, int]:
    return dict(Counter(values).most_common())


def _counts(images: _Images, classes: list[str]) -> dict[str, dict[str, int]]:
    """Readable images per split and class (unreadable ones are left out, as training leaves them out)."""
    counts = {split: dict.fromkeys(classes, 0) for split in dict.fromkeys(images.splits)}
    for split, label, f in zip(images.splits, images.labels, images.facts):
        if not f["problem"]:
            counts[split][classes[label]] += 1
    return counts


# --- gathering the images ------------------------------------------------------------------------------------


def _folder_images(spec: str, options: DoctorOptions) -> tuple[_Images, dict[str, Any]]:
    """The files of an image folder in the splits training would use, each inspected."""
    scanned, contents = scan_source(spec, options.cache_dir)  # an archive: read into memory, or extracted
    opts = DataOptions(options.data_dir, options.cache_dir, val_fraction=options.val_fraction,
                       test_fraction=options.test_fraction, split_seed=options.split_seed)
    notes: list[str] = []
    splits = assign_splits(scanned, opts, notes)
    if splits.get("test") is splits.get("val"):  # no test split: validation doubles as test; list its files once
        del splits["test"]
    paths = [p for name in SPLITS if name in splits for p in splits[name][0]]
    workers = default_workers() if options.workers is None else options.workers
    inspection = _FileInspection(paths, workers, contents)
    images = _Images(
        names=[os.path.relpath(p, scanned.root) for p in paths],
        splits=[name for name in SPLITS if name in splits for _ in splits[name][0]],
        labels=[label for name in SPLITS if name in splits for label in splits[name][1]],
        facts=_inspect_all(inspection, workers, inspection.files_being_read),
    )
    report = {"data": spec, "kind": "folder", "root": str(scanned.root), "classes": scanned.classes, "notes": notes,
              "ignored": _ignored_files(scanned.root, set(paths))}
    return images, report


def _ignored_files(root: Path | ArchiveNode, used: set[str]) -> list[str]:
    """Files in the data folder that are not images by their extension (training never looks at them)."""
    ignored = []
    for dirpath, dirnames, filenames in walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if path not in used and not name.startswith(".") and not is_image_file(name):
                ignored.append(os.path.relpath(path, root))
    return ignored


def _named_images(spec: str, options: DoctorOptions) -> tuple[_Images, dict[str, Any]]:
    """The images of a named data set (pixels in memory), split as training splits them."""
    opts = DataOptions(options.data_dir, options.cache_dir, val_fraction=options.val_fraction,
                       split_seed=options.split_seed)
    bundle = load_data(spec, opts)
    names, splits, labels, arrays = [], [], [], []
    for name in SPLITS:
        split = getattr(bundle, name)
        if split is None:
            continue
        names += [f"{name}[{i}]" for i in range(len(split))]
        splits += [name] * len(split)
        labels += split.labels.tolist()
        arrays.append(split.images)
    facts = _inspect_all(_ArrayInspection(torch.cat(arrays)), options.workers)
    report = {"data": spec, "kind": "named", "root": None, "classes": list(bundle.info.classes), "notes": bundle.notes,
              "ignored": []}
    return _Images(names, splits, labels, facts), report


def _inspect_all(dataset: Dataset, workers: int | None,
                 files_being_read: Callable[[str], list[str]] | None = None) -> list[dict[str, Any]]:
    loader = file_loader(dataset, workers, batch_size=64, collate_fn=list)
    try:
        return [facts for batch in loader for facts in batch]
    except RuntimeError as exc:  # a worker killed by the system (out of memory, a crash inside a decoder)
        if "DataLoader worker" not in str(exc):
            raise
        traceback.clear_frames(exc.__traceback__)  # frees the worker pool now, not at some later garbage collection
        raise ImgrecError(f"inspecting the images failed: {worker_error_message(exc, files_being_read)}") from None


class _FileInspection(Dataset):
    def __init__(self, paths: list[str], workers: int = 0, contents: dict[str, bytes] | None = None) -> None:
        self.paths = paths
        self.contents = contents  # the files' bytes by path (an archive read into memory), else read
        self.notes = ReadingNotes(workers)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with self.notes.reading(index):
            path = self.paths[index]
            return inspect_file(path) if self.contents is None else inspect_file(path, self.contents[path])

    def files_being_read(self, message: str) -> list[str]:
        return [self.paths[index] for index in self.notes.being_read(message)]


class _ArrayInspection(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images  # uint8 (N, C, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        array = self.images[index].permute(1, 2, 0).numpy()  # (H, W, C)
        img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        facts = _blank_facts()
        facts.update(size=[img.width, img.height], mode=img.mode, digest=hashlib.sha1(array.tobytes()).hexdigest())
        facts["phash"], facts["thumb"] = _fingerprints(img.convert("L"))
        return facts


# --- one file ------------------------------------------------------------------------------------------------


def _blank_facts() -> dict[str, Any]:
    return {"bytes": 0, "format": None, "mode": None, "size": None, "orientation": 1, "digest": None,
            "problem": None, "reason": "", "phash": 0, "thumb": None}


def inspect_file(path: str, content: bytes | None = None) -> dict[str, Any]:
    """Header facts, content hash, decodability (through the one image loader) and fingerprints of one file (or of
    `content`, its bytes held in memory).

    A bad file is described, never raised: problem is zero-byte, not-regular, not-an-image, too-large, truncated
    or corrupt, and the reason is worded as training's skipped.txt and predict word it.
    """
    facts = _blank_facts()
    try:
        data = read_file(path) if content is None else content  # regular files only, read no further than their size
        if not data:  # an archive's empty member: as read_file words an empty file
            raise EmptyFileError(f"{path}: {EMPTY_FILE}", EMPTY_FILE)
    except ImageDecodeError as exc:
        facts["problem"], facts["reason"] = _kind(exc), exc.reason
        return facts
    facts["bytes"] = len(data)
    facts["digest"] = hashlib.sha1(data).hexdigest()
    _read_header(data, facts)
    try:
        # what training decodes: upright per EXIF, grey for the fingerprints; its error words the reason, so a
        # file is described in the same words here, in training's skipped.txt and by predict
        upright = load_image(io.BytesIO(data), 1, name=path)
        facts["phash"], facts["thumb"] = _fingerprints(upright)
    except ImageDecodeError as exc:
        facts["problem"], facts["reason"] = _kind(exc), exc.reason
    except Exception as exc:  # an image that decodes but cannot be fingerprinted is still one bad file
        facts["problem"], facts["reason"] = "corrupt", f"cannot read image ({type(exc).__name__}: {exc})"
    return facts


def _read_header(data: bytes, facts: dict[str, Any]) -> None:
    """Format, mode, size and EXIF orientation from the header, where it can be read (the loader says why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                facts.update(format=img.format, mode=img.mode, size=[img.width, img.height])
                try:
                    facts["orientation"] = int(img.getexif().get(EXIF_ORIENTATION, 1))
                except Exception:  # a damaged EXIF block: the loader ignores it too
                    facts["orientation"] = 1
    except Exception:  # not an image, a bomb header, a broken header: load_image names it in its own words
        pass


_KINDS = ((EmptyFileError, "zero-byte"), (NotRegularFileError, "not-regular"), (NotAnImageError, "not-an-image"),
          (ImageTooLargeError, "too-large"))


def _kind(exc: ImageDecodeError) -> str:
    """The kind of a loader error: by its class, else by its reason."""
    return next((kind for cls, kind in _KINDS if isinstance(exc, cls)), None) or _classify(exc.reason)[0]


def _classify(reason: str) -> tuple[str, str]:
    if "too large" in reason:
        return "too-large", reason
    if any(s in reason.lower() for s in ("truncated", "premature end", "end of file")):
        return "truncated", reason
    return "corrupt", reason


def _fingerprints(grey: Image.Image) -> tuple[int, bytes]:
    """The 64-bit perceptual hash and a THUMB_SIZE x THUMB_SIZE grey thumbnail of an image.

    A large image is first box-averaged to at most about FINGERPRINT_SIDE pixels a side: resampling filters size
    their weights by the scale, and an 80,000,000 x 1 strip (a valid PNG of 77 kB) would need gigabytes of them.
    """
    factors = (max(1, grey.width // FINGERPRINT_SIDE), max(1, grey.height // FINGERPRINT_SIDE))
    if factors != (1, 1):
        grey = grey.reduce(factors)
    phash = int(str(imagehash.phash(grey)), 16)
    thumb = np.asarray(grey.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return phash, thumb.tobytes()


# --- duplicates ----------------------------------------------------------------------------------------------


def near_pairs(hashes: np.ndarray, bits: int, block: int = 512) -> np.ndarray:
    """Index pairs (i < j) of 64-bit hashes that differ in at most `bits` bits: (P, 2) int64.

    Split the hash into bits+1 bands: two hashes that close agree on at least one band exactly (pigeonhole),
    so only hashes sharing a band value are compared.
    """
    hashes = hashes.astype(np.uint64)
    bands = bits + 1
    widths = [64 // bands + (1 if k < 64 % bands else 0) for k in range(bands)]
    found, shift = [], 0
    for width in widths:
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(key, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
            if len(group) < 2:
                continue
            members = hashes[group]
            for start in range(0, len(group), block):  # (block, m) distances at a time
                distance = np.bitwise_count(members[start : start + block, None] ^ members[None, :])
                i, j = np.nonzero(distance <= bits)
                i += start
                keep = i < j
                found.append(np.stack([group[i[keep]], group[j[keep]]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1).astype(np.int64)
    return np.unique(pairs, axis=0)


def _duplicates(images: _Images, classes: list[str], options: DoctorOptions) -> list[dict[str, Any]]:
    """Groups of files that hold the same picture: exactly (same bytes or pixels) or nearly (hash + thumbnail)."""
    readable = [i for i, f in enumerate(images.facts) if not f["problem"] and f["digest"]]
    first_of: dict[str, int] = {}
    edges = []
    for i in readable:  # exact copies: join each file to the first with the same content
        edges.append((first_of.setdefault(images.facts[i]["digest"], i), i))
    unique = sorted(set(first_of.values()))
    if len(unique) > 1:
        hashes = np.array([images.facts[i]["phash"] for i in unique], dtype=np.uint64)
        thumbs = np.stack([np.frombuffer(images.facts[i]["thumb"], dtype=np.uint8) for i in unique]).astype(np.int16)
        pairs = near_pairs(hashes, options.near_bits)
        if len(pairs):
            difference = np.abs(thumbs[pairs[:, 0]] - thumbs[pairs[:, 1]]).mean(axis=1)
            edges += [(unique[a], unique[b]) for a, b in pairs[difference <= options.near_pixels].tolist()]
    if not edges:
        return []
    n = len(images.names)
    rows, cols = zip(*edges)
    graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for i in readable:
        members.setdefault(int(component[i]), []).append(i)
    groups = []
    for group in members.values():
        if len(group) < 2:
            continue
        exact = len({images.facts[i]["digest"] for i in group}) == 1
        groups.append({"kind": "exact" if exact else "near", "files": [images.names[i] for i in group],
                       "splits": [images.splits[i] for i in group],
                       "classes": [classes[images.labels[i]] for i in group]})
    return sorted(groups, key=lambda g: (g["kind"], g["files"]))
