"""Time budgets (--time-budget): measure a run's own speed at its start, then plan how many steps fit.

measure_speed() times a few training steps on a copy of the model (the model itself and every random generator are
left as they were) and one evaluation batch; plan_budget() turns the seconds left into a number of training steps,
whole epochs plus possibly a cut last one, after reserving the per-epoch validation, the final evaluation and
report, and a safety margin. The plan becomes cfg.epochs and cfg.max_steps, which the training state records,
so a resumed run keeps it. Imports: torch and the engine; no data set is named here.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.averaging import Lookahead, averaged_step, make_averager
from imgrec.engine.state import Progress
from imgrec.engine.system import Compute, autocast
from imgrec.engine.trainer import (
    OPTIMIZERS,
    TTA_VIEWS,
    make_step,
    optimizer_kernels,
    parameter_groups,
    scaled_size,
    schedule_factor,
    total_steps,
    tta_logits,
    warmup_steps,
)
from imgrec.errors import UsageError

log = logging.getLogger(__name__)

# of the budget: the noise of a shared machine, start-up not measured. At 4% (and 5 s for the report), every idle
# run ended 4-8% early (16 s of 310 s on Fashion-MNIST); the plan is revised at each epoch's end, so the margin only
# has to cover the last epoch and the final evaluation
MARGIN = 0.025
REPORT_SECONDS = 2.5  # after the final evaluation: figures (drawn beside it), report.html, JSON files; 1 s measured
EPOCH_END_SECONDS = 0.5  # each epoch's end: last.pt, best.pt and train_state.pt written and synced
WARMUP_STEPS = 2  # the first steps also build the kernels: not timed
MEASURE_SECONDS = 3.0  # time steps until this much has passed ...
MAX_MEASURE_STEPS = 30  # ... or this many have run
MIN_MEASURE_STEPS = 3
REPLAN_SECONDS = 0.5  # a budgeted run's plan changes when it is off by at least this much


@dataclass
class Speed:
    step_seconds: float  # one training step, fetching and augmenting its batch included
    eval_image_seconds: float  # one image in the final evaluation (all views of its test-time augmentation)
    measure_seconds: float  # what measuring took
    val_image_seconds: float | None = None  # one image in each epoch's validation (one view); None: as eval_image_seconds

    @property
    def epoch_image_seconds(self) -> float:
        return self.eval_image_seconds if self.val_image_seconds is None else self.val_image_seconds


@dataclass
class BudgetPlan:
    budget_seconds: float
    elapsed_seconds: float  # spent before training: start-up, data preparation, model, measuring
    step_seconds: float
    eval_image_seconds: float
    steps_per_epoch: int
    total_steps: int
    epochs: int  # the last one may be cut short: total_steps is what runs
    epoch_end_seconds: float  # each epoch's validation and saves
    final_seconds: float  # the final evaluation passes and the report
    margin_seconds: float
    predicted_seconds: float  # the whole run, as planned

    def to_dict(self) -> dict[str, Any]:
        """Plain values for plan.json and the summary."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for the log."""
        fraction = self.total_steps / self.steps_per_epoch
        return (f"time budget {self.budget_seconds:.0f}s: {fraction:.2f} epochs ({self.total_steps} steps of "
                f"{self.step_seconds * 1000:.0f} ms) after {self.elapsed_seconds:.1f}s of preparation; "
                f"{self.final_seconds:.0f}s kept for the final evaluation and report, {self.margin_seconds:.0f}s margin; "
                f"planned end at {self.predicted_seconds:.0f}s")


@dataclass(frozen=True)
class StepCosts:
    """What a training step costs in each epoch, relative to a step at full size: the first epochs of progressive
    resizing (--progressive-resize) their share of the full size's pixels (a conv net's work goes with the pixels;
    the fixed cost of a step makes the real share a little higher, so a plan from full-size steps errs on the side of
    time, and one from small steps on the short side); every later epoch, and the run's last, 1."""

    early: tuple[float, ...] = ()  # epochs 1, 2, ...

    @classmethod
    def of(cls, cfg: RunConfig, input_size: tuple[int, int] | list[int]) -> StepCosts:
        """The costs of cfg's epochs for a model taking images of input_size (H, W)."""
        height, width = int(input_size[0]), int(input_size[1])
        return cls(tuple(math.prod(scaled_size((height, width), side)) / (height * width)
                         for side in cfg.resize_sizes))

    def steps(self, first: int, last: int, steps_per_epoch: int, ends: bool = True) -> float:
        """The run's steps first+1 .. last (counted from its start) in full-size steps; ends: the run ends with step
        `last`, so that step's epoch is at full size."""
        total = float(last - first)
        last_epoch = math.ceil(last / steps_per_epoch) if ends else 0
        for epoch, cost in enumerate(self.early, start=1):
            if epoch == last_epoch:
                break
            overlap = min(last, epoch * steps_per_epoch) - max(first, (epoch - 1) * steps_per_epoch)
            total -= max(0, overlap) * (1 - cost)
        return total

    @property
    def cheapest(self) -> float:
        return min((1.0, *self.early))


