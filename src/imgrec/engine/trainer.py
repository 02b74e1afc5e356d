"""The training loop: fit -> train_one_epoch -> evaluate, with checkpoints, results.csv and the training state.

fit() gets a model, a training loader, an optional validation loader, the RunConfig and a run folder, and
optionally a saved training state to continue from. It knows nothing of where batches come from: a loader
is anything with __iter__ over (images, labels), __len__, num_samples, set_epoch(epoch), and
state_dict()/load_state_dict() for its position within an epoch. runs/<run>/train_state.pt (state.py) is
written at every epoch end and every few minutes; Ctrl-C or SIGTERM saves it and stops (exit 130).
Under torchrun the same loop runs in every process (distributed.py): each trains its shard through
DistributedDataParallel, the processes agree at every safe point, sums are added over processes, and only
the main process writes files and shows the progress bar.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine import distributed
from imgrec.engine.averaging import averaged_step, make_averager
from imgrec.engine.board import TensorBoardLog
from imgrec.engine.checkpoint import FORMAT_VERSION, save_atomic
from imgrec.engine.optimizers import build_muon
from imgrec.engine.runs import ResultsLog
from imgrec.engine.signals import StopRequested, StopSignals
from imgrec.engine.state import Progress, StateSaver, TrainParts, capture_state, restore_state
from imgrec.engine.system import Compute, autocast
from imgrec.errors import ImgrecError, Interrupted
from imgrec.models import hooks

if TYPE_CHECKING:
    from imgrec.engine.budget import Deadline

with warnings.catch_warnings():  # a notebook without ipywidgets: tqdm.auto warns and falls back to text bars, which
    warnings.simplefilter("ignore")  # imgrec.train then does not show (see progress_bars)
    from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# Per-step progress bars: None shows them on a terminal; True (a notebook with ipywidgets: tqdm.auto's widgets) or
# False (quiet, or a notebook without ipywidgets, where text bars would fill the saved outputs) always or never. imgrec.train sets it for its call.
progress_bars: bool | None = None


class Loader(Protocol):
    num_samples: int

    def __iter__(self) -> Any: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingDiverged(ImgrecError):
    """The loss or the weights are not finite: training stops, and nothing is saved from this point on."""


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    count: int
    logits: torch.Tensor | None = None  # (N, num_classes), float32, when collected
    targets: torch.Tensor | None = None  # (N,)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float | None
    epochs_run: int
    train_seconds: float
    images_per_second: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    first_batch_at: float | None = None  # time.perf_counter() as this process's first training batch was drawn
    last_batch_at: float | None = None  # ... and once its last step was done (None: no step ran)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda p, c, kernels: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay, **kernels),
    "adamw": lambda p, c, kernels: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay, **kernels),
    "sgd": lambda p, c, kernels: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0,
                                                 weight_decay=c.weight_decay, **kernels),
    "muon": build_muon,  # Muon for the conv filters, the sgd above for the rest
}


def optimizer_kernels(device: torch.device) -> dict[str, bool]:
    """Fused optimiser kernels where torch has them (CPU and CUDA: one pass over each parameter instead of
    one per arithmetic step), multi-tensor foreach kernels elsewhere."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def parameter_groups(model: nn.Module, cfg: RunConfig) -> Any:
    """What the optimiser trains, at cfg's learning rate and weight decay (models.hooks.parameter_groups)."""
    return hooks.parameter_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_backbone_mult)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int = 0) -> Any:
    """A per-step learning-rate schedule, or None for a constant rate (without --warmup-epochs)."""
    warmup = warmup_steps(cfg, steps_per_epoch)
    if cfg.schedule in ("cosine", "linear") or (cfg.schedule == "constant" and warmup):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg.schedule, total_steps, warmup,
                                                                                  cfg.linear_ends))
    if cfg.schedule == "onecycle":
        # its own warm-up is the first 30% of the steps; --warmup-epochs sets it: the peak at step `warmup` (torch's
        # peak is at step pct_start x total - 1, and its warm-up must be at least a step long)
        start = 0.3 if warmup is None else min(0.99, (max(warmup, 1) + 1) / max(total_steps, 1))
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, pct_start=start)
    return None


def warmup_steps(cfg: RunConfig, steps_per_epoch: int) -> int | None:
    """The steps of --warmup-epochs, or None when it is not given (each schedule's own warm-up, if any)."""
    return None if cfg.warmup_epochs is None else round(cfg.warmup_epochs * max(1, steps_per_epoch))


