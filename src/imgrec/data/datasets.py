"""Data sets by name or path -> DataBundle (DatasetInfo + train/val/test splits).

Named sets: mnist and fashion-mnist read from their IDX files (torchvision only downloads them), cifar10
through torchvision's class, digits from scikit-learn.
Anything else is a path to an image folder or an archive of one (see folders.py). Small data ends up as
one uint8 tensor per split (decoded once, cached); large folders stay files and are streamed.
Imports: torch, numpy, the data package (torchvision on use); never a model or the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import secrets
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.data.folders import (
    FolderSplits,
    extract_archive,
    is_archive,
    read_archive,
    scan_folder,
    stratified_split,
)
from imgrec.data.imageio import open_regular
from imgrec.data.info import ArraySplit, DataBundle, DatasetInfo, FileSplit, Split
from imgrec.data.transforms import KNOWN_STATS, channel_stats, normalize_stats
from imgrec.data.verify import decode_checked, strict_error, without
from imgrec.errors import ImgrecError, UsageError, os_error_cause

log = logging.getLogger(__name__)

MEMORY_LIMIT_BYTES = 2 * 1024**3  # folders whose decoded pixels fit in this are held in memory
DEFAULT_FOLDER_SIZE = 128  # image size for folders whose images differ in size
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class DataOptions:
    """How to load a data set; RunConfig fields of the same names feed it."""

    data_dir: str
    cache_dir: str
    download: bool = False
    image_size: int | tuple[int, int] | None = None
    channels: int | None = None  # force 1 or 3 channels (inference rebuilds data as the model saw it)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    train_samples: int | None = None
    loader: str = "auto"
    workers: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    strict: bool = False  # fail on files that do not decode instead of skipping them
    offer_download: bool = True  # a missing named set's error advises --download (train has it; evaluate has not)


@dataclass(frozen=True)
class NamedDataset:
    """A data set imgrec knows by name."""

    description: str
    files: tuple[str, ...]  # what must exist under the data folder (empty: ships with a package)
    load: Callable[[DataOptions], tuple[list[str], ArraySplit, ArraySplit | None, ArraySplit]]


def _idx_files(folder: str) -> tuple[str, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(f"{folder}/raw/{n}" for n in names)


# torchvision's class names for its IDX data sets (runs record them; read here without importing torchvision)
IDX_CLASSES = {
    "MNIST": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"],
}


def _load_idx(cls_name: str) -> Callable[[DataOptions], tuple]:
    def load(opts: DataOptions) -> tuple:
        if opts.download and missing_files(cls_name, opts.data_dir, _idx_files(cls_name)):
            import torchvision.datasets as tvd  # only to download: reading needs no torchvision (seconds to import)

            cls = getattr(tvd, cls_name)
            _named_call(lambda: cls(root=opts.data_dir, train=True, download=True), cls_name, opts.data_dir)
        raw = Path(opts.data_dir) / cls_name / "raw"  # where torchvision keeps them: <root>/<class name>/raw
        splits = []
        for prefix in ("train", "t10k"):  # one file at a time, so that errors name it
            images = _read_named_file(raw / f"{prefix}-images-idx3-ubyte", "IDX image", dims=3)
            labels = _read_named_file(raw / f"{prefix}-labels-idx1-ubyte", "IDX label", dims=1)
            if len(images) != len(labels):
                raise ImgrecError(f"{raw / f'{prefix}-images-idx3-ubyte'} holds {len(images):,} images but "
                                  f"{raw / f'{prefix}-labels-idx1-ubyte'} {len(labels):,} labels; download them again")
            splits.append(ArraySplit(images.unsqueeze(1).contiguous(), labels.to(torch.int64)))
        return list(IDX_CLASSES[cls_name]), splits[0], None, splits[1]

    return load


REPLACE_ADVICE = "copy it again, or delete it and let `imgrec train --download` fetch it"


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format: magic 0x0000 0x08 <dims>, then <dims> big-endian sizes, then
    the bytes) as a uint8 tensor of that shape; ValueError names what does not match."""
    data = path.read_bytes()
    header = 4 * (dims + 1)
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != dims:
        raise ValueError(f"its header does not match its contents: not an IDX file of unsigned bytes with {dims} "
                         f"dimension{'s' if dims > 1 else ''}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"its header promises {' x '.join(map(str, shape))} bytes, it holds {len(data) - header:,}")
    return torch.from_numpy(np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(shape))


def _read_named_file(path: Path, kind: str, dims: int) -> torch.Tensor:
    """read_idx on one file; whatever goes wrong is one line naming the file."""
    try:
        return read_idx(path, dims)
    except Exception as exc:
        raise ImgrecError(f"{path} is not a readable {kind} file ({_reason(exc)}): {REPLACE_ADVICE}") from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError):  # read_idx's own reasons
        return text
    if isinstance(exc, AssertionError):  # torchvision checks files with bare asserts
        return f"its header does not match its contents{f': {text}' if text else ''}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _named_call(make: Callable[[], Any], name: str, data_dir: str) -> Any:
    """A torchvision data set class called to download or load: any error is one line."""
    try:
        return make()
    except Exception as exc:  # "Dataset not found or corrupted", failed downloads, damaged files
        raise ImgrecError(f"cannot load {name} from {data_dir}: {_reason(exc)}") from None


