"""The training loop: it learns, it is reproducible, it records every epoch, stops early, follows schedules,
refuses to go on (or save) when training diverges, and numbers its run folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import ListLoader
from imgrec import workflows
from imgrec.config import RunConfig
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.runs import RESULT_FIELDS, create_run_dir, default_run_name, read_results
from imgrec.engine.state import load_state
from imgrec.engine.trainer import build_scheduler, evaluate, fit
from imgrec.errors import ImgrecError
from imgrec.models.registry import build_model

HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def cfg_for(**overrides: Any) -> RunConfig:
    values: dict[str, Any] = dict(model="mlp", epochs=2, lr=1e-2, device="cpu", threads=1, seed=0)
    values.update(overrides)
    return RunConfig(**values)


def meta(num_classes: int = 4, channels: int = 1, size: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    """What a weights file says about a model of this shape (checked whenever best.pt is read back)."""
    return {"kind": "imgrec-weights", "classes": [str(k) for k in range(num_classes)], "mean": [0.0] * channels,
            "std": [1.0] * channels, "channels": channels, "image_size": list(size),
            "model": {"name": "test", "num_classes": num_classes, "in_channels": channels, "image_size": list(size)}}


def train_run(data: Path, project: Path, **overrides: Any) -> workflows.TrainOutcome:
    values: dict[str, Any] = dict(data=str(data), model="mlp", epochs=2, batch_size=8, project=str(project),
                                  threads=1, workers=0, lr=3e-3, device="cpu")
    values.update(overrides)
    return workflows.train(RunConfig(**values))


def results_rows(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    with (run_dir / "results.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_weights_file(path)["state_dict"]


def test_fit_overfits_a_tiny_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 4  # random images, arbitrary labels: only memorising gets the loss down
    model = build_model("mlp", 4, 1, (8, 8))
    loader = ListLoader([(x, y)] * 40)
    before = evaluate(model, ListLoader([(x, y)]), torch.device("cpu"))
    result = fit(model, loader, None, cfg_for(epochs=2, lr=1e-2), tmp_path, meta())
    after = evaluate(model, ListLoader([(x, y)]), torch.device("cpu"))
    assert before.loss > 1.0
    assert after.loss < 0.05 and after.loss < before.loss / 20
    assert after.accuracy == 1.0
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.epochs_run == 2 and loader.epochs_set == [1, 2]
    # no validation split: the last epoch counts as the best
    assert result.best_epoch == 2 and result.best_val_accuracy is None
    assert load_weights_file(tmp_path / "weights" / "best.pt")["epoch"] == 2
    _, rows = results_rows(tmp_path)
    assert [r[3] for r in rows] == ["", ""] and [r[4] for r in rows] == ["", ""]  # empty val columns


def test_lenet_overfits_a_tiny_colour_batch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    x = torch.randn(12, 3, 16, 16)
    y = torch.arange(12) % 3
    model = build_model("lenet", 3, 3, (16, 16))
    fit(model, ListLoader([(x, y)] * 30), None, cfg_for(model="lenet", epochs=1, lr=2e-3), tmp_path, meta(3, 3, (16, 16)))
    after = evaluate(model, ListLoader([(x, y)]), torch.device("cpu"))
    assert after.loss < 0.1 and after.accuracy == 1.0


def test_results_csv_has_one_row_per_epoch(image_folder: Path, tmp_path: Path) -> None:
    outcome = train_run(image_folder, tmp_path / "runs", epochs=3)
    header, rows = results_rows(outcome.run_dir)
    assert header == HEADER == list(RESULT_FIELDS)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for r in rows:
        values = [float(v) for v in r]  # every cell a number when there is a validation split
        assert all(math.isfinite(v) for v in values)
        assert 0 <= values[2] <= 1 and 0 <= values[4] <= 1
        assert values[5] == pytest.approx(3e-3)
        assert values[6] >= 0
    parsed = read_results(outcome.run_dir / "results.csv")
    assert len(parsed) == 3 and set(parsed[0]) == set(HEADER)
    assert outcome.summary["epochs"] == 3 and not outcome.summary["stopped_early"]


def _rows_without_seconds(run_dir: Path) -> list[list[str]]:
    header, rows = results_rows(run_dir)
    keep = [i for i, name in enumerate(header) if name != "seconds"]
    return [[r[i] for i in keep] for r in rows]


def test_same_seed_same_run_and_other_seed_another(image_folder: Path, tmp_path: Path) -> None:
    # lenet on colour images: random crops and flips are part of what must repeat
    runs = [train_run(image_folder, tmp_path / "runs", model="lenet", seed=seed, epochs=2).run_dir
            for seed in (7, 7, 8)]
    a, b, c = runs
    assert len(set(runs)) == 3
    assert _rows_without_seconds(a) == _rows_without_seconds(b)
    for name in ("best.pt", "last.pt"):
        sa, sb, sc = state(a / "weights" / name), state(b / "weights" / name), state(c / "weights" / name)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs between two runs with the same seed"
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{name} is the same for another seed"
    assert [r[1] for r in _rows_without_seconds(a)] != [r[1] for r in _rows_without_seconds(c)]
    metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text().replace(str(d), "RUN")) for d in (a, b))
    assert metrics_a.pop("timing")["images_per_second"] > 0 and metrics_b.pop("timing")  # how long it took varies
    assert metrics_a == metrics_b
    assert load_weights_file(a / "weights" / "best.pt")["temperature"] == \
        load_weights_file(b / "weights" / "best.pt")["temperature"]


def test_early_stopping_when_validation_cannot_improve(image_folder: Path, tmp_path: Path) -> None:
    # a learning rate this small cannot change a prediction: validation accuracy is flat from epoch 1
    outcome = train_run(image_folder, tmp_path / "runs", lr=1e-12, patience=2, epochs=20)
    _, rows = results_rows(outcome.run_dir)
    assert len(rows) == 3  # epoch 1 is the best, 2 and 3 bring nothing, then it stops
    assert outcome.summary["epochs"] == 3
    assert outcome.summary["stopped_early"] is True
    assert outcome.summary["best_epoch"] == 1
    assert load_weights_file(outcome.run_dir / "weights" / "best.pt")["epoch"] == 1
    assert load_weights_file(outcome.run_dir / "weights" / "last.pt")["epoch"] == 3


def test_select_last_keeps_the_last_epoch_whatever_validation_says(image_folder: Path, tmp_path: Path) -> None:
    # flat validation accuracy: --select val keeps epoch 1 (no later one beats it), --select last the third
    for select, kept in (("val", 1), ("last", 3)):
        outcome = train_run(image_folder, tmp_path / "runs", lr=1e-12, epochs=3, select=select, name=select)
        assert outcome.summary["best_epoch"] == kept, select
        assert load_weights_file(outcome.run_dir / "weights" / "best.pt")["epoch"] == kept, select
        rows = read_results(outcome.run_dir / "results.csv")
        assert outcome.summary["best_val_accuracy"] == pytest.approx(rows[kept - 1]["val_acc"])


def test_no_early_stopping_without_patience(image_folder: Path, tmp_path: Path) -> None:
    outcome = train_run(image_folder, tmp_path / "runs", lr=1e-12, patience=0, epochs=4)
    assert outcome.summary["epochs"] == 4 and outcome.summary["stopped_early"] is False


def _fit_lrs(tmp_path: Path, schedule: str, lr: float, epochs: int, steps: int, optimizer: str = "adam") -> list[float]:
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4) % 2
    model = build_model("mlp", 2, 1, (8, 8))
    run = tmp_path / schedule
    run.mkdir()
    fit(model, ListLoader([(x, y)] * steps), None, cfg_for(epochs=epochs, lr=lr, schedule=schedule,
                                                            optimizer=optimizer), run, meta())
    return [row["lr"] for row in read_results(run / "results.csv")]


def test_constant_schedule(tmp_path: Path) -> None:
    assert _fit_lrs(tmp_path, "constant", 0.01, epochs=3, steps=4) == [0.01, 0.01, 0.01]


def test_cosine_schedule_per_results_csv(tmp_path: Path) -> None:
    lrs = _fit_lrs(tmp_path, "cosine", 0.01, epochs=3, steps=5)
    # the rate at the start of epoch e is lr * (1 + cos(pi * (e - 1) / 3)) / 2
    assert lrs == pytest.approx([0.01, 0.0075, 0.0025], rel=1e-5)


def test_onecycle_schedule_per_results_csv(tmp_path: Path) -> None:
    epochs, steps, lr = 4, 5, 0.01
    lrs = _fit_lrs(tmp_path, "onecycle", lr, epochs=epochs, steps=steps, optimizer="sgd")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    reference = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        for _ in range(steps):
            opt.step()
            reference.step()
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert lrs[0] == pytest.approx(lr / 25, rel=1e-5)  # one-cycle starts low, rises, then anneals
    assert max(lrs) > 5 * lrs[0] and lrs[-1] < max(lrs)


def test_schedules_reach_the_end_without_error() -> None:
    """A per-step schedule over exactly total_steps steps: the last step must not overrun OneCycleLR."""
    for schedule in ("cosine", "onecycle"):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = build_scheduler(cfg_for(schedule=schedule, lr=0.1), opt, total_steps=7)
        for _ in range(7):
            opt.step()
            scheduler.step()
        assert opt.param_groups[0]["lr"] < 0.01
    assert build_scheduler(cfg_for(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 7) is None


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adam"])
def test_optimizers_learn(optimizer: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 4
    model = build_model("mlp", 4, 1, (8, 8))
    before = evaluate(model, ListLoader([(x, y)]), torch.device("cpu")).loss
    lr = 0.05 if optimizer == "sgd" else 5e-3
    fit(model, ListLoader([(x, y)] * 20), None, cfg_for(optimizer=optimizer, lr=lr, weight_decay=1e-4), tmp_path,
        meta())
    after = evaluate(model, ListLoader([(x, y)]), torch.device("cpu")).loss
    assert after < before / 3


def test_optimizers_run_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    for optimizer in ("sgd", "adamw"):
        outcome = train_run(image_folder, tmp_path / "runs", optimizer=optimizer, epochs=1, name=optimizer,
                            label_smoothing=0.1, grad_clip=1.0)
        assert outcome.run_dir.name == optimizer
        assert load_weights_file(outcome.run_dir / "weights" / "best.pt")["config"]["optimizer"] == optimizer


def _nan_after(calls: int) -> Any:
    """A build_model whose model returns NaN logits from the given training forward pass on."""
    real = workflows.build_model

    def build(*args: Any) -> nn.Module:
        model = real(*args)
        forward = model.forward
        seen = {"n": 0}

        def poisoned(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            if model.training:
                seen["n"] += 1
                if seen["n"] >= calls:
                    return out * float("nan")
            return out

        model.forward = poisoned  # type: ignore[method-assign]
        return model

    return build


def test_nan_loss_stops_training_naming_epoch_and_step(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # 36 images: 6 test, 3 val, 27 train -> 4 steps of 8 per epoch; the 6th step is epoch 2, step 2
    monkeypatch.setattr(workflows, "build_model", _nan_after(6))
    with pytest.raises(ImgrecError) as info:
        train_run(image_folder, tmp_path / "runs", epochs=3, name="nan")
    message = str(info.value)
    assert "epoch 2" in message and "step 2" in message and "nan" in message.lower()
    assert "--lr" in message
    weights = tmp_path / "runs" / "nan" / "weights"
    for name in ("best.pt", "last.pt"):
        ckpt = load_weights_file(weights / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    _, rows = results_rows(tmp_path / "runs" / "nan")
    assert len(rows) == 1
    saved = load_state(tmp_path / "runs" / "nan" / "train_state.pt")
    assert saved["progress"]["epoch"] == 2 and saved["progress"]["step"] < 2  # never the poisoned step
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_huge_learning_rate_fails_cleanly(image_folder: Path, tmp_path: Path) -> None:
    """lr=1e6 with plain sgd diverges within a few steps: a clear error, and nothing non-finite saved."""
    with pytest.raises(ImgrecError, match=r"^training diverged: the (loss|weights) (is|are) .* at epoch \d+, step \d+;"):
        train_run(image_folder, tmp_path / "runs", optimizer="sgd", momentum=0.0, lr=1e6, epochs=3, name="huge")
    weights = tmp_path / "runs" / "huge" / "weights"
    for name in ("best.pt", "last.pt"):
        if (weights / name).exists():
            tensors = load_weights_file(weights / name)["state_dict"].values()
            assert all(torch.isfinite(t).all() for t in tensors), f"{name} holds non-finite weights"


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    """The last step of an epoch can blow the weights up while its own loss was still finite; the epoch's
    validation then runs on NaN weights (argmax of NaN logits may even look *better*). best.pt must keep the
    finite weights of the earlier epoch."""
    torch.manual_seed(0)
    model = _Flat()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.0, 5.0]))  # predicts class 1 everywhere
    train = ListLoader([(torch.randn(4, 1, 2, 2), torch.ones(4, dtype=torch.int64))] * 3)
    val = ListLoader([(torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.int64))])  # all class 0: accuracy 0
    steps = {"n": 0}

    def poison_grad(grad: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        return grad * float("nan") if steps["n"] == 6 else grad  # the last step of epoch 2

    model.fc.weight.register_hook(poison_grad)
    with pytest.raises(ImgrecError, match=r"epoch 2") as info:
        fit(model, train, val, cfg_for(epochs=3, lr=1e-6, channels_last=False), tmp_path, meta(2, 1, (2, 2)))
    assert "diverged" in str(info.value)
    for name in ("best.pt", "last.pt"):
        ckpt = load_weights_file(tmp_path / "weights" / name)
        assert ckpt["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    saved = load_state(tmp_path / "train_state.pt")  # the end of epoch 1: the last finite weights
    assert (saved["progress"]["epoch"], saved["progress"]["step"]) == (2, 0)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_state_save_within_an_epoch_refuses_non_finite_weights(tmp_path: Path) -> None:
    """Saving every step: the step that blows the weights up (with a finite loss) stops training at its save,
    naming it, and train_state.pt keeps the step before."""
    torch.manual_seed(0)
    model = _Flat()
    train = ListLoader([(torch.randn(4, 1, 2, 2), torch.ones(4, dtype=torch.int64))] * 3)
    steps = {"n": 0}

    def poison_grad(grad: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        return grad * float("nan") if steps["n"] == 5 else grad  # epoch 2, step 2

    model.fc.weight.register_hook(poison_grad)
    cfg = cfg_for(epochs=3, lr=1e-3, channels_last=False, save_every_steps=1)
    with pytest.raises(ImgrecError, match=r"^training diverged: the weights are not finite at epoch 2, step 2;"):
        fit(model, train, None, cfg, tmp_path, meta())
    saved = load_state(tmp_path / "train_state.pt")
    assert (saved["progress"]["epoch"], saved["progress"]["step"]) == (2, 1)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert load_state(tmp_path / "train_state.prev.pt")["progress"]["step"] == 0  # the end of epoch 1


def test_run_dirs_auto_increment_and_exist_ok(tmp_path: Path) -> None:
    project = tmp_path / "runs"
    assert create_run_dir(project, "exp") == (project / "exp", True)
    assert create_run_dir(project, "exp") == (project / "exp2", True)
    assert create_run_dir(project, "exp") == (project / "exp3", True)
    assert create_run_dir(project, "exp", exist_ok=True) == (project / "exp", False)
    assert create_run_dir(project, "other", exist_ok=True) == (project / "other", True)
    assert sorted(p.name for p in project.iterdir()) == ["exp", "exp2", "exp3", "other"]


def test_training_runs_number_their_folders(image_folder: Path, tmp_path: Path) -> None:
    project = tmp_path / "runs"
    dirs = [train_run(image_folder, project, epochs=1).run_dir for _ in range(3)]
    assert [d.name for d in dirs] == ["photos-mlp", "photos-mlp2", "photos-mlp3"]
    again = train_run(image_folder, project, epochs=2, name="photos-mlp", exist_ok=True)
    assert again.run_dir == project / "photos-mlp"
    assert sorted(p.name for p in project.iterdir()) == ["photos-mlp", "photos-mlp2", "photos-mlp3"]
    # the reused folder describes the new run only: no rows left over from the old one
    header, rows = results_rows(again.run_dir)
    assert header == HEADER and [r[0] for r in rows] == ["1", "2"]
    assert again.summary["epochs"] == 2
    assert load_weights_file(again.run_dir / "weights" / "last.pt")["epoch"] == 2


@pytest.mark.parametrize(
    "data,model,expected",
    [
        ("digits", "lenet", "digits-lenet"),
        ("/tmp/some/photos/", "mlp", "photos-mlp"),
        ("/x/cifar10-jpeg.tar.gz", "lenet", "cifar10-jpeg-lenet"),
        ("/x/pets.zip", "mlp", "pets-mlp"),
        ("/x/my photos (2)", "mlp", "my-photos-2-mlp"),
        ("/", "mlp", "data-mlp"),
    ],
)
def test_default_run_name(data: str, model: str, expected: str) -> None:
    assert default_run_name(data, model) == expected


def test_results_log_writes_rows_and_starts_fresh(tmp_path: Path) -> None:
    from imgrec.engine.runs import ResultsLog

    path = tmp_path / "results.csv"
    log = ResultsLog(path)
    log.append({"epoch": 1, "train_loss": 0.123456789, "train_acc": 0.5, "val_loss": None, "val_acc": None,
                "lr": 1e-3, "seconds": 1.5})
    assert path.read_text().splitlines() == [",".join(HEADER), "1,0.123457,0.5,,,0.001,1.5"]
    ResultsLog(path)
    assert path.read_text().splitlines() == [",".join(HEADER)]


def test_each_epochs_validation_takes_one_view_whatever_the_tta(tmp_path: Path) -> None:
    """--tta is for the final evaluation; the per-epoch validation is one forward pass per image (a sixth of
    flip-translate's cost), so its figures are the model's own and its cost does not grow with the TTA."""
    torch.manual_seed(0)
    model = _Flat()
    train = ListLoader([(torch.randn(4, 1, 2, 2), torch.randint(0, 2, (4,)))] * 2)
    x, y = torch.randn(6, 1, 2, 2), torch.randint(0, 2, (6,))
    seen: list[int] = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]) if not module.training else None)
    cfg = cfg_for(epochs=2, tta="flip-translate", augment="translate,flip", channels_last=False, precision="fp32")
    result = fit(model, train, [(x, y)], cfg, tmp_path, meta())  # type: ignore[arg-type]
    assert seen == [6, 6]  # one pass over the 6 validation images per epoch, not six
    expected = evaluate(model, [(x, y)], torch.device("cpu"))  # type: ignore[arg-type]
    assert result.history[-1]["val_acc"] == pytest.approx(expected.accuracy)
    assert result.history[-1]["val_loss"] == pytest.approx(expected.loss)