def schedule_factor(schedule: str, total_steps: int, warmup: int | None = None,
                    linear_ends: tuple[float, float] | list[float] = (0.0, 0.0)) -> Callable[[int], float]:
    """The learning-rate factor by step of a constant, cosine or linear schedule over total_steps; with warmup
    steps, a linear warm-up over them first and the schedule over the steps after; linear_ends: the linear
    schedule's factors at its start and end."""
    if schedule == "linear":
        return partial(linear_schedule, total_steps=total_steps, warmup_steps=warmup, ends=tuple(linear_ends))
    after = {"cosine": cosine_schedule, "constant": lambda step, total_steps: 1.0}[schedule]
    return partial(warmed_up, after=after, total_steps=total_steps, warmup=warmup or 0)


def warmed_up(step: int, after: Callable[..., float], total_steps: int, warmup: int) -> float:
    """A linear warm-up over the first `warmup` steps (from 1/(warmup+1) up), then `after` over the rest."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return after(step - warmup, total_steps=max(1, total_steps - warmup))


def cosine_schedule(step: int, total_steps: int) -> float:
    """Half a cosine from 1 down to 0 at total_steps."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def linear_schedule(step: int, total_steps: int, warmup: float = 0.2, warmup_steps: int | None = None,
                    ends: tuple[float, float] = (0.0, 0.0)) -> float:
    """The learning-rate factor at a step: linear warm-up over the first `warmup` of the steps (or over
    warmup_steps), then linear decay to zero at total_steps (the triangle of the CIFAR-10 speed runs); ends
    (start, end): rise from start instead of zero and fall to end (airbench: 0.2 and 0.07)."""
    start, end = ends
    peak = max(1.0, warmup * total_steps) if warmup_steps is None else float(warmup_steps)
    if step < peak:
        return start + (1 - start) * ((step + 1) / (peak + 1))
    return end + (1 - end) * max(0.0, (total_steps - step) / max(1.0, total_steps - peak))


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's loss weight for --balance weights: images / (classes x its images), so that every class adds
    the same to the loss of an epoch and an image of the average class weighs 1 (a class without images: 0)."""
    counts = torch.bincount(labels.to(torch.int64), minlength=num_classes).to(torch.float32)
    present = int((counts > 0).sum())
    weights = torch.zeros(num_classes)
    weights[counts > 0] = counts.sum() / (present * counts[counts > 0])
    return weights


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Training steps of the whole run: cfg.epochs full epochs, or fewer when cfg.max_steps cuts the last one."""
    steps = cfg.epochs * max(1, steps_per_epoch)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def run_epochs(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Epochs the run trains: cfg.epochs, or fewer when cfg.max_steps ends it sooner (the last one may be cut)."""
    return math.ceil(total_steps(cfg, steps_per_epoch) / max(1, steps_per_epoch))


def resized_side(cfg: RunConfig, epoch: int, epochs: int) -> int | None:
    """The shorter side training images are scaled down to in this epoch (--progressive-resize: the sizes given for
    the first epochs), or None for full size: after those epochs, and always in the run's last epoch, which then
    trains at the size the run is evaluated at."""
    sizes = cfg.resize_sizes
    return sizes[epoch - 1] if epoch <= len(sizes) and epoch < epochs else None


def scaled_size(size: tuple[int, int] | torch.Size, side: int) -> tuple[int, int]:
    """(H, W) scaled so that the shorter side is `side` pixels (as torchvision's Resize(int)), at least 1 each."""
    height, width = int(size[0]), int(size[1])
    shorter = min(height, width)
    return max(1, round(height * side / shorter)), max(1, round(width * side / shorter))


def downscale(x: torch.Tensor, side: int | None) -> torch.Tensor:
    """A float batch scaled down to a shorter side of `side` pixels: bilinear, antialiased (each pixel averages the
    ones it covers, as Pillow's resize does); as it is when side is None or not smaller. Deterministic."""
    if side is None or side >= min(x.shape[-2:]):
        return x
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    small = nn.functional.interpolate(x, size=scaled_size(x.shape[-2:], side), mode="bilinear", align_corners=False,
                                      antialias=True)
    return small.contiguous(memory_format=layout)


def fit(model: nn.Module, train_loader: Loader, val_loader: Loader | None, cfg: RunConfig, run_dir: Path,
        weights_meta: dict[str, Any], state: dict[str, Any] | None = None, deadline: Deadline | None = None,
        board: TensorBoardLog | None = None, class_weights: torch.Tensor | None = None,
        compute: Compute | None = None) -> FitResult:
    """Train for cfg.epochs (or until early stopping), from scratch or a saved state; write results.csv,
    weights/{last,best}.pt and train_state.pt. deadline (--time-budget): re-plan at each epoch end from the speed
    so far; board: TensorBoard's log of each step and epoch; class_weights: each class's weight in the loss
    (--balance weights); compute: the run's (default: from cfg)."""
    compute = compute or Compute.of(cfg)
    parts = _training_parts(model, train_loader, cfg, compute)
    optimizer, scheduler, averager = parts.optimizer, parts.scheduler, parts.averager
    loss_fn = _loss_function(cfg, class_weights, compute.device)
    evaluated = averager.model if averager else model  # the averaged weights are the ones validated and saved
    progress = Progress() if state is None else restore_state(state, parts, cfg)
    # a resumed run keeps the rows of its state; only the main process writes files
    results = ResultsLog(run_dir / "results.csv", progress.history) if distributed.is_main() else None
    saver = StateSaver(run_dir, cfg, lambda p: _checked_state(parts, p, saver.cfg, weights_meta))
    epochs = run_epochs(cfg, len(train_loader))
    clock: dict[str, float] = {}  # when the first batch was drawn and the last step done (see _timed)
    if board is not None:
        board.start(progress.epoch, progress.step, progress.loss_sum, progress.seen, len(train_loader))
    with StopSignals() as stop:

        def after_step() -> None:  # a safe point: stop here when asked to, save the state when due
            if board is not None:
                board.log_step(progress.epoch, progress.step, progress.loss_sum, progress.seen,
                               optimizer.param_groups[0]["lr"])
            if _stop_if_any(stop, saver.due()):
                saver.save(progress)

        try:
            while not progress.finished(epochs, cfg.patience):
                epoch = progress.epoch
                side = _start_epoch(model, cfg, epoch, epochs)
                if progress.step == 0:  # a new epoch; a resumed one goes on from its loader's saved position
                    train_loader.set_epoch(epoch)
                    progress.start_epoch(optimizer.param_groups[0]["lr"])
                _timed(clock, train_one_epoch, _step_function(parts, loss_fn, cfg, compute, side), train_loader,
                       progress, epochs, after_step, max_steps=_steps_in_epoch(cfg, epoch, len(train_loader)))
                _check_finite(model, progress)  # before validating or saving: see _check_finite
                epoch_end_started = time.perf_counter()
                val = _validate(evaluated, val_loader, compute, stop) if val_loader else None
                row, rate = _epoch_row(progress, epoch, val)
                improved = progress.end_epoch(row, _selection_metric(cfg, epoch, val), candidate=side is None)
                _record_epoch(row, improved, board, results, evaluated, weights_meta, run_dir)
                if deadline is not None and not progress.finished(epochs, cfg.patience):
                    # the new plan: the state saved next records it, and the loop runs to it
                    cfg = saver.cfg = deadline.replan(cfg, progress, len(train_loader),
                                                      time.perf_counter() - epoch_end_started, scheduler, averager)
                epochs = run_epochs(cfg, len(train_loader))
                saver.save(progress)  # the commit point: a run killed before it redoes this epoch's end
                _log_epoch(row, epochs, rate)
                _stop_if_any(stop)
        except Exception as exc:
            if stop.requested is None or isinstance(exc, TrainingDiverged):
                raise
            # StopRequested at a safe point, or the data loader failing because the signal reached its workers
            raise _interrupted(saver, progress, stop.requested) from (None if isinstance(exc, StopRequested) else exc)
    return _fit_result(progress, cfg, epochs, clock)


def _selection_metric(cfg: RunConfig, epoch: int, val: EvalResult | None) -> float:
    """What best.pt is chosen by: the validation accuracy; without validation, or with --select last, the epoch
    number (the last epoch is the best). An epoch on scaled-down images is never a candidate (see fit)."""
    return val.accuracy if val and cfg.select == "val" else float(epoch)


def _timed(clock: dict[str, float], train: Callable, *args: Any, **kwargs: Any) -> None:
    """Run an epoch's steps, noting in clock when the run's first one started ("first") and the last one ended."""
    clock.setdefault("first", time.perf_counter())
    train(*args, **kwargs)
    clock["last"] = time.perf_counter()


def _start_epoch(model: nn.Module, cfg: RunConfig, epoch: int, epochs: int) -> int | None:
    """What trains in this epoch: the backbone after the frozen epochs, a whitened stem's bias in its first ones;
    returns the shorter side its images are scaled down to (None: full size)."""
    hooks.set_frozen(model, cfg.freeze or epoch <= cfg.freeze_epochs)
    if cfg.whiten_bias_epochs:
        hooks.freeze_whitening_bias(model, epoch > cfg.whiten_bias_epochs)
    return resized_side(cfg, epoch, epochs)


def _training_parts(model: nn.Module, train_loader: Loader, cfg: RunConfig, compute: Compute) -> TrainParts:
    """The model on its device, its optimiser, schedule, gradient scaler and weight average."""
    model.to(device=compute.device, memory_format=compute.memory_format)
    optimizer = OPTIMIZERS[cfg.optimizer](parameter_groups(model, cfg), cfg, optimizer_kernels(compute.device))
    log.info(f"compute: {compute.describe()}")
    scheduler = build_scheduler(cfg, optimizer, total_steps(cfg, len(train_loader)), len(train_loader))
    scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.dtype == torch.float16)
    averager = make_averager(model, cfg.ema, cfg.lookahead, total_steps(cfg, len(train_loader)))
    return TrainParts(model, optimizer, scheduler, scaler, train_loader, averager)


def _step_function(parts: TrainParts, loss_fn: nn.Module, cfg: RunConfig, compute: Compute,
                   side: int | None = None) -> Callable:
    """An epoch's training step on the model as data-parallel training wraps it (itself in one process), then the
    weight average's update; side: its batches scaled down to this shorter side first (--progressive-resize)."""
    step = make_step(distributed.wrap_model(parts.model, cfg.sync_bn), parts.optimizer, parts.scheduler, parts.scaler,
                     loss_fn, cfg.grad_clip, compute.device, compute.dtype, compute.memory_format, side=side)
    return averaged_step(step, parts.averager)


def _loss_function(cfg: RunConfig, class_weights: torch.Tensor | None, device: torch.device) -> nn.Module:
    """The training loss: cross-entropy with the run's label smoothing and (--balance weights) class weights."""
    return nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device),
                               label_smoothing=cfg.label_smoothing)


