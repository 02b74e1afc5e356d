"""Batches for training and evaluation, from memory or from files, with one semantics.

Both loaders draw the epoch's order from a generator seeded by (seed, epoch), gather uint8 images, then
apply the same BatchTransform with the same generator. For the same seed they give the same batches,
whichever path the images come from. Their state_dict (epoch, batches drawn, the generator after them) lets
a resumed run continue an epoch with the very next batch and the same augmentation.

Data-parallel training gives each of world_size processes a shard: every process draws the same epoch order,
then process `rank` takes every world_size-th index from position rank (strided, so the processes' batches at
step k together are the batch k of one process with world_size times the batch size). A training order is
first padded with its own first indices to a multiple of world_size, so that every process runs the same
number of steps; an evaluation order is not padded, so no image is counted twice. Each process augments
with a generator of its own rank. A training loader given a BatchMix (MixUp/CutMix) mixes each augmented batch
with the same generator and yields probabilities (B, num_classes) as its targets instead of labels.

A balanced training order (--balance sampler) has as many images as the split but every class equally often:
each class's images are drawn without replacement, round after round (small classes repeat, large ones are
cut), from the same epoch generator, so it is seeded, resumed and sharded like the plain order.
Imports: torch and the data package.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from imgrec.data.imageio import ImageDecodeError, read_image
from imgrec.data.info import ArraySplit, FileSplit, Split
from imgrec.data.transforms import BatchMix, BatchTransform
from imgrec.errors import ImgrecError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that decides one epoch's order and augmentation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shard_indices(order: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """Process rank's part of an order: every world_size-th index from position rank. With pad, the order is
    first extended with its own first indices to a multiple of world_size (all parts the same length)."""
    if world_size == 1:
        return order
    if pad and len(order) % world_size:
        extra = world_size - len(order) % world_size
        order = torch.cat([order, order.repeat(-(-extra // max(len(order), 1)))[:extra]])
    return order[rank::world_size]


def shard_size(n: int, rank: int, world_size: int, pad: bool) -> int:
    """The length of process rank's part of an order of n indices (see shard_indices)."""
    return -(-n // world_size) if pad else len(range(rank, n, world_size))


def balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """len(labels) indices, shuffled, in which every class present appears equally often (the remainder goes to
    classes drawn at random): each class's images in a random order, repeated as often as its share needs."""
    classes = torch.unique(labels)
    n, k = len(labels), len(classes)
    quota = torch.full((k,), n // k, dtype=torch.int64)
    quota[torch.randperm(k, generator=generator)[: n % k]] += 1
    parts = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        rounds = -(-q // len(members))
        picks = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(rounds)])
        parts.append(picks[:q])
    order = torch.cat(parts)
    return order[torch.randperm(n, generator=generator)]


def _batch_order(n: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator,
                 shard: tuple[int, int] = (0, 1), balanced_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    if shuffle and balanced_labels is not None and n:
        order = balanced_order(balanced_labels, generator)
    else:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = shard_indices(order, *shard, pad=shuffle)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class _EpochPosition:
    """The part both loaders share: the epoch, its batch order, and how far into it the loader has come.

    The order is drawn from the epoch's generator; the same generator then augments batch after batch. So
    (epoch, batches drawn, generator state) is all it takes to continue an epoch exactly where it stopped.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, augment: bool, seed: int,
                 drop_last: bool, shard: tuple[int, int] = (0, 1), balanced_labels: torch.Tensor | None = None) -> None:
        self.balanced_labels = balanced_labels  # the split's labels when each epoch draws the classes equally
        self.batch_size, self.shuffle, self.augment, self.seed, self.drop_last = batch_size, shuffle, augment, seed, drop_last
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.num_samples = num_samples  # the whole split's
        self.shard = shard  # (rank, world_size): this process's part of every epoch
        self.shard_samples = shard_size(num_samples, rank, world_size, pad=shuffle)
        self.epoch = 0
        self.batches_done = 0
        self._generator: torch.Generator | None = None
        self._resume: dict[str, Any] | None = None
        self.transform: BatchTransform
        self.mix: BatchMix | None = None

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, indices: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as the model takes it: transformed (augmented when training), then mixed when asked to."""
        generator_or_none = generator if self.augment else None
        if getattr(self.transform, "alternate_flip", False):  # its flips follow each image's index and the epoch
            x = self.transform(images, generator_or_none, (indices, self.epoch, self.seed))
        else:  # any transform taking (images, generator)
            x = self.transform(images, generator_or_none)
        if self.augment and self.mix is not None:
            return self.mix(x, labels, generator)
        return x, labels

    def set_epoch(self, epoch: int) -> None:
        """Start the given epoch from its first batch at the next iteration."""
        self.epoch, self._resume = epoch, None

    def __len__(self) -> int:
        n = self.shard_samples
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and a tensor: the epoch, the batches drawn in it, the generator after them."""
        generator = self._generator.get_state() if self._generator is not None else None
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self.batches_done, "batches": len(self),
                "generator": generator, "rank": self.shard[0], "world_size": self.shard[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue state's epoch with its next batch (and the same augmentation)."""
        shard = (state.get("rank", 0), state.get("world_size", 1))
        if state["seed"] != self.seed or state["batches"] != len(self) or shard != self.shard:
            raise ValueError(f"loader state of seed {state['seed']} with {state['batches']} batches (process {shard[0]} "
                             f"of {shard[1]}) does not fit this loader (seed {self.seed}, {len(self)} batches, "
                             f"process {self.shard[0]} of {self.shard[1]})")
        self.epoch = state["epoch"]
        self._resume = state if state["batches_done"] and state["generator"] is not None else None

    def _epoch_batches(self) -> tuple[list[torch.Tensor], torch.Generator]:
        """This epoch's batches still to draw, and the generator to augment them with."""
        generator = epoch_generator(self.seed, self.epoch)
        batches = _batch_order(self.num_samples, self.batch_size, self.shuffle, self.drop_last, generator, self.shard,
                               self.balanced_labels)
        rank, world_size = self.shard
        if world_size > 1:  # the same order everywhere, but each process its own augmentation
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + rank + 1)
        skip, resume = 0, self._resume
        if resume is not None:
            skip = resume["batches_done"]
            generator.set_state(resume["generator"])
            self._resume = None
        self._generator, self.batches_done = generator, skip
        return batches[skip:], generator


class TensorLoader(_EpochPosition):
    """Batches of an in-memory split: index the uint8 tensor, transform the whole batch. No workers."""

    def __init__(self, split: ArraySplit, batch_size: int, transform: BatchTransform, *, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False, shard: tuple[int, int] = (0, 1),
                 balanced: bool = False) -> None:
        super().__init__(len(split), batch_size, shuffle, augment, seed, drop_last, shard,
                         split.labels if balanced else None)
        self.split, self.transform = split, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, generator = self._epoch_batches()
        for idx in batches:
            x, y = self._batch(self.split.images[idx], self.split.labels[idx], generator, idx)
            self.batches_done += 1
            yield x, y


class ReadingNotes:
    """Which item each DataLoader worker is reading, in shared memory: a worker killed in the middle of a file
    (out of memory, a crash inside a decoder) dies without a word, and this says which file it was."""

    def __init__(self, workers: int) -> None:
        self.slots = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()  # (pid, index) each

    @contextmanager
    def reading(self, index: int) -> Iterator[None]:
        """Note item `index` as being read by this process for the duration of the block."""
        worker = get_worker_info()
        slot = self.slots[worker.id % len(self.slots) if worker is not None else 0]
        slot[0], slot[1] = os.getpid(), index
        try:
            yield
        finally:  # not reached by a worker that dies reading it, which is the point
            slot[1] = -1

    def being_read(self, message: str) -> list[int]:
        """The items that the workers a DataLoader error names ("worker (pid 12)", "(pid(s) 12, 13)") were reading."""
        named = re.search(r"pid(?:\(s\))? ([\d, ]+)", message)
        pids = {int(pid) for pid in named.group(1).replace(",", " ").split()} if named else set()
        return [index for pid, index in self.slots.tolist() if pid in pids and index >= 0]


class FileDataset(Dataset):
    """Decodes one file per item with the shared image loader: (uint8 (C, H, W), label). Each of `workers`
    worker processes notes the file it is reading (`files_being_read` names them after a worker died)."""

    def __init__(self, split: FileSplit, workers: int = 0) -> None:
        self.split = split
        self.notes = ReadingNotes(workers)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.read(index), int(self.split.labels[index])

    def read(self, index: int) -> torch.Tensor:
        """Decode file `index` (read_image), noted as being read while it is."""
        with self.notes.reading(index):
            return read_image(self.split.paths[index], self.split.channels, self.split.image_size,
                              self.split.content(index))

    def files_being_read(self, message: str) -> list[str]:
        """The files that the workers a DataLoader error names were reading."""
        return [self.split.paths[index] for index in self.notes.being_read(message)]


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


class StreamLoader(_EpochPosition):
    """Batches of a file split, decoded by DataLoader workers; transformed in the main process."""

    def __init__(self, split: FileSplit, batch_size: int, transform: BatchTransform, *, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False, workers: int | None = None,
                 shard: tuple[int, int] = (0, 1), balanced: bool = False) -> None:
        super().__init__(len(split), batch_size, shuffle, augment, seed, drop_last, shard,
                         split.labels if balanced else None)
        self.split, self.transform = split, transform
        self._batches = _EpochBatches()
        workers = default_workers() if workers is None else workers
        self._dataset = FileDataset(split, workers)
        self._loader = file_loader(self._dataset, workers, batch_sampler=self._batches, persistent_workers=workers > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._batches.batches, generator = self._epoch_batches()
        batches = self._batches.batches
        try:
            for i, (images, labels) in enumerate(self._loader):
                x, y = self._batch(images, labels, generator, batches[i])
                self.batches_done += 1
                yield x, y
        except (ImageDecodeError, RuntimeError) as exc:
            if "DataLoader worker" not in str(exc) and not isinstance(exc, ImageDecodeError):
                raise
            traceback.clear_frames(exc.__traceback__)  # frees the worker pool now, not at some later garbage collection
            raise ImgrecError(worker_error_message(exc, self._dataset.files_being_read)) from None


def file_loader(dataset: Dataset, workers: int | None, **options: Any) -> DataLoader:
    """A DataLoader over files whose workers leave Ctrl-C to the main process and whose seeding draws nothing
    from torch's global generator (so a resumed run's dropout and initialisation stay those of an uninterrupted one)."""
    workers = default_workers() if workers is None else workers
    options.setdefault("collate_fn", _collate_uint8)
    return DataLoader(dataset, num_workers=workers, worker_init_fn=_ignore_interrupts if workers else None,
                      generator=torch.Generator(), **options)


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the main process saves and stops the workers itself.
    What the fork copied is never finalised here (another loader's iterator left as garbage would try to stop
    workers that are not this worker's children)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()


def _collate_uint8(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    return images, labels


def worker_error_message(exc: BaseException, files_being_read: Callable[[str], list[str]] | None = None) -> str:
    """The user-facing line of an error raised in a DataLoader worker (which arrives with a traceback); for a
    worker that died, the file it was reading, from the dataset's `files_being_read` (see ReadingNotes)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    message = last.split("Error: ", 1)[-1] if "Traceback" in str(exc) else last
    files = files_being_read(message) if files_being_read is not None and "Traceback" not in str(exc) else []
    return f"{message.rstrip('. ')}, while reading {', '.join(files)}" if files else message


def default_workers() -> int:
    """Worker processes for decoding: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def make_loader(split: Split, batch_size: int, transform: BatchTransform, *, train: bool, seed: int = 0,
                workers: int | None = None, shard: tuple[int, int] = (0, 1), mix: BatchMix | None = None,
                balanced: bool = False) -> TensorLoader | StreamLoader:
    """A loader for one split: shuffled and augmented for training, in order and plain otherwise; with shard
    (rank, world_size), this process's part of every epoch (batch_size is per process); with mix, training
    batches are mixed (MixUp/CutMix) and their targets are probabilities; balanced (training only): every class
    drawn equally often in each epoch."""
    # A last training batch of one image makes BatchNorm fail ("Expected more than 1 value per channel"): drop it.
    # The order is shuffled, so it is another image each epoch.
    n = shard_size(len(split), *shard, pad=train)
    lone = train and n > batch_size and n % batch_size == 1
    options = dict(shuffle=train, augment=train, seed=seed, drop_last=lone, shard=shard, balanced=balanced and train)
    loader: TensorLoader | StreamLoader
    if isinstance(split, ArraySplit):
        loader = TensorLoader(split, batch_size, transform, **options)
    else:
        loader = StreamLoader(split, batch_size, transform, workers=workers, **options)
    loader.mix = mix if train else None
    return loader
