"""The decodability check: which files of a split do not decode, found before any training in one pass.

Every file goes through the one image loader (imageio.read_image) in DataLoader workers; a file that fails
is recorded with its reason instead of raising, so a bad file is dropped before training rather than ending
a run in the middle of an epoch. Training, evaluation and `imgrec doctor` all use this pass.
Imports: torch and the data package.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from imgrec.data.imageio import ImageDecodeError
from imgrec.data.info import FileSplit
from imgrec.data.loaders import FileDataset, default_workers, file_loader, worker_error_message
from imgrec.errors import ImgrecError, printable

DECODE_BATCH_BYTES = 8 * 1024**2  # decoded pixels a worker sends at once: each batch costs a shared-memory block
DECODE_BATCH_RANGE = (64, 1024)  # and the images in one batch, whatever their size
LISTED_IN_WARNING = 100  # the warning names this many files; skipped.txt in the run folder has them all


class CheckedFileDataset(FileDataset):
    """Item i: (uint8 (C, H, W) image, "") when file i decodes, else (an empty tensor, the reason)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        try:
            return self.read(index), ""
        except ImageDecodeError as exc:
            return torch.empty(0, dtype=torch.uint8), exc.reason  # without the path: it is listed beside it


def _collate_checked(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor | None, list[str]]:
    """The batch's good images as one tensor (one shared-memory block per batch, not one per image) and every
    item's reason ("" for the good ones)."""
    good = [image for image, reason in items if not reason]
    return (torch.stack(good) if good else None), [reason for _, reason in items]


def decode_checked(split: FileSplit, workers: int | None, keep_images: bool) -> tuple[torch.Tensor | None, dict[str, str]]:
    """Decode every file once; returns (uint8 (N_good, C, H, W) of the files that decode, or None when not kept,
    {path: reason} of those that do not)."""
    workers = default_workers() if workers is None else workers
    dataset = CheckedFileDataset(split, workers)
    loader = file_loader(dataset, workers, batch_size=decode_batch(split), collate_fn=_collate_checked)
    kept = torch.empty((len(split) if keep_images else 0, split.channels, *split.image_size), dtype=torch.uint8)
    failures: dict[str, str] = {}
    position, count = 0, 0
    try:
        for images, reasons in loader:
            for reason in reasons:
                if reason:
                    failures[split.paths[position]] = reason
                position += 1
            if keep_images and images is not None:
                kept[count : count + len(images)] = images
                count += len(images)
    except RuntimeError as exc:  # a worker killed by the system (out of memory, a crash inside a decoder)
        traceback.clear_frames(exc.__traceback__)  # frees the worker pool now, not at some later garbage collection
        raise ImgrecError(f"decoding the images failed: {worker_error_message(exc, dataset.files_being_read)}") from None
    return (kept[:count] if keep_images else None), failures


def decode_batch(split: FileSplit) -> int:
    """Images per batch of the decoding pass: about DECODE_BATCH_BYTES of pixels, within DECODE_BATCH_RANGE (on a
    2-core machine, 50,000 32x32 JPEGs took 7.9 s with two workers in batches of 64 and 4.4 s in batches of 512)."""
    low, high = DECODE_BATCH_RANGE
    pixels = split.channels * split.image_size[0] * split.image_size[1]
    return max(low, min(high, DECODE_BATCH_BYTES // max(1, pixels)))


def without(split: FileSplit, failures: dict[str, str]) -> FileSplit:
    """The split without the files that failed to decode."""
    keep = [i for i, path in enumerate(split.paths) if path not in failures]
    return split.subset(torch.tensor(keep, dtype=torch.int64))


def skipped_table(skipped: list[tuple[str, str, str]]) -> str:
    """skipped.txt: one line per file left out, "path<TAB>split<TAB>reason" (control characters in a name escaped,
    so that a newline in it cannot split a row)."""
    return "".join(f"{printable(path)}\t{split}\t{printable(reason)}\n" for path, split, reason in skipped)


def skipped_warning(skipped: list[tuple[str, str, str]], where: str | Path | None = None) -> str:
    """One warning naming every file left out (up to LISTED_IN_WARNING of them) and why."""
    lines = [f"warning: skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} that do not decode "
             f"(run `imgrec doctor` on the data for a full report){f'; all listed in {where}' if where else ''}:"]
    lines += [f"  {printable(path)} ({split}): {reason}" for path, split, reason in skipped[:LISTED_IN_WARNING]]
    if len(skipped) > LISTED_IN_WARNING:
        lines.append(f"  ... and {len(skipped) - LISTED_IN_WARNING} more")
    return "\n".join(lines)


def strict_error(skipped: list[tuple[str, str, str]]) -> ImgrecError:
    """--strict: one line naming the files that do not decode."""
    names = "; ".join(f"{printable(path)}: {reason}" for path, _, reason in skipped[:20])
    more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    return ImgrecError(f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} do not decode (--strict): {names}{more}; "
                       f"remove or replace them, or train without --strict to skip them")