def most_steps(cost: Callable[[int], float], available: float, least_step_seconds: float) -> int:
    """The most steps n whose cost(n) fits in `available` seconds (0 when none does), by bisection; a step costs at
    least least_step_seconds (so more than available / least_step_seconds never fit)."""
    low, high = 0, max(0, math.floor(available / max(least_step_seconds, 1e-9))) + 1
    while high - low > 1:
        middle = (low + high) // 2
        if cost(middle) <= available:
            low = middle
        else:
            high = middle
    return low


def plan_budget(budget: float, elapsed: float, speed: Speed, steps_per_epoch: int, epoch_eval_images: int,
                final_eval_images: int, costs: StepCosts | None = None) -> BudgetPlan:
    """The most training steps whose cost, with each started epoch's validation and end, fits in what is left of
    the budget after the final evaluation, the report and the margin. costs: the epochs' step costs relative to
    the measured (full-size) step's (progressive resizing)."""
    steps_per_epoch = max(1, steps_per_epoch)
    costs = costs or StepCosts()
    epoch_end = epoch_eval_images * speed.epoch_image_seconds + EPOCH_END_SECONDS
    final = final_eval_images * speed.eval_image_seconds + REPORT_SECONDS
    margin = MARGIN * budget
    available = budget - elapsed - final - margin

    def cost(steps: int) -> float:  # a cut last epoch still pays a whole validation
        return (costs.steps(0, steps, steps_per_epoch) * speed.step_seconds
                + math.ceil(steps / steps_per_epoch) * epoch_end)

    steps = most_steps(cost, available, speed.step_seconds * costs.cheapest)
    if steps < 1:
        least = elapsed + final + margin + cost(1)
        raise UsageError(f"--time-budget {budget:g}s is too short: preparing the data, measuring, one training step, "
                         f"the final evaluation and the report need about {least:.0f}s here; give a longer budget")
    return BudgetPlan(budget, elapsed, speed.step_seconds, speed.eval_image_seconds, steps_per_epoch, steps,
                      math.ceil(steps / steps_per_epoch), epoch_end, final, margin, elapsed + cost(steps) + final)


def fit_budget_epochs(cfg: RunConfig, total_steps: int, steps_per_epoch: int) -> RunConfig:
    """cfg for a budgeted run of total_steps: its epochs, the last cut by max_steps where the steps end mid-epoch, and
    a --warmup-epochs longer than half the run cut to half of it (a warm-up of 3 epochs in a run the budget shortens to
    2 would leave the rate rising to the end, and is no valid setting)."""
    per_epoch = max(1, steps_per_epoch)
    epochs = max(1, math.ceil(total_steps / per_epoch))
    warmup = cfg.warmup_epochs
    if warmup is not None and warmup * per_epoch > total_steps / 2:
        warmup = round(max(total_steps, 1) / per_epoch / 2, 3)
        log.info(f"time budget: --warmup-epochs {cfg.warmup_epochs:g} cut to {warmup:g}, half the "
                 f"{total_steps / per_epoch:.2f} epochs that fit")
    return replace(cfg, epochs=epochs, max_steps=total_steps if total_steps < epochs * per_epoch else None,
                   warmup_epochs=warmup)