def _load_cifar10(opts: DataOptions) -> tuple:
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import check_integrity

    parts = []
    for train in (True, False):
        try:
            parts.append(tvd.CIFAR10(root=opts.data_dir, train=train, download=opts.download))
        except Exception as exc:  # name the file: torchvision checks each file's MD5 but does not say which failed
            folder = Path(opts.data_dir) / tvd.CIFAR10.base_folder
            files = [*tvd.CIFAR10.train_list, *tvd.CIFAR10.test_list, [tvd.CIFAR10.meta["filename"], tvd.CIFAR10.meta["md5"]]]
            bad = next((folder / f for f, md5 in files
                        if (folder / f).is_file() and not check_integrity(str(folder / f), md5)), None)
            if bad is None:
                raise ImgrecError(f"cannot load cifar10 from {opts.data_dir}: {_reason(exc)}") from None
            raise ImgrecError(f"{bad} is damaged (its MD5 checksum is not the published one): {REPLACE_ADVICE}") from None
    splits = [
        ArraySplit(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets, dtype=torch.int64))
        for p in parts
    ]
    return list(parts[0].classes), splits[0], None, splits[1]


def _load_digits(opts: DataOptions) -> tuple:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # A fixed split (seed 0, not the run's seed) so that every run is tested on the same images.
    test, val, train = stratified_split(digits.target, [0.15, 0.15], seed=0)
    parts = [ArraySplit(images[torch.from_numpy(i)], labels[torch.from_numpy(i)]) for i in (train, val, test)]
    return [str(i) for i in range(10)], parts[0], parts[1], parts[2]


NAMED_DATASETS: dict[str, NamedDataset] = {
    "mnist": NamedDataset("MNIST handwritten digits, 60k/10k, 28x28 grey", _idx_files("MNIST"),
                          _load_idx("MNIST")),
    "fashion-mnist": NamedDataset("Zalando Fashion-MNIST clothes, 60k/10k, 28x28 grey", _idx_files("FashionMNIST"),
                                  _load_idx("FashionMNIST")),
    "cifar10": NamedDataset(
        "CIFAR-10 objects, 50k/10k, 32x32 colour",
        tuple(f"cifar-10-batches-py/{n}" for n in
              ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
               "batches.meta")),
        _load_cifar10,
    ),
    "digits": NamedDataset("scikit-learn's 1,797 handwritten digits, 8x8 grey, embedded (no download)", (),
                           _load_digits),
}


def missing_files(name: str, data_dir: str, files: tuple[str, ...] | None = None) -> list[str]:
    """The files of a named data set (or the files given) that are not under data_dir."""
    return [f for f in (NAMED_DATASETS[name].files if files is None else files) if not (Path(data_dir) / f).is_file()]


def archives_of(name: str, data_dir: str) -> list[Path]:
    """Archives under data_dir named after a named data set (cifar10-jpeg.tar.gz for cifar10): image folders that
    `--data PATH` reads, though not the named set's own files."""
    folder, key = Path(data_dir), name.replace("-", "").lower()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_archive(p)
                  and p.name.lower().replace("-", "").replace("_", "").startswith(key))


def load_data(spec: str, opts: DataOptions) -> DataBundle:
    """Load a data set by name or path, with its info and its train/val/test splits."""
    if spec in NAMED_DATASETS:
        bundle = _load_named(spec, opts)
    elif os.path.exists(spec):
        bundle = _load_folder(spec, opts)
    elif spec.startswith("python:"):
        raise ImgrecError(f"this run was trained on data passed from Python ({spec[len('python:'):]}): pass the data "
                         f"again, e.g. imgrec.load(run, data=...)")
    else:
        raise data_not_found(spec)
    return finish_bundle(bundle, opts)


