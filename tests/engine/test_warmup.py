"""--warmup-epochs: a linear warm-up in front of every schedule; without it every schedule is as before."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.trainer import build_scheduler, linear_schedule
from imgrec.errors import UsageError

STEPS, EPOCHS, LR = 10, 5, 0.1  # steps per epoch, epochs, peak rate
TOTAL = STEPS * EPOCHS


def lr_curve(steps_per_epoch: int = STEPS, **settings: Any) -> list[float]:
    """The rate of each training step of a run."""
    cfg = RunConfig(**{"epochs": EPOCHS, "lr": LR, "device": "cpu", **settings})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(cfg, opt, TOTAL, steps_per_epoch)
    rates = []
    for _ in range(TOTAL):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "onecycle"])
def test_every_schedule_warms_up_over_the_given_epochs(schedule: str) -> None:
    rates = lr_curve(schedule=schedule, warmup_epochs=1.5)  # 15 steps
    warm = rates[:16]
    assert all(a < b for a, b in zip(warm, warm[1:])), warm  # rising all through the warm-up...
    assert rates[15] == pytest.approx(LR) and max(rates) == pytest.approx(LR)  # ...to the peak at step 15
    assert rates[0] < LR / 10 if schedule != "onecycle" else rates[0] == pytest.approx(LR / 25)
    if schedule == "constant":
        assert rates[15:] == pytest.approx([LR] * (TOTAL - 15))
    if schedule == "cosine":  # the cosine runs over the 35 steps after the warm-up
        assert rates[15:] == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * s / 35)) for s in range(35)])
    if schedule == "linear":
        assert rates[15:] == pytest.approx([LR * (35 - s) / 35 for s in range(35)])
    if schedule != "constant":
        assert all(a >= b for a, b in zip(rates[15:], rates[16:])) and rates[-1] < LR / 10


def test_warmup_is_counted_in_epochs_of_the_run() -> None:
    rates = lr_curve(steps_per_epoch=20, schedule="constant", warmup_epochs=1)  # 20 steps of warm-up
    assert rates[19] < LR and rates[20] == pytest.approx(LR)


def test_without_the_flag_every_schedule_is_unchanged() -> None:
    assert lr_curve(schedule="constant") == [LR] * TOTAL
    assert lr_curve(schedule="linear") == pytest.approx([LR * linear_schedule(s, TOTAL) for s in range(TOTAL)])
    assert max(range(TOTAL), key=lr_curve(schedule="linear").__getitem__) == 10  # its own first fifth
    assert lr_curve(schedule="cosine")[0] == pytest.approx(LR)
    onecycle = lr_curve(schedule="onecycle")
    assert max(range(TOTAL), key=onecycle.__getitem__) == 14  # torch's 30%: step 0.3 x 50 - 1
    assert lr_curve(schedule="linear", warmup_epochs=0)[0] == pytest.approx(LR)  # 0: no warm-up at all


def test_warmup_epochs_is_checked() -> None:
    for bad in (-1, 5, 7.5):
        with pytest.raises(UsageError, match="--warmup-epochs"):
            RunConfig(epochs=5, warmup_epochs=bad)