@dataclass
class Deadline:
    """Keeps a budgeted run on time: at each epoch end fit() asks it to re-plan (replan), from the speed the run
    really had so far (the plan's comes from a few steps measured at the start, and a machine can get slower or
    faster). `end` is the time.perf_counter() by which training, validation and saves must be done (the final
    evaluation, the report and the margin come after it)."""

    end: float
    steps_per_epoch: int
    revisions: list[dict[str, Any]] = field(default_factory=list)  # what changed, for plan.json
    plan: BudgetPlan | None = None  # the plan made at the start
    costs: StepCosts = field(default_factory=StepCosts)  # each epoch's step cost relative to a full-size step's

    @classmethod
    def from_plan(cls, plan: BudgetPlan, started: float, costs: StepCosts | None = None) -> Deadline:
        """The deadline of a run planned by plan_budget (with these step costs) that started at time.perf_counter()
        `started`."""
        return cls(started + plan.budget_seconds - plan.final_seconds - plan.margin_seconds, plan.steps_per_epoch,
                   plan=plan, costs=costs or StepCosts())

    def record(self) -> dict[str, Any]:
        """plan.json: the plan, and the revisions made to it at epoch ends (when there were any)."""
        assert self.plan is not None
        return {**self.plan.to_dict(), "revisions": self.revisions} if self.revisions else self.plan.to_dict()

    def replan(self, cfg: RunConfig, progress: Progress, steps_per_epoch: int, epoch_end_seconds: float,
               scheduler: Any, averager: Any) -> RunConfig:
        """At an epoch end: the run's settings for the total steps that still fit by the deadline at the speed
        measured so far. When they differ from the plan, the run's epochs and max_steps change and its learning-rate
        schedule and lookahead are stretched or shrunk to them here; else (and for onecycle, whose phases are fixed
        when it is built) cfg itself."""
        if cfg.schedule == "onecycle":
            return cfg
        done = (progress.epoch - 1) * steps_per_epoch
        planned = total_steps(cfg, steps_per_epoch)
        full_size_steps = self.costs.steps(0, done, steps_per_epoch, ends=False)  # the epochs done were not its last
        step_seconds = progress.train_seconds / (full_size_steps if full_size_steps > 0 else 1)
        new = self.total_steps(done, step_seconds, epoch_end_seconds, time.perf_counter())
        if new > done and abs(new - planned) * step_seconds < REPLAN_SECONDS:
            return cfg  # on time: a fraction of a second either way is noise
        cfg = fit_budget_epochs(cfg, new, steps_per_epoch)
        if scheduler is not None:
            factor = schedule_factor(cfg.schedule, max(new, 1), warmup_steps(cfg, steps_per_epoch), cfg.linear_ends)
            scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)
        if isinstance(averager, Lookahead):  # lookahead's decay follows the run's length
            averager.total_steps = max(new, 1)
        self.revisions.append({"after_steps": done, "step_seconds": round(step_seconds, 5),
                               "epoch_end_seconds": round(epoch_end_seconds, 3), "total_steps": new, "was": planned})
        change = "ends here" if new <= done else f"{new} steps in all ({new / steps_per_epoch:.2f} epochs)"
        log.info(f"time budget: at {step_seconds * 1000:.0f} ms a step so far, the run {change} instead of {planned}")
        return cfg

    def total_steps(self, steps_done: int, step_seconds: float, epoch_end_seconds: float, now: float) -> int:
        """Steps done plus the most further steps whose cost, with the epoch ends they reach, fits before `end`
        (none when time is up: the run ends here); step_seconds: a full-size step's (see StepCosts)."""
        per_epoch = max(1, self.steps_per_epoch)
        available = self.end - now

        def cost(extra: int) -> float:
            ends = math.ceil((steps_done + extra) / per_epoch) - steps_done // per_epoch  # epoch ends still to pay
            return self.costs.steps(steps_done, steps_done + extra, per_epoch) * step_seconds + ends * epoch_end_seconds

        return steps_done + most_steps(cost, available, step_seconds * self.costs.cheapest)


def measure_speed(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eval_images: torch.Tensor,
                  cfg: RunConfig, compute: Compute | None = None) -> Speed:
    """Seconds per training step (on a copy of the model, with the run's optimiser and precision) and per
    evaluated image (with the run's test-time augmentation, and the one view of each epoch's validation); no random
    generator and no weight of `model` changes."""
    start = time.perf_counter()
    compute = compute or Compute.of(cfg)
    device, dtype, memory_format = compute.device, compute.dtype, compute.memory_format
    probe = copy.deepcopy(model).to(device=device, memory_format=memory_format).train()
    with torch.random.fork_rng(devices=[]):
        step_seconds = _time_steps(probe, batches, cfg, device, dtype, memory_format)
        eval_seconds = _time_evaluation(probe, eval_images, cfg.tta, device, dtype, memory_format)
    return Speed(step_seconds, eval_seconds, time.perf_counter() - start, eval_seconds / TTA_VIEWS[cfg.tta])


def _time_steps(probe: nn.Module, batches: Iterable, cfg: RunConfig, device: torch.device, dtype: Any,
                memory_format: torch.memory_format) -> float:
    """Mean seconds of the training steps (the training loop's own step function) after the warm-up ones, batch
    fetching included."""
    optimizer = OPTIMIZERS[cfg.optimizer](parameter_groups(probe, cfg), cfg, optimizer_kernels(device))
    average = make_averager(probe, cfg.ema, cfg.lookahead, total_steps=1000)  # any length: timing only
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = averaged_step(make_step(probe, optimizer, None, scaler, loss_fn, cfg.grad_clip, device, dtype,
                                   memory_format), average)
    timed: list[float] = []
    done = 0
    while len(timed) < MIN_MEASURE_STEPS or (sum(timed) < MEASURE_SECONDS and len(timed) < MAX_MEASURE_STEPS):
        iterator = iter(batches)  # small data: go round again
        tick = time.perf_counter()
        for x, y in iterator:
            step(x, y)[0].item()  # wait for the step to finish, as the training loop does
            done += 1
            if done > WARMUP_STEPS:
                timed.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            if len(timed) >= MIN_MEASURE_STEPS and (sum(timed) >= MEASURE_SECONDS or len(timed) >= MAX_MEASURE_STEPS):
                break
    return sum(timed) / len(timed)


@torch.inference_mode()
def _time_evaluation(probe: nn.Module, images: torch.Tensor, tta: str, device: torch.device, dtype: Any,
                     memory_format: torch.memory_format) -> float:
    """Seconds per image of evaluation-mode forward passes over one batch (after one warm-up pass)."""
    probe.eval()
    x = images.to(device, memory_format=memory_format)
    runs = []
    for _ in range(3):
        tick = time.perf_counter()
        with autocast(device, dtype):
            logits = tta_logits(probe, x, tta)
        logits.sum().item()
        runs.append(time.perf_counter() - tick)
    return sum(runs[1:]) / len(runs[1:]) / len(x)
