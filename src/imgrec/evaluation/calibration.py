"""Temperature scaling: one scalar T that divides the logits so softmax confidences match accuracy.

Fitted on the validation split by minimising the cross-entropy of logits / T (Guo et al. 2017,
https://arxiv.org/abs/1706.04599). T > 1 softens an over-confident model; predictions (the argmax) never
change. Imports: torch and evaluation.metrics.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from imgrec.evaluation.metrics import calibration_bins, ece, reliability_table

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 100.0
MIN_FIT_IMAGES = 50  # fewer validation images, and no temperature is fitted


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean cross-entropy of logits / T (1.0 for no examples)."""
    if len(targets) == 0:
        return 1.0
    # clones: logits collected under torch.inference_mode cannot take part in autograd
    logits = logits.detach().cpu().double().clone()
    targets = targets.detach().cpu().to(torch.int64).clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # optimise log T: T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    # a validation split the model gets all right drives T towards 0; the clamp keeps the scores usable
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


class TemperatureChoice(NamedTuple):
    """A validation split's temperature (None: none worth keeping), its ECE before and after it, and why none."""

    temperature: float | None
    ece_before: float
    ece_after: float
    why_not: str = ""


def choose_temperature(logits: torch.Tensor, targets: torch.Tensor) -> TemperatureChoice:
    """The temperature worth keeping for these validation logits, or None and why: one scalar fitted to a handful
    of images fits their noise (2 images gave T = 0.05 and a validation ECE of 46% from 0.5%), a split the model
    gets all right only drives T to its floor, and a T that raises the split's own ECE would make it worse."""
    count = len(targets)
    before = ece(logits, targets)
    if count < MIN_FIT_IMAGES:
        return TemperatureChoice(None, before, before,
                                 f"{count} validation images are too few to fit one (at least {MIN_FIT_IMAGES})")
    if bool((logits.argmax(1) == targets.to(logits.device)).all()):
        return TemperatureChoice(None, before, before,
                                 "the model gets every validation image right: there is nothing to fit it on")
    temperature = fit_temperature(logits, targets)
    after = ece(logits / temperature, targets)
    if after > before:
        return TemperatureChoice(None, before, before, f"T = {temperature:.3f} would raise the validation ECE "
                                                       f"({before:.2%} -> {after:.2%})")
    return TemperatureChoice(temperature, before, after)


def apply_temperature(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """logits / T (unchanged when no temperature was fitted)."""
    return logits if temperature is None else logits / temperature


def calibration_summary(logits: torch.Tensor, targets: torch.Tensor, temperature: float | None) -> dict[str, Any]:
    """ECE and loss before and, when a temperature was fitted, after dividing the logits by it."""
    logits, targets = logits.detach().double().cpu(), targets.detach().cpu().to(torch.int64)
    summary: dict[str, Any] = {"temperature": temperature, "fitted_on": "val" if temperature else None,
                               "ece_before": ece(logits, targets), "loss_before": _loss(logits, targets)}
    if temperature:
        scaled = logits / temperature
        summary.update(ece_after=ece(scaled, targets), loss_after=_loss(scaled, targets),
                       reliability_after=reliability_table(*calibration_bins(scaled, targets)))
    return summary


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, targets)) if len(targets) else 0.0