def _steps_in_epoch(cfg: RunConfig, epoch: int, steps_per_epoch: int) -> int:
    """The steps an epoch runs: all its batches, or fewer when cfg.max_steps cuts the run's last epoch."""
    return min(steps_per_epoch, total_steps(cfg, steps_per_epoch) - (epoch - 1) * steps_per_epoch)


def _validate(model: nn.Module, loader: Loader, compute: Compute, stop: StopSignals) -> EvalResult:
    """An epoch's validation: one view per image (the test-time augmentation's 2 or 6 views are for the final
    evaluation); a stop signal interrupts it in a single process (one process stopping in the middle of
    validation would leave the others waiting for its sums)."""
    interrupt = None if distributed.context().distributed else stop.check
    return evaluate(model, loader, compute.device, compute.dtype, compute.memory_format, interrupt=interrupt)


def _epoch_row(progress: Progress, epoch: int, val: EvalResult | None) -> tuple[dict[str, Any], float]:
    """results.csv's row of the epoch (its sums first added over all processes' shards) and its images a second."""
    progress.loss_sum, progress.correct, progress.seen = distributed.sum_over_processes(
        progress.loss_sum, progress.correct, progress.seen)
    row = {"epoch": epoch, "train_loss": progress.loss_sum / max(progress.seen, 1),
           "train_acc": progress.correct / max(progress.seen, 1), "val_loss": val.loss if val else None,
           "val_acc": val.accuracy if val else None, "lr": progress.lr, "seconds": round(progress.seconds, 3)}
    return row, progress.seen / progress.seconds if progress.seconds > 0 else 0.0


