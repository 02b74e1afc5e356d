"""Loaders: in-memory and streamed batches are identical for a seed; order and augmentation follow (seed, epoch)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_no_worker_finalises_it, make_image_folder
from imgrec.data import imageio, loaders, verify
from imgrec.data.imageio import read_image
from imgrec.data.info import ArraySplit, FileSplit
from imgrec.data.loaders import (
    ReadingNotes,
    StreamLoader,
    TensorLoader,
    epoch_generator,
    make_loader,
    worker_error_message,
)
from imgrec.data.transforms import BatchMix, BatchTransform
from imgrec.data.verify import decode_checked
from imgrec.errors import ImgrecError

SIZE = (16, 16)
MEAN, STD = [0.4, 0.45, 0.5], [0.25, 0.25, 0.25]
PLAIN = BatchTransform(MEAN, STD)
AUGMENTED = BatchTransform(MEAN, STD, ["crop", "flip", "translate", "erase"])
RANDAUGMENT = BatchTransform(MEAN, STD, ["randaugment", "flip"])
TRIVIALAUGMENT = BatchTransform(MEAN, STD, ["trivialaugment"])
ALTERNATE = BatchTransform(MEAN, STD, ["translate", "flip"], alternate_flip=True)
MIX = BatchMix(21, mixup=0.4, cutmix=1.0)  # 21 classes: label i marks the i-th image


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArraySplit, FileSplit]:
    """The same 21 images as files and in memory; label i marks the i-th image, so orders are visible."""
    root = make_image_folder(tmp_path_factory.mktemp("loaders") / "photos", per_class=7)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    labels = torch.arange(len(paths))
    images = torch.stack([read_image(p, 3, SIZE) for p in paths])
    return ArraySplit(images, labels), FileSplit(paths, labels.clone(), 3, SIZE)


def run_epoch(loader: TensorLoader | StreamLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def order(loader: TensorLoader | StreamLoader, epoch: int = 0) -> list[int]:
    return torch.cat([y for _, y in run_epoch(loader, epoch)]).tolist()


def assert_same_batches(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


@contextmanager
def new_children() -> Iterator[set[int]]:
    """The pids of child processes started inside the block."""
    before = {p.pid for p in multiprocessing.active_children()}
    started: set[int] = set()
    yield started
    started.update(p.pid for p in multiprocessing.active_children() if p.pid not in before)


def alive(pids: set[int]) -> set[int]:
    return pids & {p.pid for p in multiprocessing.active_children()}


# --- same batches from memory and from files ---------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("transform", [PLAIN, AUGMENTED, RANDAUGMENT, TRIVIALAUGMENT, ALTERNATE],
                         ids=["plain", "augmented", "randaugment", "trivialaugment", "alternate-flip"])
def test_tensor_and_stream_loaders_give_identical_batches(splits: tuple[ArraySplit, FileSplit], workers: int,
                                                          transform: BatchTransform) -> None:
    arrays, files = splits
    augment = transform is not PLAIN
    memory = TensorLoader(arrays, 4, transform, shuffle=True, augment=augment, seed=7)
    stream = StreamLoader(files, 4, transform, shuffle=True, augment=augment, seed=7, workers=workers)
    for epoch in (0, 1, 0):  # persistent workers serve several epochs; going back repeats epoch 0
        a, b = run_epoch(memory, epoch), run_epoch(stream, epoch)
        assert_same_batches(a, b)
        assert [len(y) for _, y in a] == [4, 4, 4, 4, 4, 1]
        x = a[0][0]
        assert x.dtype == torch.float32 and x.shape == (4, 3, *SIZE)
    if augment:  # the augmentation really happened
        plain = TensorLoader(arrays, 4, PLAIN, shuffle=True, augment=False, seed=7)
        assert not torch.equal(run_epoch(plain, 0)[0][0], run_epoch(memory, 0)[0][0])
        other_seed = TensorLoader(arrays, 4, transform, shuffle=True, augment=True, seed=8)
        assert not torch.equal(run_epoch(other_seed, 0)[0][0], run_epoch(memory, 0)[0][0])


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_mixed_training_batches_are_the_same_from_memory_and_files_and_evaluation_is_not_mixed(
        splits: tuple[ArraySplit, FileSplit], kind: str) -> None:
    arrays, files = splits
    train = [make_loader(split, 4, AUGMENTED, train=True, seed=5, workers=0, mix=MIX) for split in (arrays, files)]
    a, b = run_epoch(train[0], 1), run_epoch(train[1], 1)
    assert_same_batches(a, b)
    for x, targets in a:
        assert targets.shape == (len(x), 21) and torch.allclose(targets.sum(1), torch.ones(len(x)))
    assert any((targets.max(1).values < 1).any() for _, targets in a)  # labels really mixed
    evaluation = make_loader(arrays if kind == "memory" else files, 4, AUGMENTED, train=False, mix=MIX, workers=0)
    assert order(evaluation) == list(range(21))  # hard labels, in order


def test_augmented_batches_are_the_plain_ones_transformed_with_the_epoch_generator(
        splits: tuple[ArraySplit, FileSplit]) -> None:
    arrays, _ = splits
    loader = TensorLoader(arrays, 8, AUGMENTED, shuffle=True, augment=True, seed=3)
    batches = run_epoch(loader, 2)
    generator = epoch_generator(3, 2)
    permutation = torch.randperm(len(arrays), generator=generator)
    for (x, y), idx in zip(batches, permutation.split(8)):
        assert torch.equal(y, arrays.labels[idx])
        assert torch.equal(x, AUGMENTED(arrays.images[idx], generator))


def mirrored(loader: TensorLoader | StreamLoader, split: ArraySplit, epoch: int) -> dict[int, bool]:
    """Which images (by label = index) an epoch of an alternate-flip loader without translation mirrored."""
    seen = {}
    for x, y in run_epoch(loader, epoch):
        for image, label in zip(x, y.tolist()):
            plain = PLAIN(split.images[label:label + 1])[0]
            assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
            seen[label] = not torch.equal(image, plain)
    return seen


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_alternate_flip_mirrors_each_image_every_other_epoch(splits: tuple[ArraySplit, FileSplit], kind: str) -> None:
    """Epoch 1 mirrors about half the images (a coin per image and seed), each next epoch the other ones."""
    arrays, files = splits
    assert not any(torch.equal(img, img.flip(-1)) for img in arrays.images)  # a mirror image is told apart
    flip_only = BatchTransform(MEAN, STD, ["flip"], alternate_flip=True)
    split = arrays if kind == "memory" else files
    loader = make_loader(split, 3, flip_only, train=True, seed=11, workers=0)
    first, second, third = (mirrored(loader, arrays, epoch) for epoch in (1, 2, 3))
    assert len(first) == 21 and 5 <= sum(first.values()) <= 16
    assert all(second[i] != first[i] for i in first) and third == first
    other_seed = mirrored(make_loader(split, 3, flip_only, train=True, seed=12, workers=0), arrays, 1)
    assert other_seed != first


# --- order ---------------------------------------------------------------------------------------------------


def test_order_is_a_permutation_that_changes_with_epoch_and_seed(splits: tuple[ArraySplit, FileSplit]) -> None:
    arrays, _ = splits
    loader = TensorLoader(arrays, 5, PLAIN, shuffle=True, seed=0)
    epoch0, epoch1, epoch0_again = order(loader, 0), order(loader, 1), order(loader, 0)
    assert sorted(epoch0) == sorted(epoch1) == list(range(21))
    assert epoch0 != list(range(21))
    assert epoch0 != epoch1
    assert epoch0 == epoch0_again
    other_seed = TensorLoader(arrays, 5, PLAIN, shuffle=True, seed=1)
    assert order(other_seed, 0) != epoch0
    assert order(TensorLoader(arrays, 5, PLAIN, shuffle=True, seed=0), 0) == epoch0  # a fresh loader agrees


def test_stream_order_changes_with_epoch_and_seed(splits: tuple[ArraySplit, FileSplit]) -> None:
    _, files = splits
    loader = StreamLoader(files, 8, PLAIN, shuffle=True, seed=0, workers=0)
    epoch0, epoch1 = order(loader, 0), order(loader, 1)
    assert sorted(epoch0) == list(range(21)) and epoch0 != epoch1
    assert order(StreamLoader(files, 8, PLAIN, shuffle=True, seed=1, workers=0), 0) != epoch0


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_eval_loader_is_in_order_and_plain(splits: tuple[ArraySplit, FileSplit], kind: str) -> None:
    arrays, files = splits
    split = arrays if kind == "memory" else files
    loader = make_loader(split, 8, AUGMENTED, train=False, seed=5, workers=0)
    assert isinstance(loader, TensorLoader if kind == "memory" else StreamLoader)
    for epoch in (0, 3):
        batches = run_epoch(loader, epoch)
        assert torch.cat([y for _, y in batches]).tolist() == list(range(21))
        images = torch.cat([x for x, _ in batches])
        assert torch.equal(images, PLAIN(arrays.images))  # no augmentation, although the transform has some


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_train_loader_is_shuffled_and_augmented(splits: tuple[ArraySplit, FileSplit], kind: str) -> None:
    arrays, files = splits
    loader = make_loader(arrays if kind == "memory" else files, 21, AUGMENTED, train=True, seed=5, workers=0)
    ((x, y),) = run_epoch(loader, 0)
    assert y.tolist() != list(range(21)) and sorted(y.tolist()) == list(range(21))
    assert not torch.equal(x, PLAIN(arrays.images[y]))


# --- sizes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, drop_last, sizes", [
    (4, False, [4, 4, 4, 4, 4, 1]),
    (4, True, [4, 4, 4, 4, 4]),
    (7, True, [7, 7, 7]),
    (21, False, [21]),
    (32, False, [21]),
    (32, True, [21]),  # fewer samples than a batch: the one short batch is kept
])
def test_len_and_num_samples(splits: tuple[ArraySplit, FileSplit], batch_size: int, drop_last: bool,
                             sizes: list[int]) -> None:
    arrays, files = splits
    for loader in (TensorLoader(arrays, batch_size, PLAIN, shuffle=True, drop_last=drop_last),
                   StreamLoader(files, batch_size, PLAIN, shuffle=True, drop_last=drop_last, workers=0)):
        assert loader.num_samples == 21
        assert len(loader) == len(sizes)
        assert [len(y) for _, y in loader] == sizes


# --- errors and worker processes -----------------------------------------------------------------------------


@pytest.fixture
def folder_with_bad_file(tmp_path: Path) -> tuple[FileSplit, Path]:
    root = make_image_folder(tmp_path / "photos", per_class=4)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    bad = root / "dog" / "002.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return FileSplit(paths, torch.zeros(len(paths), dtype=torch.int64), 3, SIZE), bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_file_is_a_one_line_error_naming_it(folder_with_bad_file: tuple[FileSplit, Path], workers: int) -> None:
    split, bad = folder_with_bad_file
    loader = StreamLoader(split, 4, PLAIN, shuffle=True, workers=workers)
    with pytest.raises(ImgrecError) as info:
        list(loader)
    message = str(info.value)
    assert type(info.value) is ImgrecError
    assert str(bad) in message and "cannot decode" in message
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker" not in message
    # The error (through its context) and pytest's ExceptionInfo hold this frame in a reference cycle: let the
    # workers go now, not at a later garbage collection (where torch waits 5 s per worker on closed queues).
    del info, loader


def test_dropped_stream_loader_stops_its_workers(splits: tuple[ArraySplit, FileSplit]) -> None:
    _, files = splits
    gc.disable()  # the workers must stop when the last reference goes, not whenever the collector runs
    try:
        with new_children() as workers:
            loader = StreamLoader(files, 8, PLAIN, shuffle=True, workers=2)
            list(loader)
        assert len(alive(workers)) == 2  # persistent between epochs
        list(loader)
        assert len(alive(workers)) == 2
        del loader
        assert alive(workers) == set()
    finally:
        gc.enable()


def test_workers_stop_after_a_decode_error(folder_with_bad_file: tuple[FileSplit, Path]) -> None:
    split, _ = folder_with_bad_file
    gc.disable()
    try:
        with new_children() as workers:
            loader = StreamLoader(split, 4, PLAIN, workers=2)
            try:
                list(loader)
            except ImgrecError as exc:
                error = exc
        assert workers
        del loader, error
        assert alive(workers) == set()
    finally:
        gc.enable()


@pytest.fixture
def folder_with_odd_file(tmp_path: Path) -> tuple[FileSplit, Path]:
    """Twelve 16x16 images and one 500x444 photo among them."""
    root = make_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6)
    odd = root / "dog" / "photo.png"
    Image.new("RGB", (444, 500), (90, 120, 30)).save(odd)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return FileSplit(paths, torch.zeros(len(paths), dtype=torch.int64), 3, SIZE), odd


def fail_on(size: tuple[int, int], real: Callable[..., Image.Image]) -> Callable[..., Image.Image]:
    def resize(img: Image.Image, *args: object) -> Image.Image:
        if img.size == size:
            raise ValueError("box offset can't be negative")
        return real(img, *args)
    return resize


@pytest.mark.parametrize("workers", [0, 2])
def test_any_error_reading_one_file_is_that_bad_file(folder_with_odd_file: tuple[FileSplit, Path], workers: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only decoder errors: whatever fails for one file (here its resize) is that file's one-line error in
    a training epoch, and a skipped file in the decodability check."""
    split, odd = folder_with_odd_file
    monkeypatch.setattr(imageio, "resize_center", fail_on((444, 500), imageio.resize_center))
    images, failures = decode_checked(split, workers, keep_images=True)
    assert failures == {str(odd): "cannot resize image (ValueError: box offset can't be negative)"}
    assert images is not None and len(images) == len(split) - 1
    loader = StreamLoader(split, 4, PLAIN, workers=workers)
    with pytest.raises(ImgrecError) as info:
        list(loader)
    message = str(info.value)
    assert message == f"{odd}: cannot resize image (ValueError: box offset can't be negative)"
    del info, loader


