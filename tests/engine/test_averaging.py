"""Weight averaging (EMA, lookahead), test-time augmentation (flip, flip-translate), the linear schedule and cutting a run by --max-steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.averaging import Lookahead, WeightAverage, averaged_step, make_averager
from imgrec.engine.trainer import evaluate, linear_schedule, run_epochs, total_steps


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_the_average_follows_the_weights_with_a_warming_decay() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(5, 1, 6, 6))  # BatchNorm statistics move too
    assert average.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early updates follow closely
    average.update()
    now = model.state_dict()
    for key, value in average.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.1 * start[key] + 0.9 * now[key])
        else:
            assert torch.equal(value, now[key])  # num_batches_tracked is copied
    for _ in range(200):
        average.update()
    assert average.current_decay() == 0.9
    assert not any(p.requires_grad for p in average.model.parameters())


def test_the_average_round_trips_through_its_state_dict() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.95)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        average.update()
    copy = WeightAverage(_model(), decay=0.5)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 3 and copy.decay == 0.95
    for key, value in average.model.state_dict().items():
        assert torch.equal(copy.model.state_dict()[key], value)


def test_averaged_step_updates_after_each_step() -> None:
    model = _model()
    average = WeightAverage(model, decay=0.9)
    calls: list[str] = []
    step = averaged_step(lambda x, y: calls.append("step") or (x, y), average)
    step(1, 2)
    step(3, 4)
    assert calls == ["step", "step"] and average.updates == 2
    plain = lambda x, y: None  # noqa: E731
    assert averaged_step(plain, None) is plain
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)


def test_lookahead_moves_the_slow_copy_every_fifth_step_and_restarts_the_model_from_it() -> None:
    model = _model()
    look = Lookahead(model, total_steps=12)
    slow0 = {k: v.clone() for k, v in look.model.state_dict().items()}
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a training step
        before = {k: v.clone() for k, v in model.state_dict().items()}
        slow_before = {k: v.clone() for k, v in look.model.state_dict().items()}
        decay = look.current_decay()
        assert decay == pytest.approx(0.95**5 * (step / 12) ** 3)
        look.update()
        if step in (5, 10, 12):  # every fifth step, and the last one
            for k, v in look.model.state_dict().items():
                if v.is_floating_point():
                    torch.testing.assert_close(v, slow_before[k] * decay + before[k] * (1 - decay))
                    torch.testing.assert_close(model.state_dict()[k], v)  # the model restarts from the slow copy
        else:
            for k, v in look.model.state_dict().items():
                torch.testing.assert_close(v, slow_before[k])
                torch.testing.assert_close(model.state_dict()[k], before[k])  # the model trains on untouched
    assert not torch.equal(look.model[0].weight, slow0["0.weight"])
    restored = Lookahead(_model(), total_steps=1)
    restored.load_state_dict(look.state_dict())
    assert (restored.updates, restored.total_steps, restored.every) == (12, 12, 5)
    torch.testing.assert_close(restored.model.state_dict(), look.model.state_dict())
    assert isinstance(make_averager(model, 0.0, True, 10), Lookahead)
    assert type(make_averager(model, 0.9, False, 10)) is WeightAverage and make_averager(model, 0.0, False, 10) is None


def test_lookahead_and_ema_are_one_or_the_other() -> None:
    from imgrec.errors import UsageError

    with pytest.raises(UsageError, match="--ema or --lookahead"):
        RunConfig(ema=0.99, lookahead=True)


class _Loader(list):
    num_samples = 6


def test_flip_tta_averages_the_logits_of_the_two_views() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(6, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    result = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True, tta="flip")
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(result.logits, expected)
    plain = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.logits, model(x))
    assert not torch.allclose(plain.logits, result.logits)  # the mirror view really counts
    assert result.loss == pytest.approx(nn.functional.cross_entropy(expected, y).item(), rel=1e-5)


def test_flip_translate_tta_adds_the_views_shifted_one_pixel_each_way() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(5, 2, 6, 6)
    y = torch.tensor([0, 1, 2, 0, 1])
    result = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True, tta="flip-translate")
    with torch.no_grad():
        mirror = lambda v: (model(v) + model(v.flip(-1))) / 2  # noqa: E731
        # up-left: the image moved one pixel right and down, the top row and left column reflected in
        up_left = torch.cat([x[:, :, 1:2], x[:, :, :-1]], dim=2)
        up_left = torch.cat([up_left[..., 1:2], up_left[..., :-1]], dim=3)
        down_right = torch.cat([x[:, :, 1:], x[:, :, -2:-1]], dim=2)
        down_right = torch.cat([down_right[..., 1:], down_right[..., -2:-1]], dim=3)
        expected = mirror(x) / 2 + (mirror(up_left) + mirror(down_right)) / 4
    torch.testing.assert_close(result.logits, expected)
    flip = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True, tta="flip")
    assert not torch.allclose(flip.logits, result.logits)
    cl = evaluate(model.to(memory_format=torch.channels_last), _Loader([(x.contiguous(memory_format=torch.channels_last), y)]),
                  torch.device("cpu"), memory_format=torch.channels_last, collect=True, tta="flip-translate")
    torch.testing.assert_close(cl.logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        evaluate(model, _Loader([(x, y)]), torch.device("cpu"), tta="rotate")


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [linear_schedule(step, 100) for step in range(101)]
    peak = factors.index(max(factors))
    assert peak == 20 and factors[peak] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:peak], factors[1 : peak + 1]))
    assert all(a > b for a, b in zip(factors[peak:100], factors[peak + 1 :]))
    assert factors[0] > 0 and factors[100] == 0.0
    assert linear_schedule(0, 1) > 0  # a one-step run still learns


@pytest.mark.parametrize("epochs,max_steps,per_epoch,steps,run", [
    (3, None, 10, 30, 3), (3, 25, 10, 25, 3), (5, 12, 10, 12, 2), (2, 100, 10, 20, 2), (1, 1, 10, 1, 1)])
def test_max_steps_cuts_the_run(epochs: int, max_steps: int | None, per_epoch: int, steps: int, run: int) -> None:
    cfg = RunConfig(epochs=epochs, max_steps=max_steps)
    assert total_steps(cfg, per_epoch) == steps
    assert run_epochs(cfg, per_epoch) == run


def test_the_test_report_uses_the_runs_tta() -> None:
    from imgrec.reporting import predict

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(6, 1, 6, 6)
    loader = _Loader([(x, torch.zeros(6, dtype=torch.long))])
    cfg = RunConfig(tta="flip", augment="flip", device="cpu", channels_last=False, precision="fp32")
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(predict(model, loader, cfg).logits, expected)
    torch.testing.assert_close(predict(model, loader, RunConfig(device="cpu", channels_last=False, precision="fp32")).logits,
                               model(x).detach())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unsure_tta_takes_the_six_views_only_for_images_the_plain_view_is_unsure_of(
        layout: torch.memory_format) -> None:
    """--tta unsure: the flip-translate logits for the UNSURE_FRACTION of the batch least confident in the plain
    view (by top probability), the plain view's for the others."""
    from imgrec.engine.trainer import UNSURE_FRACTION, tta_logits

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval().to(memory_format=layout)
    x = torch.randn(40, 2, 6, 6).to(memory_format=layout)
    with torch.no_grad():
        model[2].weight.mul_(torch.linspace(0.2, 5, 3)[:, None])  # confident on some images, unsure on others
        plain, views, unsure = (tta_logits(model, x, mode) for mode in ("none", "flip-translate", "unsure"))
    top = plain.softmax(1).amax(1)
    confident = top > top.sort().values[round(UNSURE_FRACTION * len(x)) - 1]
    assert (~confident).sum() == round(UNSURE_FRACTION * len(x)) == 10
    torch.testing.assert_close(unsure[confident], plain[confident])
    torch.testing.assert_close(unsure[~confident], views[~confident])


def test_linear_schedule_ends_rise_from_and_fall_to_the_given_factors() -> None:
    """--linear-ends 0.2 0.07 (airbench's shape): 0.2 -> 1 at the peak -> 0.07 at the end; 0 0 is the triangle."""
    from imgrec.config import RunConfig
    from imgrec.errors import UsageError

    shaped = [linear_schedule(step, 100, ends=(0.2, 0.07)) for step in range(101)]
    plain = [linear_schedule(step, 100) for step in range(101)]
    assert shaped[0] == pytest.approx(0.2 + 0.8 * plain[0]) and max(shaped) == 1.0 == max(plain)
    assert shaped[100] == pytest.approx(0.07) and plain[100] == 0.0
    assert all(a >= b for a, b in zip(shaped, plain))
    assert [linear_schedule(step, 100, ends=(0.0, 0.0)) for step in range(101)] == plain
    with pytest.raises(UsageError, match="linear-ends"):
        RunConfig(linear_ends=[0.2, 1.5])
    with pytest.raises(UsageError, match="linear-ends"):
        RunConfig(linear_ends=[0.2])
