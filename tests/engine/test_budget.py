"""--time-budget: parsing durations, the planning arithmetic and the re-planning at epoch ends (no timing: speeds
are given)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from imgrec.config import RunConfig, parse_duration
from imgrec.engine.budget import (
    EPOCH_END_SECONDS,
    MARGIN,
    REPORT_SECONDS,
    Deadline,
    Speed,
    StepCosts,
    fit_budget_epochs,
    measure_speed,
    plan_budget,
)
from imgrec.errors import UsageError


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("6m", 360), ("1h", 3600), ("1.5h", 5400), ("45", 45),
                                          (" 2M ", 120), ("0.5m", 30)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "abc", "-5s", "0", "10d", "inf", "nan", "5 minutes"])
def test_bad_durations_are_one_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--time-budget .*90s, 6m or 1h"):
        parse_duration(text)
    with pytest.raises(UsageError, match="--time-budget"):
        RunConfig(time_budget=text)


def _cost(plan, speed: Speed, val: int) -> float:  # noqa: ANN001
    epochs = math.ceil(plan.total_steps / plan.steps_per_epoch)
    return plan.total_steps * speed.step_seconds + epochs * (val * speed.eval_image_seconds + EPOCH_END_SECONDS)


def test_the_plan_fills_the_budget_and_no_more() -> None:
    speed = Speed(step_seconds=0.2, eval_image_seconds=0.001, measure_seconds=3.0)
    plan = plan_budget(120, elapsed=10, speed=speed, steps_per_epoch=100, epoch_eval_images=1000,
                       final_eval_images=15000)
    final = 15000 * 0.001 + REPORT_SECONDS
    available = 120 - 10 - final - MARGIN * 120
    assert plan.final_seconds == pytest.approx(final)
    assert _cost(plan, speed, 1000) <= available
    one_more = plan_budget(10_000, 10, speed, 100, 1000, 15000)  # (the same arithmetic, a bigger budget)
    assert one_more.total_steps > plan.total_steps
    # one step more would not fit: an extra step costs 0.2 s, or a whole validation when it starts an epoch
    plan.total_steps += 1
    assert _cost(plan, speed, 1000) > available
    assert plan.predicted_seconds <= 120 - MARGIN * 120 + 1e-9


def test_a_last_epoch_is_cut_rather_than_dropped() -> None:
    speed = Speed(step_seconds=1.0, eval_image_seconds=0.0, measure_seconds=1.0)
    plan = plan_budget(100, elapsed=0, speed=speed, steps_per_epoch=40, epoch_eval_images=0, final_eval_images=0)
    available = 100 * (1 - MARGIN) - REPORT_SECONDS  # 88 s: 2 whole epochs of 40.5 s, then 6 steps of a third
    assert plan.total_steps == math.floor((available - 3 * EPOCH_END_SECONDS) / 1.0)
    assert plan.epochs == 3 and plan.total_steps % 40 != 0


def test_a_validation_that_does_not_fit_drops_the_started_epoch() -> None:
    # each epoch's validation costs 30 s: starting a third epoch for a few steps would overrun
    speed = Speed(step_seconds=0.1, eval_image_seconds=0.01, measure_seconds=1.0)
    plan = plan_budget(100, elapsed=0, speed=speed, steps_per_epoch=100, epoch_eval_images=3000, final_eval_images=0)
    # 88 s available; an epoch costs 10 s of steps + 30.5 s at its end: two fit (81 s), a third cannot start
    assert plan.epochs == 2 and plan.total_steps == 200
    assert _cost(plan, speed, 3000) <= 100 * (1 - MARGIN) - REPORT_SECONDS


def test_each_epochs_validation_is_planned_at_one_view_and_the_final_evaluation_at_all() -> None:
    # flip-translate: 6 ms an image at the end, 1 ms in each epoch's validation
    speed = Speed(step_seconds=0.1, eval_image_seconds=0.006, measure_seconds=1.0, val_image_seconds=0.001)
    plan = plan_budget(200, elapsed=0, speed=speed, steps_per_epoch=100, epoch_eval_images=1000,
                       final_eval_images=2000)
    assert plan.epoch_end_seconds == pytest.approx(1000 * 0.001 + EPOCH_END_SECONDS)
    assert plan.final_seconds == pytest.approx(2000 * 0.006 + REPORT_SECONDS)
    assert Speed(0.1, 0.006, 1.0).epoch_image_seconds == 0.006  # not measured apart: as the final evaluation


def test_too_short_a_budget_is_one_usage_error() -> None:
    speed = Speed(step_seconds=0.5, eval_image_seconds=0.001, measure_seconds=3.0)
    with pytest.raises(UsageError, match="--time-budget 20s is too short: .* about 25s"):
        plan_budget(20, elapsed=15, speed=speed, steps_per_epoch=100, epoch_eval_images=1000, final_eval_images=5000)


def test_the_plan_reads_as_one_line_and_plain_values() -> None:
    plan = plan_budget(60, 5, Speed(0.1, 0.001, 2.0), 50, 100, 1000)
    assert "\n" not in plan.describe() and "time budget 60s" in plan.describe()
    values = plan.to_dict()
    assert values["total_steps"] == plan.total_steps and all(isinstance(v, (int, float)) for v in values.values())


def test_measuring_leaves_the_model_and_the_random_generators_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    images = torch.randn(10, 1, 8, 8)
    rng = torch.get_rng_state()
    cfg = RunConfig(optimizer="sgd", lr=0.1, ema=0.9, tta="flip", augment="flip", device="cpu", precision="bf16")
    speed = measure_speed(model, batches, images, cfg)
    assert speed.step_seconds > 0 and speed.eval_image_seconds > 0 and speed.measure_seconds > 0
    assert speed.val_image_seconds == pytest.approx(speed.eval_image_seconds / 2)  # flip: 2 views at the end, 1 each epoch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_deadline_fits_the_steps_left_at_the_speed_measured_so_far() -> None:
    deadline = Deadline(end=100.0, steps_per_epoch=10)
    # at t = 40 after 2 epochs: 60 s left; 1 s a step, 2 s an epoch end -> 5 more epochs cost 60 s exactly
    assert deadline.total_steps(20, step_seconds=1.0, epoch_end_seconds=2.0, now=40.0) == 70
    # slower than planned: fewer steps, the last epoch cut (its end still paid)
    total = deadline.total_steps(20, step_seconds=1.5, epoch_end_seconds=2.0, now=40.0)
    extra = total - 20
    assert extra * 1.5 + math.ceil(extra / 10) * 2.0 <= 60 < (extra + 1) * 1.5 + math.ceil((extra + 1) / 10) * 2.0
    assert deadline.total_steps(20, step_seconds=1.0, epoch_end_seconds=2.0, now=100.5) == 20  # time is up


def test_a_late_run_is_shortened_and_its_schedule_and_lookahead_follow() -> None:
    from imgrec.engine.averaging import Lookahead
    from imgrec.engine.state import Progress
    from imgrec.engine.trainer import build_scheduler, linear_schedule

    model = nn.Linear(2, 2)
    cfg = RunConfig(epochs=5, schedule="linear", lr=0.1, optimizer="sgd")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(cfg, optimizer, 50)
    look = Lookahead(model, total_steps=50)
    progress = Progress(epoch=3, train_seconds=40.0)  # 2 epochs of 10 steps done, at 2 s a step
    deadline = Deadline(end=time.perf_counter() + 41.0, steps_per_epoch=10)  # time for about 20 more
    new = deadline.replan(cfg, progress, 10, 0.0, scheduler, look)
    total = deadline.revisions[-1]["total_steps"]
    assert new.epochs == 4 and new.max_steps is None and total == 40  # 20 more steps of 2 s fit in 41 s
    assert deadline.revisions[-1]["was"] == 50 and look.total_steps == total
    assert scheduler.lr_lambdas[0](total - 1) == pytest.approx(linear_schedule(total - 1, total))
    same = Deadline(end=time.perf_counter() + 2.0 * (total - 20) + 0.1, steps_per_epoch=10).replan(
        new, progress, 10, 0.0, scheduler, look)
    assert same is new  # on time: nothing changes
    over = Deadline(end=time.perf_counter() - 1.0, steps_per_epoch=10).replan(new, progress, 10, 0.0, scheduler, look)
    assert over.epochs == 2 and over.max_steps is None  # no time left: the run ends with the epoch just done
    onecycle = RunConfig(epochs=5, schedule="onecycle")
    assert Deadline(end=0.0, steps_per_epoch=10).replan(onecycle, progress, 10, 0.0, None, None) is onecycle


def test_a_deadline_from_a_plan_ends_before_the_final_evaluation_and_records_its_revisions() -> None:
    plan = plan_budget(60, 5, Speed(0.1, 0.001, 2.0), 50, 100, 1000)
    deadline = Deadline.from_plan(plan, started=10.0)
    assert deadline.end == pytest.approx(10.0 + 60 - plan.final_seconds - plan.margin_seconds)
    assert deadline.steps_per_epoch == 50 and deadline.record() == plan.to_dict()  # no revision: the plan alone
    deadline.revisions.append({"after_steps": 50, "total_steps": 80, "was": plan.total_steps})
    assert deadline.record() == {**plan.to_dict(), "revisions": deadline.revisions}


def test_progressive_resizings_epochs_cost_their_share_of_the_pixels_except_the_last() -> None:
    costs = StepCosts.of(RunConfig(progressive_resize=[16, 24], epochs=3), (32, 32))
    assert costs.early == (0.25, 0.5625) and costs.cheapest == 0.25
    assert costs.steps(0, 30, 10) == pytest.approx(10 * 0.25 + 10 * 0.5625 + 10)
    assert costs.steps(0, 20, 10) == pytest.approx(10 * 0.25 + 10)  # epoch 2 ends the run: at full size
    assert costs.steps(0, 20, 10, ends=False) == pytest.approx(10 * 0.25 + 10 * 0.5625)
    assert costs.steps(15, 30, 10) == pytest.approx(5 * 0.5625 + 10)
    assert StepCosts().steps(3, 30, 10) == 27


def test_a_plan_with_cheaper_early_epochs_fills_the_budget_and_no_more() -> None:
    speed = Speed(step_seconds=1.0, eval_image_seconds=0.0, measure_seconds=1.0)
    costs = StepCosts((0.25, 0.5))
    plan = plan_budget(100, elapsed=0, speed=speed, steps_per_epoch=20, epoch_eval_images=0, final_eval_images=0,
                       costs=costs)
    plain = plan_budget(100, elapsed=0, speed=speed, steps_per_epoch=20, epoch_eval_images=0, final_eval_images=0)
    available = 100 * (1 - MARGIN) - REPORT_SECONDS

    def cost(steps: int) -> float:
        return costs.steps(0, steps, 20) + math.ceil(steps / 20) * EPOCH_END_SECONDS

    assert plan.total_steps > plain.total_steps + 20  # epochs 1 and 2 cost 15 s instead of 40
    assert cost(plan.total_steps) <= available < cost(plan.total_steps + 1)
    assert plan.predicted_seconds == pytest.approx(cost(plan.total_steps) + REPORT_SECONDS)


def test_the_deadline_turns_the_speed_of_small_epochs_into_a_full_size_steps() -> None:
    from imgrec.engine.state import Progress

    cfg = RunConfig(epochs=6, schedule="linear", lr=0.1, optimizer="sgd")
    progress = Progress(epoch=2, train_seconds=2.5)  # epoch 1: 10 steps at a quarter of the pixels, 0.25 s each
    deadline = Deadline(end=time.perf_counter() + 30.0, steps_per_epoch=10, costs=StepCosts((0.25, 0.25)))
    deadline.replan(cfg, progress, 10, 0.0, None, None)
    revision = deadline.revisions[-1]
    assert revision["step_seconds"] == pytest.approx(1.0)  # a full-size step: 1 s, not 0.25 s
    # 30 s left: epoch 2 at 0.25 s a step (2.5 s), then 27 full-size steps; counted at 0.25 s it would be 120
    assert 10 + 10 + 26 <= revision["total_steps"] <= 10 + 10 + 27


def test_a_re_plan_shorter_than_the_warm_up_shortens_the_warm_up_instead_of_stopping_the_run() -> None:
    from imgrec.engine.state import Progress
    from imgrec.engine.trainer import build_scheduler, warmup_steps

    model = nn.Linear(2, 2)
    cfg = RunConfig(epochs=8, schedule="linear", lr=0.1, optimizer="sgd", warmup_epochs=3)
    scheduler = build_scheduler(cfg, torch.optim.SGD(model.parameters(), lr=0.1), 80)
    progress = Progress(epoch=2, train_seconds=10.0)  # 1 epoch of 10 steps done, at 1 s a step
    deadline = Deadline(end=time.perf_counter() + 12.0, steps_per_epoch=10)  # time for about 12 more steps
    new = deadline.replan(cfg, progress, 10, 0.0, scheduler, None)
    total = deadline.revisions[-1]["total_steps"]
    assert new.epochs == 3 and 20 <= total < 30
    assert new.warmup_epochs is not None and new.warmup_epochs < new.epochs  # a valid config, not a usage error
    warmup = warmup_steps(new, 10)
    assert warmup is not None and warmup <= total // 2  # the rate still peaks and decays within the run
    assert scheduler.lr_lambdas[0](total - 1) < scheduler.lr_lambdas[0](warmup)
    # a plan at the start does the same: 2 epochs in the budget, a warm-up of 3 given
    planned = fit_budget_epochs(RunConfig(epochs=8, warmup_epochs=3), total_steps=20, steps_per_epoch=10)
    assert planned.epochs == 2 and planned.warmup_epochs == 1.0 and planned.max_steps is None