def _record_epoch(row: dict[str, Any], improved: bool, board: TensorBoardLog | None, results: ResultsLog | None,
                  model: nn.Module, meta: dict[str, Any], run_dir: Path) -> None:
    """The epoch's row for TensorBoard and (the main process) results.csv; weights/last.pt, and best.pt when the
    epoch improved on the best."""
    if board is not None:
        board.log_epoch(row)
    if results is None:
        return
    results.append(row)
    weights = _weights(model, meta, row["epoch"], row)
    save_atomic(weights, run_dir / "weights" / "last.pt")
    if improved:
        save_atomic(weights, run_dir / "weights" / "best.pt")


def _stop_if_any(stop: StopSignals, save_due: bool = False) -> bool:
    """Raise StopRequested in every process when a stop signal reached any of them; returns whether a save is due
    in any of them (one collective, so that all processes stop and save at the same step)."""
    stop_now, save_now = distributed.agree(stop.requested is not None, save_due)
    if stop_now:
        stop.requested = stop.requested or "a stop signal to another process"
        stop.check()
    return save_now


def _fit_result(progress: Progress, cfg: RunConfig, epochs: int, clock: dict[str, float]) -> FitResult:
    stopped_early = progress.stopped_early(epochs, cfg.patience)
    if stopped_early:
        log.info(f"early stop: no better validation accuracy for {cfg.patience} epochs (best: epoch {progress.best_epoch})")
    rate = progress.images_seen / progress.train_seconds if progress.train_seconds > 0 else 0.0
    return FitResult(best_epoch=progress.best_epoch, best_val_accuracy=progress.best_val_accuracy,
                     epochs_run=len(progress.history), train_seconds=progress.train_seconds, images_per_second=rate,
                     stopped_early=stopped_early, history=list(progress.history),
                     first_batch_at=clock.get("first"), last_batch_at=clock.get("last"))


