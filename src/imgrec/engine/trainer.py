"""The training loop: fit -> train_one_epoch -> evaluate, with checkpoints and results.csv each epoch.

fit() gets a model, a training loader, an optional validation loader, the RunConfig and a run folder. It
knows nothing of where batches come from: a loader is anything with __iter__ over (images, labels),
__len__, num_samples and set_epoch(epoch).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from imgrec.config import RunConfig
from imgrec.engine.checkpoint import FORMAT_VERSION, save_atomic
from imgrec.engine.runs import ResultsLog
from imgrec.engine.system import autocast, autocast_dtype, select_device
from imgrec.errors import ImgrecError

log = logging.getLogger(__name__)


class Loader(Protocol):
    num_samples: int

    def __iter__(self) -> Any: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


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


OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], RunConfig], torch.optim.Optimizer]] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay, foreach=True),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay, foreach=True),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0,
                                        weight_decay=c.weight_decay, foreach=True),
}


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """A per-step learning-rate schedule, or None for a constant rate."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps)
    return None


def fit(model: nn.Module, train_loader: Loader, val_loader: Loader | None, cfg: RunConfig, run_dir: Path,
        weights_meta: dict[str, Any]) -> FitResult:
    """Train for cfg.epochs (or until early stopping); write results.csv and weights/{last,best}.pt."""
    device = select_device(cfg.device)
    dtype = autocast_dtype(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    # A model with parameter_groups (a TransferModel) gets lower learning rates for its earlier layers
    groups = getattr(model, "parameter_groups", None)
    optimizer = OPTIMIZERS[cfg.optimizer](groups(cfg.lr, cfg.lr_backbone_mult) if groups else model.parameters(), cfg)
    scheduler = build_scheduler(cfg, optimizer, cfg.epochs * max(1, len(train_loader)))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    results = ResultsLog(run_dir / "results.csv")
    step_fn = _make_step(model, optimizer, scheduler, scaler, loss_fn, cfg.grad_clip, device, dtype, memory_format)
    out = FitResult(best_epoch=0, best_val_accuracy=None, epochs_run=0, train_seconds=0.0, images_per_second=0.0,
                    stopped_early=False)
    best, stale, images_seen = -math.inf, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        train_loader.set_epoch(epoch)
        if hasattr(model, "set_frozen"):  # the backbone trains only after the frozen epochs
            model.set_frozen(cfg.freeze or epoch <= cfg.freeze_epochs)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train_loss, train_acc, seen = train_one_epoch(step_fn, train_loader, epoch, cfg.epochs)
        seconds = time.perf_counter() - start
        out.train_seconds += seconds
        images_seen += seen
        # The epoch's last update can make the weights non-finite while its own loss was finite: never
        # validate or save such weights (NaN logits can even score a "better" accuracy and replace best.pt).
        if not _all_finite(model):
            raise ImgrecError(f"training diverged: the weights are not finite at epoch {epoch}, step {len(train_loader)}; "
                              f"lower --lr or add --grad-clip")
        val = evaluate(model, val_loader, device, dtype, memory_format) if val_loader is not None else None
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val.loss if val else None, "val_acc": val.accuracy if val else None,
               "lr": lr, "seconds": round(seconds, 3)}
        results.append(row)
        out.history.append(row)
        out.epochs_run = epoch
        metric = val.accuracy if val else float(epoch)  # no validation split: the last epoch is the best
        weights = _weights(model, weights_meta, epoch, row)
        save_atomic(weights, run_dir / "weights" / "last.pt")
        if metric > best:
            best, stale = metric, 0
            out.best_epoch, out.best_val_accuracy = epoch, val.accuracy if val else None
            save_atomic(weights, run_dir / "weights" / "best.pt")
        else:
            stale += 1
        _log_epoch(row, cfg.epochs, seen / seconds if seconds > 0 else 0.0)
        if cfg.patience and stale >= cfg.patience:
            log.info(f"early stop: no better validation accuracy for {cfg.patience} epochs (best: epoch {out.best_epoch})")
            out.stopped_early = True
            break
    out.images_per_second = images_seen / out.train_seconds if out.train_seconds > 0 else 0.0
    return out


def _make_step(model, optimizer, scheduler, scaler, loss_fn, grad_clip, device, dtype, memory_format):
    """One optimisation step on a batch: returns (loss, correct predictions) as tensors."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
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
        return loss.detach(), (logits.argmax(1) == y).sum()

    return step


def train_one_epoch(step_fn: Callable, loader: Loader, epoch: int, epochs: int) -> tuple[float, float, int]:
    """Run one epoch of steps; returns (mean loss, accuracy, images seen). Stops at a non-finite loss."""
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
               disable=None, file=sys.stderr, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar, start=1):
        loss, hits = step_fn(x, y)
        if not torch.isfinite(loss):
            raise ImgrecError(f"training diverged: the loss is {loss.item()} at epoch {epoch}, step {step}; "
                              f"lower --lr or add --grad-clip")
        total_loss += loss.cpu().double() * len(y)
        correct += hits.cpu()
        seen += len(y)
        if step % 25 == 0 or step == len(loader):
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}", img_s=f"{rate:.0f}")
    bar.close()
    return total_loss.item() / max(seen, 1), correct.item() / max(seen, 1), seen


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, device: torch.device, dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, collect: bool = False) -> EvalResult:
    """Mean cross-entropy and accuracy over a loader (in eval mode); optionally keep logits and targets."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    all_logits, all_targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x).float()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
        if collect:
            all_logits.append(logits.cpu())
            all_targets.append(y.cpu())
    model.train(was_training)
    result = EvalResult(total_loss / max(count, 1), correct / max(count, 1), count)
    if collect:
        result.logits, result.targets = torch.cat(all_logits), torch.cat(all_targets)
    return result


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