def finish_bundle(bundle: DataBundle, opts: DataOptions) -> DataBundle:
    """The training subset (--train-samples), then the split checks (labels in range, no empty split)."""
    if opts.train_samples is not None and opts.train_samples < len(bundle.train):
        keep = stratified_split(bundle.train.labels.numpy(), [opts.train_samples / len(bundle.train)], opts.split_seed)[0]
        bundle.train = bundle.train.subset(torch.from_numpy(keep))
        bundle.notes.append(f"training on a stratified subset of {len(bundle.train)} images")
    _check_splits(bundle)
    return bundle


def data_not_found(spec: str) -> ImgrecError:
    """The error for --data that is neither a named set nor an existing path: ./photos, ~/data, a/b or x.zip were
    meant as a path (missing: exit 1), anything else as a name (unknown: a usage error)."""
    if any(sep in spec for sep in ("/", os.sep)) or spec.startswith((".", "~")) or is_archive(Path(spec)):
        return ImgrecError(f"{'file' if is_archive(Path(spec)) else 'folder'} not found: {spec}")
    return UsageError(f"unknown data set {spec!r}: use one of {', '.join(NAMED_DATASETS)}, or a path to an image "
                      f"folder or archive")


def _check_splits(bundle: DataBundle) -> None:
    """Every label in range, no empty train or test split; an empty validation split is dropped."""
    info = bundle.info
    for name in ("train", "val", "test"):
        split = getattr(bundle, name)
        if split is None or len(split) == 0:
            continue
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= info.num_classes:
            bad = low if low < 0 else high
            raise ImgrecError(f"label {bad} in the {name} split of {info.name} is out of range: "
                              f"it has {info.num_classes} classes (0..{info.num_classes - 1}); check its label files")
    if bundle.val is not None and len(bundle.val) == 0:
        bundle.val = None
        bundle.notes.append("too few images for a validation split: the last epoch's weights are kept")
    for name in ("train", "test"):
        if len(getattr(bundle, name)) == 0:
            raise ImgrecError(f"{info.name} has no images left for the {name} split; add images "
                              f"(a few per class at least) or lower --test-fraction/--val-fraction")


def _load_named(name: str, opts: DataOptions) -> DataBundle:
    entry = NAMED_DATASETS[name]
    missing = missing_files(name, opts.data_dir)
    if missing and not opts.download:
        raise ImgrecError(
            f"{name} not found under {opts.data_dir}: missing {', '.join(missing[:2])}"
            f"{' and more' if len(missing) > 2 else ''}; "
            f"{'run with --download (needs internet), or ' if opts.offer_download else ''}point --data-dir "
            f"(or $IMGREC_DATA) at a folder that holds them"
        )
    classes, train, val, test = entry.load(opts)  # errors are one line naming the file
    notes: list[str] = []
    if val is None and opts.val_fraction > 0:
        val_idx, train_idx = stratified_split(train.labels.numpy(), [opts.val_fraction], opts.split_seed)
        train, val = train.subset(torch.from_numpy(train_idx)), train.subset(torch.from_numpy(val_idx))
    channels, size = train.images.shape[1], tuple(train.images.shape[2:])
    if opts.mean is not None:
        mean, std = opts.mean, opts.std
    elif name in KNOWN_STATS:
        mean, std = KNOWN_STATS[name]
    else:
        mean, std = channel_stats(train.images)
    mean, std = normalize_stats(mean, std or [], channels)
    info = DatasetInfo(name, classes, channels, size, mean, std)  # type: ignore[arg-type]
    return DataBundle(info, train, val, test, notes=notes)


def folder_of(path: str, cache_dir: str) -> Path:
    """The image folder a path names: the folder itself, or an archive's extraction in the cache."""
    source = Path(path)
    folder = extract_archive(source, cache_dir) if source.is_file() and is_archive(source) else source
    if not folder.is_dir():
        raise UsageError(f"{path} is neither a data set name, an image folder nor an archive ({', '.join(('.zip', '.tar.gz'))})")
    return folder


