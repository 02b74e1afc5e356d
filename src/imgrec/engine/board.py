"""TensorBoard logging (--log tensorboard): runs/<run>/tensorboard/ beside results.csv and report.html.

Every value is logged at the run's global step, (epoch - 1) * steps per epoch + step: the per-step loss and
learning rate, each epoch's metrics at its last step, and at the end the test's confusion matrix, its sample
predictions and the settings with the final metrics (TensorBoard's HParams tab). A resumed run opens the same
folder with purge_step at the step after its saved state: TensorBoard then drops whatever the interrupted run
logged past that point, so the curves continue without a step twice. Only the main process logs.
Imports: torch (its SummaryWriter needs the `tensorboard` package: the `tensorboard` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imgrec.errors import ImgrecError

FOLDER = "tensorboard"


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or one line saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImgrecError("--log tensorboard needs the Python package 'tensorboard', which is not installed: "
                          "pip install 'imgrec[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLog:
    """The run's TensorBoard events; start() opens them once the training position is known."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / FOLDER
        self._writer_class = summary_writer_class()  # a missing package fails before any training
        self.writer: Any = None
        self.steps_per_epoch = 1
        self.last_step = 0
        self._sums = (0.0, 0)  # the epoch's loss sum and images at the last logged step

    def start(self, epoch: int, step: int, loss_sum: float, seen: int, steps_per_epoch: int) -> None:
        """Open the events at a training position (a new run: epoch 1, step 0); drop what was logged past it."""
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.last_step = self.global_step(epoch, step)
        self._sums = (loss_sum, seen)
        self.writer = self._writer_class(str(self.folder), purge_step=self.last_step + 1 if self.last_step else None)

    def global_step(self, epoch: int, step: int) -> int:
        return (epoch - 1) * self.steps_per_epoch + step

    def log_step(self, epoch: int, step: int, loss_sum: float, seen: int, lr: float) -> None:
        """A training step's mean loss (from the epoch's running sums) and the learning rate after it."""
        before_sum, before_seen = (0.0, 0) if step == 1 else self._sums
        if seen > before_seen:
            self.last_step = self.global_step(epoch, step)
            self.writer.add_scalar("train/step_loss", (loss_sum - before_sum) / (seen - before_seen), self.last_step)
            self.writer.add_scalar("train/lr", lr, self.last_step)
        self._sums = (loss_sum, seen)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """An epoch's row of results.csv, at its last step."""
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], self.last_step)
        self.writer.add_scalar("epoch/epoch", row["epoch"], self.last_step)
        self.writer.flush()

    def log_images(self, images: Mapping[str, Path]) -> None:
        """Figures of the run folder (PNG files) as images, at the last step."""
        from PIL import Image

        for tag, path in images.items():
            if path.is_file():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(tag, pixels, self.last_step, dataformats="HWC")

    def log_hparams(self, settings: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The settings and the final metrics, for TensorBoard's HParams tab (in this folder, at the last step)."""
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items()}
        for summary in hparams(plain, dict(metrics)):
            self.writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.last_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