def test_a_worker_that_dies_names_the_file_it_was_reading(folder_with_odd_file: tuple[FileSplit, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed in the middle of a file (by the system, or a crash inside a decoder) takes no traceback
    with it: the run's one-line error says which file it was reading."""
    split, odd = folder_with_odd_file
    real = loaders.read_image

    def crash(path: str, *args: object) -> torch.Tensor:
        if path == str(odd):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args)

    monkeypatch.setattr(loaders, "read_image", crash)
    with pytest.raises(ImgrecError) as info:
        decode_checked(split, 2, keep_images=False)
    message = str(info.value)
    assert message.startswith("decoding the images failed: DataLoader worker (pid")
    assert message.endswith(f"while reading {odd}") and "\n" not in message
    del info
    loader = StreamLoader(split, 4, PLAIN, workers=2)
    with pytest.raises(ImgrecError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith("DataLoader worker") and message.endswith(f"while reading {odd}")
    del info, loader


def test_reading_notes_name_what_the_workers_the_error_names_were_reading() -> None:
    notes = ReadingNotes(3)
    notes.slots[:] = torch.tensor([[101, 7], [102, -1], [103, 9]])  # worker 102 is between files
    assert notes.being_read("DataLoader worker (pid 101) is killed by signal: Killed.") == [7]
    assert notes.being_read("DataLoader worker (pid(s) 102, 103) exited unexpectedly") == [9]
    assert notes.being_read("DataLoader timed out after 5 seconds") == []
    with notes.reading(4):  # in the main process (no workers): slot 0
        assert notes.slots[0].tolist() == [os.getpid(), 4]
    assert notes.slots[0].tolist() == [os.getpid(), -1]


def test_worker_error_message() -> None:
    wrapped = RuntimeError("Caught ImageDecodeError in DataLoader worker process 1.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\nimgrec.data.imageio.ImageDecodeError: "
                           "/data/cat/1.png: cannot decode image (image file is truncated)\n")
    assert worker_error_message(wrapped) == "/data/cat/1.png: cannot decode image (image file is truncated)"
    assert worker_error_message(RuntimeError("plain message")) == "plain message"
    assert worker_error_message(RuntimeError("")) == "RuntimeError"


# --- resuming within an epoch --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "files"])
@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
def test_a_loaded_state_continues_with_the_very_next_batch(splits: tuple[ArraySplit, FileSplit], kind: str,
                                                            stop_after: int) -> None:
    """Draw some batches, save the state, load it into a fresh loader: the rest of the epoch (order and
    augmentation) is what the first loader would have drawn."""
    split = splits[0] if kind == "memory" else splits[1]
    # every kind of randomness a training batch has: order, augmentation, RandAugment, MixUp/CutMix
    transform = BatchTransform(MEAN, STD, ["randaugment", "crop", "flip", "erase"])
    make = lambda: make_loader(split, 4, transform, train=True, seed=3, workers=0, mix=MIX)  # noqa: E731
    whole = run_epoch(make(), 2)
    first = make()
    first.set_epoch(2)
    batches = iter(first)
    drawn = [next(batches) for _ in range(stop_after)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == stop_after
    fresh = make()
    fresh.load_state_dict(state)
    assert_same_batches(drawn + list(fresh), whole)
    assert fresh.batches_done == len(whole)
    assert_same_batches(run_epoch(fresh, 3), run_epoch(make(), 3))  # and the next epoch starts afresh


def test_a_state_of_another_loader_is_refused(splits: tuple[ArraySplit, FileSplit]) -> None:
    loader = TensorLoader(splits[0], 4, PLAIN, shuffle=True, seed=3)
    loader.set_epoch(1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        TensorLoader(splits[0], 5, PLAIN, shuffle=True, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        TensorLoader(splits[0], 4, PLAIN, shuffle=True, seed=4).load_state_dict(state)


def test_file_loaders_leave_the_global_generator_alone(splits: tuple[ArraySplit, FileSplit]) -> None:
    """A DataLoader seeds its workers from torch's global generator unless given its own: that would make a
    resumed run's dropout differ from an uninterrupted one's."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for workers in (0, 2):
        loader = StreamLoader(splits[1], 8, PLAIN, shuffle=True, workers=workers)
        run_epoch(loader, 1)
        run_epoch(loader, 2)
        del loader
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("n,train,sizes", [(9, True, [4, 4]), (9, False, [4, 4, 1]), (10, True, [4, 4, 2]),
                                           (1, True, [1])])
def test_training_never_ends_on_a_lone_image(n: int, train: bool, sizes: list[int]) -> None:
    """BatchNorm cannot train on a batch of one image: make_loader drops such a last training batch."""
    split = ArraySplit(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
    loader = make_loader(split, 4, PLAIN, train=train)
    assert len(loader) == len(sizes)
    assert [len(y) for _, y in loader] == sizes


NEXT_LOADER_WORKER_COLLECTS = """
from torch.utils.data import Dataset
from imgrec.data.loaders import file_loader

class Collecting(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        gc.collect()  # a worker's own garbage collection
        return torch.zeros(1, 2, 2, dtype=torch.uint8), 0

for _ in file_loader(Collecting(), 1, batch_size=2):
    pass
gc.enable()
print("done")
"""


def test_a_file_loader_worker_never_finalises_the_main_process_garbage() -> None:
    """A loader left in a reference cycle, its worker still running, is copied into the next loader's forked
    worker; collected there, it tried to stop a worker that is not that worker's child (a traceback on stderr)."""
    assert_no_worker_finalises_it(NEXT_LOADER_WORKER_COLLECTS)


def test_decode_batch_holds_about_a_fixed_number_of_bytes() -> None:
    def split(channels: int, size: int) -> FileSplit:
        return FileSplit([], torch.zeros(0, dtype=torch.int64), channels, (size, size))
    assert verify.decode_batch(split(3, 32)) == 1024  # 3 KB images: the most per batch
    assert verify.decode_batch(split(1, 28)) == 1024
    assert verify.decode_batch(split(3, 64)) == verify.DECODE_BATCH_BYTES // (3 * 64 * 64) == 682
    assert verify.decode_batch(split(3, 224)) == 64  # 150 KB images: the fewest


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_in_batches_keeps_order_and_failures(tmp_path: Path, workers: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "ds", per_class=7, size=12)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    for bad in (paths[2], paths[3], paths[11], paths[20]):  # across the batch boundaries
        Path(bad).write_bytes(b"not an image")
    split = FileSplit(paths, torch.arange(len(paths)) % 3, 3, (12, 12))
    monkeypatch.setattr(verify, "DECODE_BATCH_RANGE", (4, 4))
    images, failures = decode_checked(split, workers, keep_images=True)
    assert sorted(failures) == sorted([paths[2], paths[3], paths[11], paths[20]])
    good = [p for p in paths if p not in failures]
    assert images is not None and torch.equal(images, torch.stack([imageio.read_image(p, 3, (12, 12)) for p in good]))