def scan_source(path: str, cache_dir: str, stream: bool = False) -> tuple[FolderSplits, dict[str, bytes] | None]:
    """The layout and files of an image folder or an archive, and the archive's file contents by path when it is
    read into memory (not when `stream`, nor when it is too large: then it is extracted into the cache)."""
    source = Path(path)
    archive = read_archive(source) if not stream and source.is_file() and is_archive(source) else None
    if archive is not None:
        return scan_folder(archive.tree), archive.files
    return scan_folder(folder_of(path, cache_dir)), None


def _load_folder(path: str, opts: DataOptions) -> DataBundle:
    source = Path(path)
    scanned, contents = scan_source(path, opts.cache_dir, stream=opts.loader == "stream")
    notes: list[str] = []
    splits = assign_splits(scanned, opts, notes)
    channels, size = _choose_shape(splits["train"][0], opts, notes, contents)
    file_splits = {name: FileSplit(paths, torch.tensor(labels, dtype=torch.int64), channels, size, contents)
                   for name, (paths, labels) in splits.items()}
    pixels = sum(len(s) for s in file_splits.values()) * channels * size[0] * size[1]
    in_memory = opts.loader == "memory" or (opts.loader == "auto" and pixels <= MEMORY_LIMIT_BYTES)
    if contents is not None and not in_memory:  # too many pixels to hold: extracted into the cache and streamed from there
        return _load_folder(path, replace(opts, loader="stream"))
    # Every file is decoded once before training (in memory: that decode is the data; streamed: a check pass),
    # and files that do not decode are left out of their split, which is otherwise kept as drawn.
    final: dict[str, Split] = {}
    failures: dict[str, str] = {}
    for name, split in file_splits.items():
        final[name], failed = _decode_split(split, opts) if in_memory else _check_split(split, opts)
        failures.update(failed)
    skipped = [(path, name, failures[path]) for name, (paths, _) in splits.items() for path in paths if path in failures]
    if skipped and opts.strict:
        raise strict_error(skipped)
    mean, std = (opts.mean, opts.std) if opts.mean is not None else _train_stats(final["train"], opts)
    mean, std = normalize_stats(mean, std or [], channels)
    info = DatasetInfo(str(source), scanned.classes, channels, size, mean, std)
    manifest = [
        (os.path.relpath(p, scanned.root), scanned.classes[lab], name, failures.get(p, ""))
        for name, (paths, labels) in splits.items()
        for p, lab in zip(paths, labels)
    ]
    return DataBundle(info, final["train"], final.get("val"), final["test"], manifest=manifest, notes=notes,
                      skipped=skipped)


def assign_splits(scanned: FolderSplits, opts: DataOptions, notes: list[str]) -> dict[str, tuple[list[str], list[int]]]:
    """train/val/test file lists: the folder's own splits, completed by seeded stratified splits."""
    splits = dict(scanned.splits)

    def carve(source: str, fraction: float) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
        paths, labels = splits[source]
        taken, kept = stratified_split(np.array(labels), [fraction], opts.split_seed)
        pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        return pick(taken), pick(kept)

    if "all" in splits:
        test, rest = carve("all", opts.test_fraction)
        splits = {"train": rest, "test": test}
        notes.append(f"split the folder with seed {opts.split_seed}: {opts.test_fraction:.0%} held out for testing")
    if "val" not in splits and opts.val_fraction > 0:
        val, train = carve("train", opts.val_fraction)
        splits["train"], splits["val"] = train, val
    if "test" not in splits:
        splits["test"] = splits["val"]
        notes.append("the folder has no test split: the validation split is also used for the final test")
    return splits