def _checked_state(parts: TrainParts, progress: Progress, cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The training state to save; non-finite weights are never saved (training stops instead)."""
    _check_finite(parts.model, progress)
    if progress.step and parts.loader.state_dict()["batches_done"] != progress.step:
        raise RuntimeError(f"the loader drew {parts.loader.state_dict()['batches_done']} batches but "
                           f"{progress.step} steps ran: the state would not resume exactly")
    return capture_state(parts, progress, cfg, meta)


def _interrupted(saver: StateSaver, progress: Progress, signal_name: str) -> Interrupted:
    """Save the state at the last completed step; the error says how to resume."""
    path = saver.save(progress)
    where = f"epoch {progress.epoch}, step {progress.step}" if progress.step else f"the end of epoch {progress.epoch - 1}"
    return Interrupted(f"stopped by {signal_name} at {where}; the training state is saved in {path}; resume with: "
                       f"imgrec train --resume {shlex.quote(str(saver.run_dir))}")


def _check_finite(model: nn.Module, progress: Progress) -> None:
    """Stop training when the weights are not finite: an epoch's last update can make them so while its own loss
    was finite, and such weights are never validated or saved (NaN logits can even score a "better" accuracy and
    replace best.pt)."""
    if not _all_finite(model):
        raise TrainingDiverged(f"training diverged: the weights are not finite at epoch {progress.epoch}, step "
                               f"{progress.step}; lower --lr or add --grad-clip")


def make_step(model, optimizer, scheduler, scaler, loss_fn, grad_clip, device, dtype, memory_format, side=None):
    """One optimisation step on a batch: returns (loss, correct predictions) as tensors. The targets are labels,
    or probabilities (B, num_classes) for a mixed batch (the cross-entropy takes both). side: the (augmented,
    normalised) batch is scaled down to this shorter side on the device first (--progressive-resize)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = downscale(x.to(device, non_blocking=True, memory_format=memory_format), side)
        y = y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)  # (B, C, H, W) -> (B, num_classes)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        # mixed batches (MixUp/CutMix) have probabilities as targets: accuracy against each image's main label
        labels = y if y.ndim == 1 else y.argmax(1)
        return loss.detach(), (logits.argmax(1) == labels).sum()

    return step


