"""The training state of a run, runs/<run>/train_state.pt: everything needed to continue exactly where it stopped.

It holds the model, optimiser, scheduler and GradScaler states; every random generator (Python, NumPy, torch
CPU and CUDA, and the training loader's order-and-augmentation generator with the batches it has drawn); the
position (epoch, steps done in it) with the epoch's running loss and accuracy sums; the best metric and the
early-stopping counter; the results so far; the config and what the weights files record. Only tensors and
plain values, so it loads with weights_only=True. It is written atomically, and the one before it is kept as
train_state.prev.pt. This module never names a data set.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.config import RunConfig, resume_safe_settings
from imgrec.engine import distributed
from imgrec.engine.checkpoint import load_checkpoint, save_atomic, temporary_name
from imgrec.errors import ImgrecError, UsageError, write_error

STATE_FILE = "train_state.pt"
PREVIOUS_STATE_FILE = "train_state.prev.pt"
STATE_KIND = "imgrec-train-state"
STATE_VERSION = 1
# What the weights files record about the data; a resumed run must see the same.
DATA_KEYS = ("classes", "channels", "image_size", "mean", "std")


@dataclass
class Progress:
    """Where training stands: the position, the current epoch's running sums, the best so far, the results."""

    epoch: int = 1  # the epoch in progress, or the next to start when step == 0
    step: int = 0  # steps done in it
    loss_sum: float = 0.0  # its running sums: loss x batch size, correct predictions, images
    correct: int = 0
    seen: int = 0
    lr: float = 0.0  # the learning rate at its start (the lr column of results.csv)
    seconds: float = 0.0  # its training time so far
    best: float = -math.inf  # best validation accuracy (the epoch number: no validation or --select last)
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    stale: int = 0  # epochs since the best: the early-stopping counter
    train_seconds: float = 0.0
    images_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows of results.csv so far

    def finished(self, epochs: int, patience: int) -> bool:
        """All epochs done, or early stopping has struck."""
        done = len(self.history)
        return done >= epochs or (patience > 0 and self.stale >= patience and self.step == 0)

    def stopped_early(self, epochs: int, patience: int) -> bool:
        """Finished by early stopping, before all epochs ran."""
        return len(self.history) < epochs and self.finished(epochs, patience)

    def start_epoch(self, lr: float) -> None:
        """Fresh running sums for the epoch in self.epoch."""
        self.step, self.loss_sum, self.correct, self.seen, self.lr, self.seconds = 0, 0.0, 0, 0, lr, 0.0

    def end_epoch(self, row: dict[str, Any], metric: float, candidate: bool = True) -> bool:
        """Record the finished epoch's row; returns True when it is the best so far. Moves on to the next epoch.
        candidate False (an epoch on scaled-down images, validated at full size): never the best, and not counted
        by early stopping."""
        self.history.append(row)
        self.train_seconds += self.seconds
        self.images_seen += self.seen
        improved = candidate and metric > self.best
        if improved:
            self.best, self.best_epoch, self.best_val_accuracy, self.stale = metric, self.epoch, row["val_acc"], 0
        elif candidate:
            self.stale += 1
        self.epoch, self.step = self.epoch + 1, 0
        return improved

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as the training state stores them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Progress:
        """Back from to_dict() (keys it does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def rng_state() -> dict[str, Any]:
    """Every global random generator's state, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every global random generator back where rng_state() found it."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(state: dict[str, Any], run_dir: Path) -> Path:
    """Write train_state.pt atomically, keeping the one before as train_state.prev.pt."""
    path = run_dir / STATE_FILE
    save_atomic(state, path, keep_previous=PREVIOUS_STATE_FILE)
    return path