def _choose_shape(train_paths: list[str], opts: DataOptions, notes: list[str],
                  contents: dict[str, bytes] | None = None) -> tuple[int, tuple[int, int]]:
    """Channels and (H, W) from a sample of the training images' headers (`contents`: their bytes, when held in
    memory), unless given."""
    from PIL import Image

    step = max(1, len(train_paths) // 256)
    modes: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    for p in train_paths[::step]:
        try:
            with (io.BytesIO(contents[p]) if contents else open_regular(p)) as f, Image.open(f) as img:  # never a pipe
                modes[img.mode] += 1
                sizes[(img.height, img.width)] += 1
        except Exception:  # any unreadable file (a decompression-bomb header too) is found by the decoding pass
            continue
    channels = opts.channels or (1 if modes and set(modes) <= GREY_MODES else 3)
    if isinstance(opts.image_size, tuple):
        return channels, opts.image_size
    if opts.image_size:
        return channels, (opts.image_size, opts.image_size)
    common, count = sizes.most_common(1)[0] if sizes else ((DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE), 0)
    if count >= 0.8 * sum(sizes.values()) and max(common) <= 256:
        return channels, common
    uniform = count > 0 and count >= 0.8 * sum(sizes.values())  # then only too large
    reason = f"images are {common[0]}x{common[1]}" if uniform else "images differ in size"
    notes.append(f"{reason}; resizing to {DEFAULT_FOLDER_SIZE}x{DEFAULT_FOLDER_SIZE} (set --image-size)")
    return channels, (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)


def _fingerprint(split: FileSplit, extra: str = "") -> str:
    digest = hashlib.sha1(f"{split.channels}|{split.image_size}|{extra}".encode())
    for index, (path, label) in enumerate(zip(split.paths, split.labels.tolist())):
        content = split.content(index)
        try:
            if content is not None:  # held in memory (an archive's file): known by its bytes
                seen = f"{len(content)}|{zlib.crc32(content)}"
            else:
                st = os.stat(path)
                seen = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError as exc:  # a dangling or looping link: the decoding pass lists it as not a regular file
            seen = f"{exc.errno}"
        digest.update(f"{path}|{label}|{seen}\n".encode())
    return digest.hexdigest()[:16]


def _decode_split(split: FileSplit, opts: DataOptions) -> tuple[ArraySplit, dict[str, str]]:
    """Decode every file of a split once into a uint8 tensor, leaving out (and returning) the files that do not
    decode; cached under cache_dir/decoded/."""
    cache = Path(opts.cache_dir) / "decoded" / f"{_fingerprint(split)}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return ArraySplit(saved["images"], saved["labels"]), dict(saved["failures"])
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError):
            cache.unlink(missing_ok=True)  # a damaged (or older) cache entry is rebuilt
    images, failures = decode_checked(split, opts.workers, keep_images=True)
    assert images is not None
    labels = without(split, failures).labels.clone()
    _store(cache, lambda tmp: torch.save({"images": images, "labels": labels, "failures": failures}, tmp))
    return ArraySplit(images, labels), failures


def _check_split(split: FileSplit, opts: DataOptions) -> tuple[FileSplit, dict[str, str]]:
    """A streamed split without the files that do not decode (found by one decoding pass, cached by content)."""
    cache = Path(opts.cache_dir) / "checked" / f"{_fingerprint(split)}.json"
    try:
        failures = {str(k): str(v) for k, v in json.loads(cache.read_text())["failures"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        _, failures = decode_checked(split, opts.workers, keep_images=False)
        _store(cache, lambda tmp: tmp.write_text(json.dumps({"failures": failures})))
    return without(split, failures), failures


def _train_stats(train: Split, opts: DataOptions) -> tuple[list[float], list[float]]:
    """Mean/std of the training split; for streamed folders from up to 2,000 images, cached by content."""
    if isinstance(train, ArraySplit):
        return channel_stats(train.images)
    cache = Path(opts.cache_dir) / "stats" / f"{_fingerprint(train)}.json"
    try:
        saved = json.loads(cache.read_text())
        return saved["mean"], saved["std"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet, or a damaged entry: compute again
    rng = np.random.default_rng(0)
    sample = rng.choice(len(train), size=min(len(train), 2000), replace=False)
    mean, std = channel_stats(_decode_split(train.subset(torch.from_numpy(np.sort(sample))), opts)[0].images)
    _store(cache, lambda tmp: tmp.write_text(json.dumps({"mean": mean, "std": std})))
    return mean, std


def _store(cache: Path, write: Callable[[Path], object]) -> None:
    """Write a cache entry: write(a temporary path of its own), then rename it into place. A cache that cannot be
    written (no space, no permission, a read-only folder) is skipped with one warning: the entry is computed
    again next time."""
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, cache)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch's writer on a full disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if cache.parent.parent not in _UNWRITABLE_CACHES:
            _UNWRITABLE_CACHES.add(cache.parent.parent)
            cause = os_error_cause(exc) if isinstance(exc, OSError) else "the write failed"
            log.warning(f"cannot write the cache in {cache.parent.parent} ({cause}); going on without it "
                        f"(IMGREC_CACHE chooses another folder)")


_UNWRITABLE_CACHES: set[Path] = set()  # warned about once per process
