"""load_data: named sets on fake files (never downloading) and image folders/archives -> DataBundle."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from conftest import REPO, error_line, make_image_folder, write_idx
from imgrec.data import datasets, folders, imageio
from imgrec.data.datasets import (
    DEFAULT_FOLDER_SIZE,
    IDX_CLASSES,
    NAMED_DATASETS,
    DataOptions,
    load_data,
    missing_files,
    read_idx,
)
from imgrec.data.info import ArraySplit, DataBundle, DatasetInfo, FileSplit
from imgrec.data.transforms import channel_stats
from imgrec.errors import ImgrecError, UsageError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def options(tmp_path: Path, data_dir: Path | None = None, **kwargs: object) -> DataOptions:
    kwargs.setdefault("workers", 0)
    return DataOptions(str(data_dir or tmp_path), os.environ["IMGREC_CACHE"], **kwargs)  # type: ignore[arg-type]


def label_counts(labels: torch.Tensor) -> dict[int, int]:
    return dict(sorted(Counter(labels.tolist()).items()))


def split_labels(bundle: DataBundle) -> tuple[torch.Tensor, ...]:
    return tuple(s.labels for s in (bundle.train, bundle.val, bundle.test) if s is not None)


# --- named sets --------------------------------------------------------------------------------------------


def test_fashion_mnist_from_idx_files(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    bundle = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist))
    info = bundle.info
    assert isinstance(info, DatasetInfo)
    assert info.name == "fashion-mnist"
    assert info.classes[0] == "T-shirt/top" and info.classes[-1] == "Ankle boot" and info.num_classes == 10
    assert info.channels == 1 and info.image_size == (28, 28)
    assert info.mean == pytest.approx([0.2860]) and info.std == pytest.approx([0.3530])
    for split in (bundle.train, bundle.val, bundle.test):
        assert isinstance(split, ArraySplit)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 28, 28)
    # 60 train images, 6 per class; val_fraction 0.1 takes one of each class
    assert len(bundle.train) == 50 and len(bundle.val) == 10 and len(bundle.test) == 20
    assert label_counts(bundle.val.labels) == {c: 1 for c in range(10)}
    assert label_counts(bundle.train.labels) == {c: 5 for c in range(10)}
    assert bundle.manifest == []


def test_fashion_mnist_pixels_match_the_idx_file(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    raw = (fake_fashion_mnist / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    expected = torch.from_numpy(np.frombuffer(raw[16:], dtype=np.uint8).reshape(20, 1, 28, 28).copy())
    bundle = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist))
    assert torch.equal(bundle.test.images, expected)
    assert bundle.test.labels.tolist() == [i % 10 for i in range(20)]


def test_val_split_is_seeded_and_disjoint(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    a = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, val_fraction=0.5, split_seed=1))
    b = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, val_fraction=0.5, split_seed=1))
    c = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, val_fraction=0.5, split_seed=2))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    assert label_counts(a.val.labels) == {k: 3 for k in range(10)}
    # val and train are disjoint and together are the 60 training images
    everything = torch.cat([a.train.images, a.val.images]).flatten(1)
    assert len({tuple(row.tolist()) for row in everything}) == 60


def test_no_val_split(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    bundle = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, val_fraction=0.0))
    assert bundle.val is None and len(bundle.train) == 60
    with pytest.raises(KeyError):
        bundle.split("val")
    assert bundle.split("test") is bundle.test


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "data" / "MNIST" / "raw", n_train=40, n_test=10)
    bundle = load_data("mnist", options(tmp_path, tmp_path / "data", val_fraction=0.25))
    assert bundle.info.classes[0] == "0 - zero" and len(bundle.info.classes) == 10
    assert bundle.info.channels == 1 and bundle.info.image_size == (28, 28)
    assert bundle.info.mean == pytest.approx([0.1307]) and bundle.info.std == pytest.approx([0.3081])
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 10)


def test_idx_files_read_as_torchvision_reads_them(shared_data: Path) -> None:
    """The IDX reader (no torchvision import on the way to training) gives torchvision's tensors and class names."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = shared_data / "FashionMNIST" / "raw"
    for name, read, dims in (("t10k-images-idx3-ubyte", read_image_file, 3), ("t10k-labels-idx1-ubyte", read_label_file, 1)):
        assert torch.equal(read_idx(raw / name, dims).to(torch.int64), read(str(raw / name)).to(torch.int64))
    assert {"MNIST": tvd.MNIST.classes, "FashionMNIST": tvd.FashionMNIST.classes} == IDX_CLASSES


