"""Weight averaging: an exponential moving average (EMA) of a model's weights, kept beside the trained model.

The averaged copy is what fit() validates and saves (best.pt, last.pt), so evaluation and prediction use it; the
trained model keeps taking the optimiser's steps. Its state is part of train_state.pt (state.py), so a resumed
run continues the same average. Averaging smooths the noise of the last steps of a high-learning-rate run, the
reason the CIFAR-10 speed runs keep one (Page's ResNet-9, hlb-CIFAR10). Imports: torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """EMA of a model's parameters and floating-point buffers (BatchNorm statistics), updated after every step.

    The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates, so the average follows the fast early
    changes instead of remembering the random initial weights for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._source = model

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the trained model's current weights."""
        decay = self.current_decay()
        averaged = self.model.state_dict()
        floats_avg, floats_new = [], []
        for name, value in self._source.state_dict().items():
            if value.is_floating_point():
                floats_avg.append(averaged[name])
                floats_new.append(value.detach())
            else:  # counters such as BatchNorm's num_batches_tracked
                averaged[name].copy_(value)
        torch._foreach_lerp_(floats_avg, floats_new, 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count, as the training state stores them."""
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() of the same model."""
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.model.load_state_dict(state["model"])


class Lookahead(WeightAverage):
    """airbench's lookahead: every `every` steps the slow copy (self.model) moves toward the trained weights by
    1 - d, then the trained model restarts from it; d = base^every * (t / total_steps)^3 after t steps, so early
    updates follow the trained weights almost entirely and late ones keep most of the slow copy (d -> 0.77). The
    last step always updates. The slow copy is what is validated and saved, as with the EMA."""

    def __init__(self, model: nn.Module, total_steps: int, base: float = 0.95, every: int = 5) -> None:
        super().__init__(model, decay=base)
        self.total_steps, self.every = max(1, total_steps), every

    def current_decay(self) -> float:
        """The decay the update at the next step uses (applied only every `every` steps)."""
        t = min(self.updates + 1, self.total_steps)
        return self.decay**self.every * (t / self.total_steps) ** 3

    @torch.no_grad()
    def update(self) -> None:
        """Count the step; on every `every`-th (and the last) move the slow copy, then reset the model to it."""
        decay = self.current_decay()
        self.updates += 1
        if self.updates % self.every and self.updates < self.total_steps:
            return
        slow = self.model.state_dict()
        pairs = [(slow[name], value.detach()) for name, value in self._source.state_dict().items()]
        floats = [(s, v) for s, v in pairs if v.is_floating_point()]
        torch._foreach_lerp_([s for s, _ in floats], [v for _, v in floats], 1 - decay)
        for s, v in pairs:
            if v.is_floating_point():
                v.copy_(s)  # the trained model continues from the slow weights
            else:
                s.copy_(v)  # counters such as BatchNorm's num_batches_tracked: the trained model's

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "total_steps": self.total_steps, "every": self.every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.total_steps, self.every = int(state["total_steps"]), int(state["every"])


def make_averager(model: nn.Module, ema: float, lookahead: bool, total_steps: int) -> WeightAverage | None:
    """The run's weight average: an EMA (ema > 0), lookahead, or none."""
    if lookahead:
        return Lookahead(model, total_steps)
    return WeightAverage(model, ema) if ema else None


def averaged_step(step_fn: Callable, averager: WeightAverage | None) -> Callable:
    """The training step followed by an update of the average (the step itself when there is no average)."""
    if averager is None:
        return step_fn

    def step(x: torch.Tensor, y: torch.Tensor) -> Any:
        out = step_fn(x, y)
        averager.update()
        return out

    return step