def train_one_epoch(step_fn: Callable, loader: Loader, progress: Progress, epochs: int,
                    after_step: Callable[[], None] = lambda: None, max_steps: int | None = None) -> None:
    """Run the rest of an epoch's steps (up to max_steps of them, default all), adding to progress's running sums;
    after_step runs after each one (the state may be saved there). Stops at a non-finite loss."""
    limit = len(loader) if max_steps is None else max_steps
    if progress.step >= limit:
        return
    total_loss = torch.tensor(progress.loss_sum, dtype=torch.float64)
    correct = torch.tensor(progress.correct, dtype=torch.int64)
    start, seconds_before = time.perf_counter(), progress.seconds
    hidden = (None if progress_bars is None else not progress_bars) if distributed.is_main() else True
    bar = tqdm(loader, total=limit, initial=progress.step, desc=f"epoch {progress.epoch}/{epochs}", unit="batch",
               leave=False, disable=hidden, file=sys.stderr, dynamic_ncols=True)
    for x, y in bar:
        loss, hits = step_fn(x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss is {loss.item()} at epoch {progress.epoch}, step "
                                   f"{progress.step + 1}; lower --lr or add --grad-clip")
        total_loss += loss.cpu().double() * len(y)
        correct += hits.cpu()
        progress.step += 1
        progress.seen += len(y)
        progress.loss_sum, progress.correct = total_loss.item(), int(correct.item())
        progress.seconds = seconds_before + time.perf_counter() - start
        if progress.step % 25 == 0 or progress.step == limit:
            rate = progress.seen / max(progress.seconds, 1e-9)
            bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.4f}", acc=f"{progress.correct / progress.seen:.2%}",
                            img_s=f"{rate:.0f}")
        after_step()
        if progress.step >= limit:
            break
    bar.close()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, device: torch.device, dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, collect: bool = False,
             interrupt: Callable[[], None] | None = None, tta: str = "none") -> EvalResult:
    """Mean cross-entropy and accuracy over a loader (in eval mode); optionally keep logits and targets.
    interrupt runs after each batch (it may raise to stop the evaluation); tta: the logits are the mean of each
    image's and its left-right mirror image's."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    all_logits, all_targets = [], []
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = tta_logits(model, x, tta)
            total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
            if collect:
                all_logits.append(logits.cpu())
                all_targets.append(y.cpu())
            if interrupt is not None:
                interrupt()
    finally:
        model.train(was_training)
    if not collect:  # each process evaluated its shard of the split: the sums over all of them (collect: its own)
        total_loss, correct, count = distributed.sum_over_processes(total_loss, correct, count)
    result = EvalResult(total_loss / max(count, 1), correct / max(count, 1), count)
    if collect:
        result.logits, result.targets = torch.cat(all_logits), torch.cat(all_targets)
    return result


UNSURE_FRACTION = 0.25  # --tta unsure: the 6 views for this fraction of each batch, the least confident in one view
TTA_VIEWS = {"none": 1, "flip": 2, "flip-translate": 6, "unsure": 1 + 6 * UNSURE_FRACTION}  # forward passes per image


def tta_logits(model: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """float32 logits of a batch under test-time augmentation: none; flip (the mean of each image's and its mirror
    image's); flip-translate (airbench's: half the flip mean, half the flip means of the image shifted one pixel
    up-left and down-right, borders reflected); unsure (the plain view, and flip-translate's instead for the
    UNSURE_FRACTION of the batch with the lowest top probability in it: a fraction, not a probability threshold,
    since label smoothing caps how confident a model gets)."""
    if mode not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {mode!r}")
    logits = model(x).float()
    if mode == "none":
        return logits
    if mode == "unsure":
        unsure = logits.softmax(1).amax(1).argsort(stable=True)[: math.ceil(UNSURE_FRACTION * len(x))]
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        logits[unsure] = tta_logits(model, x[unsure].contiguous(memory_format=layout), "flip-translate")
        return logits
    logits = (logits + model(x.flip(-1)).float()) / 2
    if mode == "flip":
        return logits
    height, width = x.shape[-2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    for view in (padded[..., :height, :width], padded[..., 2:, 2:]):
        view = view.contiguous(memory_format=layout)
        logits = logits + (model(view).float() + model(view.flip(-1)).float()) / 4
    return logits / 2


def _all_finite(model: nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite (one device sync)."""
    checks = [torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def _weights(model: nn.Module, meta: dict[str, Any], epoch: int, row: dict[str, Any]) -> dict[str, Any]:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metrics = {k: v for k, v in row.items() if v is not None and k != "epoch"}
    return {"format_version": FORMAT_VERSION, **meta, "state_dict": state, "epoch": epoch, "metrics": metrics}


def _log_epoch(row: dict[str, Any], epochs: int, rate: float) -> None:
    val = f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.2%}" if row["val_acc"] is not None else ""
    log.info(f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.2%}"
             f"{val}  lr {row['lr']:.3g}  {row['seconds']:.1f}s  {rate:,.0f} img/s")