def test_user_statistics_override_known_ones(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    bundle = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, mean=[0.5], std=[0.25]))
    assert bundle.info.mean == [0.5] and bundle.info.std == [0.25]


@pytest.mark.parametrize("name, folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_missing_files_error_names_the_file_and_download(tmp_path: Path, name: str, folder: str) -> None:
    assert missing_files(name, str(tmp_path)) == list(NAMED_DATASETS[name].files)
    with pytest.raises(ImgrecError) as info:
        load_data(name, options(tmp_path))
    message = str(info.value)
    assert f"{folder}/raw/train-images-idx3-ubyte" in message
    assert "--download" in message and str(tmp_path) in message
    assert not isinstance(info.value, UsageError)


def test_partly_missing_files_name_the_missing_one(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    (fake_fashion_mnist / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ImgrecError, match="t10k-labels-idx1-ubyte") as info:
        load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist))
    assert "train-images" not in str(info.value)


def test_corrupt_named_files_are_an_imgrec_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data")  # present, but torchvision's checksums fail
    with pytest.raises(ImgrecError) as info:
        load_data("cifar10", options(tmp_path, tmp_path / "data"))
    assert str(info.value).startswith(f"{tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_1'} is damaged")


@pytest.mark.parametrize("damage, fragment", [
    ("label-magic", "train-labels-idx1-ubyte is not a readable IDX label file (its header does not match"),
    ("image-dims", "t10k-images-idx3-ubyte is not a readable IDX image file (its header does not match"),
    ("image-short", "train-images-idx3-ubyte is not a readable IDX image file (its header promises 60 x 28 x 28 bytes"),
    ("label-count", "holds 20 images but"),
])
def test_damaged_idx_files_are_one_line_naming_the_file(fake_fashion_mnist: Path, tmp_path: Path, damage: str,
                                                        fragment: str) -> None:
    """A damaged header or a cut file: the error names the file and what does not match."""
    raw = fake_fashion_mnist / "FashionMNIST" / "raw"
    name = {"label-magic": "train-labels-idx1-ubyte", "image-dims": "t10k-images-idx3-ubyte",
            "image-short": "train-images-idx3-ubyte", "label-count": "t10k-labels-idx1-ubyte"}[damage]
    data = bytearray((raw / name).read_bytes())
    if damage == "label-magic":
        data[2:4] = b"\x00\x00"  # type 0: no such IDX element type
    elif damage == "image-dims":
        data[3] = 9  # nine dimensions
    elif damage == "image-short":
        data = data[: len(data) - 100]
    else:
        data = data[:8 + 19]
        data[4:8] = (19).to_bytes(4, "big")
    (raw / name).write_bytes(bytes(data))
    with pytest.raises(ImgrecError) as info:
        load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist))
    message = str(info.value)
    assert fragment in message and "\n" not in message and str(raw) in message