def resolve_state(run_or_file: str | Path) -> Path:
    """A run folder -> its train_state.pt; a state file -> itself."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / STATE_FILE
        if not path.is_file():
            raise ImgrecError(f"{path.parent} has no {STATE_FILE}: it is not an imgrec run folder, or its training "
                              f"never got to save (start it again without --resume)")
    elif not path.exists():
        raise ImgrecError(f"no such run folder or training state: {path}")
    return path


def make_current(path: Path) -> Path:
    """A state resumed from under another name (train_state.prev.pt, when train_state.pt is damaged) becomes the
    run's train_state.pt, so that the next save keeps it, not the damaged file, as the previous state."""
    current = path.parent / STATE_FILE
    if path.resolve() != current.resolve():
        tmp = temporary_name(current)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, current)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(current, exc) from None
    return current


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state (weights only); a damaged or foreign file is a one-line error naming it."""
    state = load_checkpoint(path, what="training state")
    if state.get("kind") != STATE_KIND:
        raise ImgrecError(f"{path} is not an imgrec training state (train_state.pt)")
    if state.get("format_version", 0) > STATE_VERSION:
        raise ImgrecError(f"{path} was written by a newer imgrec (format {state['format_version']}); upgrade imgrec")
    return state


def check_same_data(state: dict[str, Any], meta: dict[str, Any], train_images: int, source: Path) -> None:
    """The data a run resumes on must be the data it was trained on (classes, shape, statistics, size)."""
    saved = {"train images": state["train_images"]} | {k: state["weights_meta"].get(k) for k in DATA_KEYS}
    now = {"train images": train_images} | {k: meta.get(k) for k in DATA_KEYS}
    changed = [k for k in saved if saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise ImgrecError(f"the data changed since {source} was saved ({k}: {_short(saved[k])} then, {_short(now[k])} "
                          f"now); resume on the same data, or start a new run")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_config(state: dict[str, Any], given: dict[str, Any], source: Path) -> tuple[RunConfig, list[str]]:
    """The saved config with the settings given on the command line; only resume-safe settings may change.

    Returns the config and notes for the log (an --epochs extension, for one).
    """
    saved, wanted = resumed_settings(state["config"], given, source)
    progress = Progress.from_dict(state["progress"])
    least = progress.epoch if progress.step else len(progress.history)
    if wanted.epochs < least:
        raise UsageError(f"--epochs {wanted.epochs} is fewer than the {least} epochs {source.parent} has already "
                         f"{'started' if progress.step else 'trained'}")
    if saved.time_budget and wanted.epochs != saved.epochs:
        raise UsageError(f"--epochs cannot change on resume of {source.parent}: its epochs were planned for "
                         f"--time-budget {saved.time_budget}; drop --epochs, or start a new run")
    notes = []
    if wanted.epochs != saved.epochs:
        notes.append(f"{'extending' if wanted.epochs > saved.epochs else 'shortening'} the run from {saved.epochs} to "
                     f"{wanted.epochs} epochs" + (f" (the {saved.schedule} schedule is stretched to the new length "
                                                   f"from the current step)" if saved.schedule != "constant" else ""))
    return wanted, notes


def resumed_settings(values: dict[str, Any], given: dict[str, Any], source: Path) -> tuple[RunConfig, RunConfig]:
    """The saved config (values, as source holds them) and the one with the settings given on the command line;
    a change of data or model, or of a setting that is not resume-safe, is a usage error."""
    saved = RunConfig.from_dict(values, source=str(source))
    wanted = RunConfig.from_dict({**values, **given}, source="the command line")
    changed = [f.name for f in fields(RunConfig) if getattr(saved, f.name) != getattr(wanted, f.name)
               and not (f.name == "data" and _same_path(saved.data, wanted.data))]
    for name in ("data", "model"):
        if name in changed:
            raise UsageError(f"cannot resume {source.parent} with --{name} {getattr(wanted, name)}: it was trained with "
                             f"--{name} {getattr(saved, name)}; start a new run for other {name}")
    unsafe = [name for name in changed if name not in resume_safe_settings()]
    if unsafe:
        flags = ", ".join("--" + n.replace("_", "-") for n in unsafe)
        allowed = ", ".join("--" + n.replace("_", "-") for n in resume_safe_settings())
        raise UsageError(f"{flags} cannot change on resume (the run was trained with other values); only {allowed} "
                         f"may: drop {flags}, or start a new run")
    return saved, wanted


def _same_path(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


@dataclass
class TrainParts:
    """The objects of a training run whose state a training state holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a learning-rate scheduler, or None for a constant rate
    scaler: torch.amp.GradScaler
    loader: Any  # the training loader: state_dict() / load_state_dict(), num_samples, len()
    averager: Any = None  # the weight average (averaging.WeightAverage), or None


