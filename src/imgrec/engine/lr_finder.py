"""The learning-rate range test (Smith 2015; fastai's lr_find): train a copy of the model for a few hundred
steps while the rate grows exponentially, follow the smoothed loss, stop once it diverges, and suggest a rate.

The suggestion is a third of the rate at which the smoothed loss is lowest (see suggest); the model, its
optimiser settings and the global random generators are left as they were.
Imports: torch and the engine.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.averaging import averaged_step
from imgrec.engine.system import Compute
from imgrec.engine.trainer import OPTIMIZERS, Loader, make_step, optimizer_kernels, parameter_groups
from imgrec.models import hooks

SMOOTHING = 0.9  # the running average of the loss that decides divergence (bias-corrected)
MINIMUM_FACTOR = 3.0  # the suggestion is the rate at the loss's minimum divided by this
DIVERGED = 4.0  # the test stops when the smoothed loss exceeds this multiple of its minimum


@dataclass
class RangeTest:
    """The rates tried, the smoothed loss at each, and the suggested rate."""

    lrs: list[float]
    losses: list[float]  # each step's own loss
    smoothed: list[float]  # the losses' centred mean (what the suggestion is read from)
    suggestion: float
    minimum: float  # the rate at the smoothed loss's minimum
    diverged: bool  # the test stopped because the loss diverged (else it ran all its steps)

    def to_dict(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "minimum": self.minimum, "diverged": self.diverged,
                "steps": len(self.lrs), "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed}


def range_test(model: nn.Module, loader: Loader, cfg: RunConfig, steps: int = 200, start_lr: float = 1e-7,
               end_lr: float = 10.0, class_weights: torch.Tensor | None = None,
               compute: Compute | None = None) -> RangeTest:
    """Train a copy of model on loader's batches (epoch after epoch if it has too few) with cfg's optimiser,
    the rate rising from start_lr to end_lr over steps; stop at divergence. Nothing of model changes."""
    if not 0 < start_lr < end_lr:
        raise ValueError("the range test needs 0 < start_lr < end_lr")
    compute = compute or Compute.of(cfg)
    device, dtype, memory_format = compute.device, compute.dtype, compute.memory_format
    probe = copy.deepcopy(model).to(device=device, memory_format=memory_format).train()
    hooks.set_frozen(probe, cfg.freeze)  # the rate is for the whole model, as it trains after any frozen epochs
    optimizer = OPTIMIZERS[cfg.optimizer](parameter_groups(probe, cfg), cfg, optimizer_kernels(device))
    growth = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    # every parameter group keeps its ratio to cfg.lr (lower rates for early backbone layers, for one)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: start_lr / cfg.lr * growth ** i)
    loss_fn = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device),
                                  label_smoothing=cfg.label_smoothing)
    step = averaged_step(make_step(probe, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=False),
                                    loss_fn, cfg.grad_clip, device, dtype, memory_format), None)
    lrs: list[float] = []
    raw: list[float] = []
    average, best, diverged, epoch = 0.0, math.inf, False, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws: training's own
        while len(lrs) < steps and not diverged:
            epoch += 1
            loader.set_epoch(epoch)
            for x, y in loader:
                rate = start_lr * growth ** len(lrs)
                loss = float(step(x, y)[0])
                if not math.isfinite(loss):
                    diverged = True
                    break
                average = SMOOTHING * average + (1 - SMOOTHING) * loss
                smoothed = average / (1 - SMOOTHING ** (len(lrs) + 1))
                lrs.append(rate)
                raw.append(loss)
                best = min(best, smoothed)
                if len(lrs) > 10 and smoothed > DIVERGED * best:
                    diverged = True
                    break
                if len(lrs) >= steps:
                    break
    if len(lrs) < 3:
        raise ValueError("the range test needs at least 3 steps that did not diverge")
    suggestion, minimum = suggest(lrs, raw)
    return RangeTest(lrs, raw, centred_mean(raw, max(2, len(raw) // 25)), suggestion, minimum, diverged)


def centred_mean(values: list[float], half_width: int) -> list[float]:
    """Each value replaced by the mean of those within half_width steps of it (fewer at the ends): smoothing
    without the lag of a running average, which would put the loss of earlier, lower rates at later ones."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    n = len(values)
    return [(sums[min(n, i + half_width + 1)] - sums[max(0, i - half_width)])
            / (min(n, i + half_width + 1) - max(0, i - half_width)) for i in range(n)]


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(suggested rate, rate at the minimum) from each step's loss: the minimum of the loss smoothed over a
    window of a twelfth of the steps (past the first tenth), divided by MINIMUM_FACTOR.

    The loss at a step is that of all the steps before it, so its minimum comes after the best constant rate:
    on problems whose best rate is known (a grid of short runs; tests/engine/test_lr_finder.py) it is two to
    three times that rate."""
    smoothed = centred_mean(losses, max(2, len(losses) // 25))
    low = min(len(lrs) // 10, len(lrs) - 1)
    at_min = low + min(range(len(smoothed) - low), key=lambda i: smoothed[low + i])
    return lrs[at_min] / MINIMUM_FACTOR, lrs[at_min]