def test_real_fashion_mnist_with_a_damaged_label_header(shared_data: Path, tmp_path: Path) -> None:
    """A copy of the real files (links to them, and one copied file with a broken header), through the command."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (shared_data / "FashionMNIST" / "raw").iterdir():
        (raw / source.name).symlink_to(source)
    label_file = raw / "train-labels-idx1-ubyte"
    data = bytearray(label_file.read_bytes())
    data[0:4] = b"\xff\xff\xff\xff"
    label_file.unlink()
    label_file.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "imgrec", "train", "--data", "fashion-mnist", "--data-dir",
                           str(tmp_path / "data"), "--project", str(tmp_path / "runs")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{label_file} is not a readable IDX label file" in error_line(proc.stderr)


def test_unknown_name_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no-such-set") as info:
        load_data("no-such-set", options(tmp_path))
    assert "fashion-mnist" in str(info.value)  # lists the names it knows
    assert info.value.exit_code == 2


def test_digits(tmp_path: Path) -> None:
    a = load_data("digits", options(tmp_path))
    b = load_data("digits", options(tmp_path, split_seed=123))  # the split of digits is fixed, not the run's
    assert a.info.classes == [str(i) for i in range(10)]
    assert a.info.channels == 1 and a.info.image_size == (8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    for x, y in zip(split_labels(a), split_labels(b)):
        assert torch.equal(x, y)
    assert torch.equal(a.test.images, b.test.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.max() == 255
    # stratified: each class's share of the test split is close to its share of the whole set
    whole = Counter(torch.cat(split_labels(a)).tolist())
    for cls, n in Counter(a.test.labels.tolist()).items():
        assert abs(n - 0.15 * whole[cls]) <= 1
    assert set(a.val.labels.tolist()) == set(range(10))
    # statistics are computed from the training split
    mean, std = channel_stats(a.train.images)
    assert a.info.mean == pytest.approx(mean) and a.info.std == pytest.approx(std)
    assert 0.2 < a.info.mean[0] < 0.4


def write_cifar10(root: Path, per_batch: int = 10) -> Path:
    """Fake cifar-10-batches-py: pickles in the CIFAR format (rows of 1024 red, 1024 green, 1024 blue)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(offset: int) -> dict:
        images = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = 230  # red
        images[:, 1] = 20
        images[:, 2] = 90
        images[:, :, :, :4] = 0  # a black band on the left: checks rows vs columns
        images[:, 1, 31, 31] = np.arange(per_batch) + offset  # a per-image id in the last green pixel
        return {"batch_label": "fake", "labels": [(i + offset) % 10 for i in range(per_batch)],
                "data": images.reshape(per_batch, 3072), "filenames": [f"{i}.png" for i in range(per_batch)]}

    for k in range(1, 6):
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch(per_batch * (k - 1)), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(200), protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, protocol=2)
    )
    return root