def capture_state(parts: TrainParts, progress: Progress, cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The training state of this moment, as a dict of tensors and plain values.

    Under torchrun every process must call it (a collective): the model and optimiser are the same in all of
    them, but each has its own loader position, random generators and running sums, kept in "processes".
    """
    own = {"loader": parts.loader.state_dict(), "rng": rng_state(), "loss_sum": progress.loss_sum,
           "correct": progress.correct, "seen": progress.seen}
    processes = distributed.gather(own)
    return {
        "kind": STATE_KIND, "format_version": STATE_VERSION, "config": cfg.to_dict(), "weights_meta": meta,
        "train_images": parts.loader.num_samples, "progress": progress.to_dict(),
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler": parts.scaler.state_dict(), "loader": own["loader"], "rng": own["rng"],
        "world_size": len(processes), "processes": processes if len(processes) > 1 else [],
        "averaged": parts.averager.state_dict() if parts.averager is not None else None,
    }


def restore_state(state: dict[str, Any], parts: TrainParts, cfg: RunConfig) -> Progress:
    """Load a training state into freshly built parts; returns the progress to continue from.

    When --epochs changed on resume, the schedule is rebuilt for the new length and moved to the current step.
    """
    progress = Progress.from_dict(state["progress"])
    own = _own_part(state)
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None:
        if state["config"]["epochs"] == cfg.epochs:
            parts.scheduler.load_state_dict(state["scheduler"])
        else:
            done = (progress.epoch - 1) * len(parts.loader) + progress.step
            parts.scheduler.last_epoch = done - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                parts.scheduler.step()
    parts.scaler.load_state_dict(state["scaler"])
    if parts.averager is not None:
        parts.averager.load_state_dict(state["averaged"])
    if progress.step:
        parts.loader.load_state_dict(own["loader"])
        progress.loss_sum, progress.correct, progress.seen = own["loss_sum"], own["correct"], own["seen"]
    set_rng_state(own["rng"])
    return progress


def check_world_size(state: dict[str, Any]) -> None:
    """A run continues only with the number of processes that trained it: with another number the effective batch
    (--batch-size per process times processes), the steps per epoch and the schedule would all change."""
    saved, now = state.get("world_size", 1), distributed.context().world_size
    if saved != now:
        raise UsageError(f"this run was trained by {saved} process{'es' if saved > 1 else ''}; resume it with as many "
                         f"(torchrun --nnodes x --nproc_per_node, or without torchrun for one), not {now}")


def _own_part(state: dict[str, Any]) -> dict[str, Any]:
    """This process's loader position, generators and running sums in a state (a state of one process: its own)."""
    check_world_size(state)
    here = distributed.context()
    processes = state.get("processes") or []
    if here.rank < len(processes):
        return processes[here.rank]
    progress = state["progress"]
    return {"loader": state["loader"], "rng": state["rng"], "loss_sum": progress["loss_sum"],
            "correct": progress["correct"], "seen": progress["seen"]}


class StateSaver:
    """Writes train_state.pt: at every epoch end, and within an epoch every save_every_steps steps or
    save_every_minutes minutes. `capture` builds the state dict of the moment (and refuses non-finite weights)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, capture: Callable[[Progress], dict[str, Any]]) -> None:
        self.run_dir, self.cfg, self.capture = run_dir, cfg, capture
        self.steps = 0
        self.last = time.monotonic()

    def due(self) -> bool:
        """Count one step; True when a save within the epoch is due."""
        self.steps += 1
        by_steps = self.cfg.save_every_steps > 0 and self.steps >= self.cfg.save_every_steps
        by_time = self.cfg.save_every_minutes > 0 and time.monotonic() - self.last >= 60 * self.cfg.save_every_minutes
        return by_steps or by_time

    def save(self, progress: Progress) -> Path:
        """Write the state of this moment (every process captures its part; the main process writes the file)."""
        state = self.capture(progress)
        path = save_state(state, self.run_dir) if distributed.is_main() else self.run_dir / STATE_FILE
        self.steps, self.last = 0, time.monotonic()
        return path
