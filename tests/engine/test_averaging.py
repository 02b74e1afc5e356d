"""Weight averaging (EMA), flip test-time augmentation, the linear schedule and cutting a run by --max-steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgrec.config import RunConfig
from imgrec.engine.averaging import WeightAverage, averaged_step
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


class _Loader(list):
    num_samples = 6


def test_flip_tta_averages_the_logits_of_the_two_views() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(6, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    result = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True, tta=True)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(result.logits, expected)
    plain = evaluate(model, _Loader([(x, y)]), torch.device("cpu"), collect=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.logits, model(x))
    assert not torch.allclose(plain.logits, result.logits)  # the mirror view really counts
    assert result.loss == pytest.approx(nn.functional.cross_entropy(expected, y).item(), rel=1e-5)


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