def test_cifar10_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "data")
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)  # the fake files fail the md5s
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # batches.meta's md5
    bundle = load_data("cifar10", options(tmp_path, tmp_path / "data", val_fraction=0.2))
    info = bundle.info
    assert info.classes == CIFAR_CLASSES and info.channels == 3 and info.image_size == (32, 32)
    assert info.mean == pytest.approx([0.4914, 0.4822, 0.4465]) and info.std == pytest.approx([0.2470, 0.2435, 0.2616])
    assert len(bundle.train) + len(bundle.val) == 50 and len(bundle.test) == 10
    assert label_counts(bundle.val.labels) == {c: 1 for c in range(10)}
    images = bundle.test.images
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert images[:, :, 5:25, 5:25].amin(dim=(2, 3)).tolist() == [[230, 20, 90]] * 10  # channel 0 is red
    assert images[:, :, 5:25, 5:25].amax(dim=(2, 3)).tolist() == [[230, 20, 90]] * 10
    assert images[:, :, :, :4].max() == 0 and images[:, 0, :, 4:].min() == 230  # the band is on the left
    assert images[:, 1, 31, 31].tolist() == list(range(200, 210))  # the test batch, in file order
    assert bundle.test.labels.tolist() == [i % 10 for i in range(10)]
    train = torch.cat([bundle.train.images, bundle.val.images])
    ids = train[:, 1, 31, 31].tolist()
    assert sorted(ids) == list(range(50))  # all five batches, each image once
    labels = torch.cat([bundle.train.labels, bundle.val.labels]).tolist()
    assert all(y == (i + 10 * (i // 10 + 1)) % 10 for i, y in zip(ids, labels))  # labels travel with images


# --- image folders -----------------------------------------------------------------------------------------


def test_image_folder_splits_and_manifest(image_folder: Path, tmp_path: Path) -> None:
    bundle = load_data(str(image_folder), options(tmp_path))
    info = bundle.info
    assert info.name == str(image_folder)
    assert info.classes == ["cat", "dog", "fox"] and info.channels == 3 and info.image_size == (16, 16)
    assert all(isinstance(s, ArraySplit) for s in (bundle.train, bundle.val, bundle.test))  # small: in memory
    # 12 per class: test 20% -> 2, val 10% of the rest -> 1, train 9
    assert label_counts(bundle.test.labels) == {0: 2, 1: 2, 2: 2}
    assert label_counts(bundle.val.labels) == {0: 1, 1: 1, 2: 1}
    assert label_counts(bundle.train.labels) == {0: 9, 1: 9, 2: 9}
    # the manifest lists every file exactly once, with its class and split
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    assert sorted(row[0] for row in bundle.manifest) == files
    for file, cls, split, _ in bundle.manifest:
        assert file.split("/")[0] == cls and split in ("train", "val", "test")
    assert Counter(split for _, _, split, _ in bundle.manifest) == {"train": 27, "val": 3, "test": 6}
    assert {skipped for *_, skipped in bundle.manifest} == {""} and bundle.skipped == []
    assert any("split" in note and "seed 0" in note and "20%" in note for note in bundle.notes)


def test_manifest_order_matches_the_splits(image_folder: Path, tmp_path: Path) -> None:
    bundle = load_data(str(image_folder), options(tmp_path, loader="stream"))
    for name in ("train", "val", "test"):
        split = bundle.split(name)
        rows = [row for row in bundle.manifest if row[2] == name]
        assert [os.path.relpath(p, image_folder) for p in split.paths] == [row[0] for row in rows]
        assert [bundle.info.classes[y] for y in split.labels.tolist()] == [row[1] for row in rows]


def test_folder_split_depends_on_the_seed(image_folder: Path, tmp_path: Path) -> None:
    def test_files(seed: int) -> list[str]:
        bundle = load_data(str(image_folder), options(tmp_path, split_seed=seed, loader="stream"))
        return [row[0] for row in bundle.manifest if row[2] == "test"]

    assert test_files(0) == test_files(0)
    assert test_files(0) != test_files(1)


def test_folder_with_train_and_test(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=5, splits=("train", "test"))
    bundle = load_data(str(root), options(tmp_path, val_fraction=0.2))
    assert len(bundle.test) == 15 and len(bundle.val) == 3 and len(bundle.train) == 12
    assert {row[0].split("/")[0] for row in bundle.manifest if row[2] == "test"} == {"test"}
    assert not any("held out" in note for note in bundle.notes)


def test_folder_with_train_and_val_only_tests_on_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=3, splits=("train", "val"))
    bundle = load_data(str(root), options(tmp_path))
    assert torch.equal(bundle.val.images, bundle.test.images) and len(bundle.train) == 9
    assert any("no test split" in note for note in bundle.notes)


def test_archive_loads_like_the_folder(image_folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(image_folder, arcname="photos")
    from_folder = load_data(str(image_folder), options(tmp_path))
    from_archive = load_data(str(archive), options(tmp_path))
    assert from_archive.info.name == str(archive)
    assert from_archive.info.classes == from_folder.info.classes
    assert from_archive.info.mean == from_folder.info.mean and from_archive.info.std == from_folder.info.std
    assert from_archive.manifest == from_folder.manifest
    for name in ("train", "val", "test"):
        assert torch.equal(from_archive.split(name).images, from_folder.split(name).images)
        assert torch.equal(from_archive.split(name).labels, from_folder.split(name).labels)


def test_path_that_is_not_a_folder_or_archive(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="notes.txt"):
        load_data(str(tmp_path / "notes.txt"), options(tmp_path))


def test_train_samples_subset_is_stratified(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds", classes=("a", "b", "c", "d"), per_class=10, size=8)
    full = load_data(str(root), options(tmp_path, test_fraction=0.2, val_fraction=0.0))
    bundle = load_data(str(root), options(tmp_path, test_fraction=0.2, val_fraction=0.0, train_samples=16))
    assert len(full.train) == 32 and len(bundle.train) == 16
    assert label_counts(bundle.train.labels) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert torch.equal(bundle.test.images, full.test.images)  # only training shrinks
    assert any("subset of 16" in note for note in bundle.notes)
    # each kept image is one of the full training images
    full_rows = {tuple(x.flatten().tolist()) for x in full.train.images}
    assert all(tuple(x.flatten().tolist()) in full_rows for x in bundle.train.images)
    again = load_data(str(root), options(tmp_path, test_fraction=0.2, val_fraction=0.0, train_samples=16))
    assert torch.equal(again.train.images, bundle.train.images)


def test_train_samples_larger_than_train_changes_nothing(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    bundle = load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, train_samples=1000))
    assert len(bundle.train) == 50 and bundle.notes == []


def test_grey_images_give_one_channel(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "grey", per_class=4, channels=1)
    bundle = load_data(str(root), options(tmp_path))
    assert bundle.info.channels == 1 and len(bundle.info.mean) == 1
    assert bundle.train.images.shape[1:] == (1, 16, 16)
    forced = load_data(str(root), options(tmp_path, channels=3))
    assert forced.info.channels == 3 and forced.train.images.shape[1] == 3
    assert torch.equal(forced.train.images[:, 0], bundle.train.images[:, 0])


def test_mixed_sizes_are_resized_to_the_default_with_a_note(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate([(20, 30), (40, 40), (64, 48), (30, 20), (50, 50)]):
            Image.new("RGB", (w, h), (100 * c, 50, 20 * i)).save(root / name / f"{i}.png")
    bundle = load_data(str(root), options(tmp_path))
    assert bundle.info.image_size == (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE) == (128, 128)
    assert bundle.train.images.shape[2:] == (128, 128)
    assert any("differ in size" in note and "128x128" in note and "--image-size" in note for note in bundle.notes)


def test_large_uniform_images_are_resized_with_an_accurate_note(tmp_path: Path) -> None:
    root = tmp_path / "large"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (300, 260), 100 * c + i).save(root / name / f"{i}.png")
    bundle = load_data(str(root), options(tmp_path, loader="stream"))
    assert bundle.info.image_size == (128, 128)
    assert any("260x300" in note and "128x128" in note for note in bundle.notes)
    assert not any("differ" in note for note in bundle.notes)


def test_most_common_size_wins_when_nearly_all_agree(image_folder: Path, tmp_path: Path) -> None:
    Image.new("RGB", (40, 20)).save(image_folder / "cat" / "odd.png")  # 1 of 37 differs
    bundle = load_data(str(image_folder), options(tmp_path))
    assert bundle.info.image_size == (16, 16)
    assert not any("size" in note for note in bundle.notes)


@pytest.mark.parametrize("image_size, expected", [(24, (24, 24)), ((12, 20), (12, 20))])
def test_image_size_is_honoured(image_folder: Path, tmp_path: Path, image_size: object, expected: tuple) -> None:
    bundle = load_data(str(image_folder), options(tmp_path, image_size=image_size))
    assert bundle.info.image_size == expected
    assert bundle.train.images.shape[2:] == expected and bundle.test.images.shape[2:] == expected
    stream = load_data(str(image_folder), options(tmp_path, image_size=image_size, loader="stream"))
    assert stream.train.image_size == expected


def test_stream_and_memory_hold_the_same_pixels(image_folder: Path, tmp_path: Path) -> None:
    memory = load_data(str(image_folder), options(tmp_path, loader="memory"))
    stream = load_data(str(image_folder), options(tmp_path, loader="stream"))
    assert memory.manifest == stream.manifest
    assert memory.info == stream.info  # same classes, shape and statistics
    for name in ("train", "val", "test"):
        array, files = memory.split(name), stream.split(name)
        assert isinstance(array, ArraySplit) and isinstance(files, FileSplit)
        assert files.channels == 3 and files.image_size == (16, 16)
        assert torch.equal(array.labels, files.labels)
        decoded = torch.stack([imageio.read_image(p, files.channels, files.image_size) for p in files.paths])
        assert torch.equal(array.images, decoded)
        # ... which are the files' own pixels
        first = np.array(Image.open(files.paths[0]).convert("RGB"))
        assert torch.equal(array.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_mean_and_std_come_from_the_train_split(image_folder: Path, tmp_path: Path) -> None:
    bundle = load_data(str(image_folder), options(tmp_path))
    mean, std = channel_stats(bundle.train.images)
    assert bundle.info.mean == pytest.approx(mean) and bundle.info.std == pytest.approx(std)
    everything = channel_stats(torch.cat([bundle.train.images, bundle.val.images, bundle.test.images]))
    assert bundle.info.mean != pytest.approx(everything[0], abs=1e-7)  # not from all the images
    stream = load_data(str(image_folder), options(tmp_path, loader="stream"))
    assert stream.info.mean == pytest.approx(mean) and stream.info.std == pytest.approx(std)


class CountingDecoder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self._real = imageio.load_image
        monkeypatch.setattr(imageio, "load_image", self)

    def __call__(self, path: str | Path, channels: int) -> Image.Image:
        self.calls.append(str(path))
        return self._real(path, channels)


def test_decoded_images_are_cached(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = CountingDecoder(monkeypatch)
    opts = options(tmp_path, split_seed=77, loader="memory")  # a split no other test decodes
    first = load_data(str(image_folder), opts)
    assert sorted(decoder.calls) == sorted(str(p) for p in image_folder.rglob("*.png"))  # each file once
    decoder.calls.clear()
    second = load_data(str(image_folder), opts)
    assert decoder.calls == []
    for name in ("train", "val", "test"):
        assert torch.equal(first.split(name).images, second.split(name).images)
    assert first.info == second.info
    # a changed file is decoded again
    path = image_folder / "fox" / "000.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = load_data(str(image_folder), opts)
    assert str(path) in decoder.calls
    ((split, row),) = [(s, rows.index("fox/000.png")) for s in ("train", "val", "test")
                       if "fox/000.png" in (rows := [r[0] for r in third.manifest if r[2] == s])]
    assert third.split(split).images[row, :, 0, 0].tolist() == [1, 2, 3]


def test_damaged_cache_entry_is_rebuilt(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = options(tmp_path, split_seed=78, loader="memory", val_fraction=0.0)
    first = load_data(str(image_folder), opts)
    cache = Path(opts.cache_dir) / "decoded"
    for entry in cache.glob("*.pt"):
        entry.write_bytes(b"garbage")
    second = load_data(str(image_folder), opts)
    assert torch.equal(first.train.images, second.train.images)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_corrupt_image_in_a_folder_is_skipped_and_named(image_folder: Path, tmp_path: Path, workers: int,
                                                         loader: str) -> None:
    clean = load_data(str(image_folder), options(tmp_path, workers=workers, loader=loader))
    assert clean.skipped == []
    bad = image_folder / "dog" / "005.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    bundle = load_data(str(image_folder), options(tmp_path, workers=workers, loader=loader))
    [(path, split, reason)] = bundle.skipped
    assert path == str(bad) and "truncated" in reason
    # left out of its split, which otherwise stays as drawn; the manifest keeps it, marked
    assert len(bundle.split(split)) == len(clean.split(split)) - 1
    [row] = [r for r in bundle.manifest if r[0] == "dog/005.png"]
    assert row[2] == split and row[3] == reason
    if loader == "stream":
        assert str(bad) not in bundle.split(split).paths


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_makes_a_corrupt_image_an_error_naming_it(image_folder: Path, tmp_path: Path, workers: int) -> None:
    bad = image_folder / "dog" / "005.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImgrecError) as info:
        load_data(str(image_folder), options(tmp_path, workers=workers, loader="memory", strict=True))
    message = str(info.value)
    assert type(info.value) is ImgrecError
    assert str(bad) in message and "--strict" in message and "\n" not in message and "Traceback" not in message


def test_skipped_files_are_cached_with_the_decoded_images(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "fox" / "001.png").write_bytes(b"not a png")
    first = load_data(str(image_folder), options(tmp_path, workers=0))
    second = load_data(str(image_folder), options(tmp_path, workers=0))
    assert first.skipped == second.skipped and len(first.skipped) == 1
    assert torch.equal(first.train.images, second.train.images)
    stream = [load_data(str(image_folder), options(tmp_path, workers=0, loader="stream")) for _ in range(2)]
    assert stream[0].skipped == stream[1].skipped == first.skipped


def test_unreadable_class_folder_layout_is_an_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "one", classes=("only",), per_class=2)
    with pytest.raises(ImgrecError, match="only one class"):
        load_data(str(root), options(tmp_path))


def test_decode_workers_stop_after_an_error(image_folder: Path, tmp_path: Path) -> None:
    """A decode error must not leave the worker pool to a later garbage collection (which then stalls)."""
    bad = image_folder / "fox" / "001.png"
    bad.write_bytes(b"not a png")
    before = {p.pid for p in multiprocessing.active_children()}
    gc.disable()
    try:
        try:
            load_data(str(image_folder), options(tmp_path, workers=2, loader="memory", strict=True))
        except ImgrecError as exc:
            error = exc
        assert str(bad) in str(error)
        del error
        assert not [p for p in multiprocessing.active_children() if p.pid not in before]
        assert load_data(str(image_folder), options(tmp_path / "b", workers=2, loader="memory")).skipped
        assert not [p for p in multiprocessing.active_children() if p.pid not in before]
    finally:
        gc.enable()


def test_label_out_of_range_is_named(tmp_path: Path) -> None:
    # labels 0..12 in files of a 10-class data set
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", num_classes=13)
    with pytest.raises(ImgrecError, match=r"label 12 in the train split of fashion-mnist is out of range.*10 classes"):
        load_data("fashion-mnist", options(tmp_path, tmp_path / "data"))


def test_wrong_number_of_mean_values_is_a_usage_error(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="3 values but the images have 1 channels"):
        load_data("fashion-mnist", options(tmp_path, fake_fashion_mnist, mean=[0.5] * 3, std=[0.5] * 3))


def test_too_small_folder_drops_val_and_refuses_an_empty_test_split(tmp_path: Path) -> None:
    tiny = make_image_folder(tmp_path / "tiny", per_class=3)
    bundle = load_data(str(tiny), options(tmp_path, test_fraction=0.34, val_fraction=0.1))
    assert bundle.val is None and any("validation" in n for n in bundle.notes)
    lonely = make_image_folder(tmp_path / "lonely", per_class=1)
    with pytest.raises(ImgrecError, match="no images left for the test split"):
        load_data(str(lonely), options(tmp_path))


# --- archives: read into memory, or extracted when too large ------------------------------------------------


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("workers", [0, 2])
def test_archive_is_decoded_from_memory_not_extracted(image_folder: Path, tmp_path: Path, workers: int) -> None:
    archive = _tar_gz(image_folder, tmp_path / "photos.tar.gz")
    cache = tmp_path / "cache"
    opts = DataOptions(str(tmp_path), str(cache), workers=workers)
    bundle = load_data(str(archive), opts)
    assert not (cache / "extracted").exists()  # not one file written for the archive's images
    assert sorted(p.parent.name for p in cache.rglob("*.pt")) == ["decoded"] * 3  # the decoded splits are cached
    folder = load_data(str(image_folder), options(tmp_path))
    for name in ("train", "val", "test"):
        assert torch.equal(bundle.split(name).images, folder.split(name).images)
    # The second load takes the decoded images from the cache.
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")
    real = datasets.decode_checked
    datasets.decode_checked = no_decoding  # type: ignore[assignment]
    try:
        again = load_data(str(archive), opts)
    finally:
        datasets.decode_checked = real
    assert torch.equal(again.train.images, bundle.train.images) and again.manifest == bundle.manifest


def test_changed_archive_content_is_decoded_again(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_data(str(_tar_gz(image_folder, tmp_path / "photos.tar.gz")), DataOptions(str(tmp_path), str(cache)))
    flipped = image_folder / "cat" / "000.png"
    Image.open(flipped).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    second = load_data(str(_tar_gz(image_folder, tmp_path / "photos.tar.gz")), DataOptions(str(tmp_path), str(cache)))
    assert first.manifest == second.manifest
    assert not all(torch.equal(first.split(s).images, second.split(s).images) for s in ("train", "val", "test"))


def test_archive_too_large_to_hold_is_extracted(image_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar_gz(image_folder, tmp_path / "photos.tar.gz")
    in_memory = load_data(str(archive), DataOptions(str(tmp_path), str(tmp_path / "a"), workers=0))
    monkeypatch.setattr(folders, "ARCHIVE_IN_MEMORY_BYTES", 100)  # its files: more bytes than that
    extracted = load_data(str(archive), DataOptions(str(tmp_path), str(tmp_path / "b"), workers=0))
    assert (tmp_path / "b" / "extracted").is_dir()
    assert extracted.manifest == in_memory.manifest
    assert torch.equal(extracted.train.images, in_memory.train.images)


@pytest.mark.parametrize("loader", ["stream", "auto"])
def test_streamed_archive_is_extracted(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       loader: str) -> None:
    """--loader stream, or images too many to hold once decoded: streamed from the extracted files."""
    archive = _tar_gz(image_folder, tmp_path / "photos.tar.gz")
    if loader == "auto":
        monkeypatch.setattr(datasets, "MEMORY_LIMIT_BYTES", 1000)
    bundle = load_data(str(archive), DataOptions(str(tmp_path), str(tmp_path / "cache"), workers=0, loader=loader))
    assert isinstance(bundle.train, FileSplit) and bundle.train.contents is None
    extracted = tmp_path / "cache" / "extracted"
    assert all(Path(p).is_file() and extracted in Path(p).parents for p in bundle.train.paths)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_in_an_archive_is_skipped_and_named(image_folder: Path, tmp_path: Path, workers: int) -> None:
    bad = image_folder / "dog" / "005.png"
    bad.write_bytes(bad.read_bytes()[:60])
    (image_folder / "fox" / "002.png").write_bytes(b"")
    archive = _tar_gz(image_folder, tmp_path / "photos.tar.gz")
    bundle = load_data(str(archive), DataOptions(str(tmp_path), str(tmp_path / "cache"), workers=workers))
    skipped = {path: reason for path, _, reason in bundle.skipped}
    inside = str(archive.resolve())
    assert set(skipped) == {f"{inside}/photos/dog/005.png", f"{inside}/photos/fox/002.png"}
    assert "truncated" in skipped[f"{inside}/photos/dog/005.png"] and skipped[f"{inside}/photos/fox/002.png"] == imageio.EMPTY_FILE
    assert {row[0]: row[3] for row in bundle.manifest if row[3]} == {"dog/005.png": skipped[f"{inside}/photos/dog/005.png"],
                                                                    "fox/002.png": imageio.EMPTY_FILE}
    assert sum(len(bundle.split(s)) for s in ("train", "val", "test")) == 34
