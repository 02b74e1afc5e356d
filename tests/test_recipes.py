"""--recipe fast (settings by image shape, explicit settings win) and --time-budget end to end on tiny data, plus
one run on the real Fashion-MNIST."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import error_line, make_image_folder, run_main
from imgrec.config import RunConfig
from imgrec.data.info import DatasetInfo
from imgrec.engine.trainer import resized_side
from imgrec.errors import UsageError
from imgrec.recipes import (
    COLOUR_PROGRESSIVE_RESIZE,
    RECIPES,
    apply_recipe,
    explicit_settings,
    recipe_data_settings,
)


def _info(channels: int, size: tuple[int, int]) -> DatasetInfo:
    return DatasetInfo(name="x", classes=["a", "b", "c"], channels=channels, image_size=size, mean=[0.5] * channels,
                       std=[0.25] * channels)


@pytest.mark.parametrize("channels,size,model", [(1, (28, 28), "airnet-small"), (3, (32, 32), "airnet"),
                                                 (1, (8, 8), "airnet-small"), (3, (16, 20), "airnet")])
def test_the_recipe_picks_by_shape(channels: int, size: tuple[int, int], model: str) -> None:
    cfg = apply_recipe(RunConfig(recipe="fast"), _info(channels, size), set())
    kind = "grey" if channels == 1 else "colour"
    for key, value in RECIPES[kind].items():
        if key != "val_fraction":
            assert getattr(cfg, key) == value, key
    assert cfg.model == model and cfg.tta == "unsure" and cfg.schedule == "linear"
    assert cfg.optimizer == "muon" and cfg.muon_lr == 0.1  # Muon for the conv filters, grey and colour
    assert cfg.precision == "auto"  # bf16 where the hardware computes it natively (engine.system)


def test_explicit_settings_win_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    given = RunConfig(recipe="fast", lr=0.05, model="lenet", augment="crop")
    explicit = explicit_settings(given, {"recipe", "lr", "model", "augment"})
    with caplog.at_level(logging.INFO, logger="imgrec.recipes"):
        cfg = apply_recipe(given, _info(3, (32, 32)), explicit)
    assert (cfg.lr, cfg.model, cfg.augment) == (0.05, "lenet", "crop")
    assert cfg.optimizer == "muon" and cfg.batch_size == RECIPES["colour"]["batch_size"]
    assert cfg.tta == "none"  # no flip among the augmentations given: no flip TTA
    assert cfg.lookahead  # the colour recipe's weight average ...
    line = caplog.records[-1].getMessage()
    assert "recipe fast for 3x32x32 colour images" in line and "(given: --lr 0.05, --augment crop, --model lenet)" in line and "--lookahead," in line


def test_a_weight_average_given_replaces_the_recipes() -> None:
    cfg = apply_recipe(RunConfig(recipe="fast", ema=0.9), _info(3, (32, 32)), {"recipe", "ema"})
    assert cfg.ema == 0.9 and not cfg.lookahead  # ... yields to --ema
    cfg = apply_recipe(RunConfig(recipe="fast", ema=0.95), _info(1, (28, 28)), {"recipe", "ema"})
    assert cfg.ema == 0.95 and not cfg.lookahead


def test_the_recipe_keeps_the_last_epoch_unless_early_stopping_is_given() -> None:
    assert apply_recipe(RunConfig(recipe="fast"), _info(3, (32, 32)), set()).select == "last"
    cfg = apply_recipe(RunConfig(recipe="fast", patience=2), _info(3, (32, 32)), {"recipe", "patience"})
    assert cfg.patience == 2 and cfg.select == "val"


def test_without_a_given_set_the_non_defaults_count_as_explicit() -> None:
    assert explicit_settings(RunConfig(lr=0.3, recipe="fast"), None) == {"lr", "recipe"}


def test_no_recipe_changes_nothing() -> None:
    cfg = RunConfig(lr=0.3)
    assert apply_recipe(cfg, _info(1, (28, 28)), set()) == cfg
    assert recipe_data_settings(cfg, set()) == cfg


def test_the_data_settings_come_first_and_yield_to_explicit_ones() -> None:
    assert recipe_data_settings(RunConfig(recipe="fast"), set()).val_fraction == 0.02
    assert recipe_data_settings(RunConfig(recipe="fast", val_fraction=0.2), {"val_fraction"}).val_fraction == 0.2


def test_32x32_colour_images_start_at_24_pixels(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imgrec.recipes"):
        cfg = apply_recipe(RunConfig(recipe="fast"), _info(3, (32, 32)), set())
    assert cfg.progressive_resize == COLOUR_PROGRESSIVE_RESIZE == [24, 24] and cfg.resize_sizes == [24, 24]
    assert "--progressive-resize 24 24" in caplog.records[-1].getMessage()
    # not for grey images, smaller colour ones, or another model than the recipe's
    assert apply_recipe(RunConfig(recipe="fast"), _info(1, (28, 28)), set()).progressive_resize is None
    assert apply_recipe(RunConfig(recipe="fast"), _info(3, (16, 20)), set()).progressive_resize is None
    given = RunConfig(recipe="fast", model="resnet8")
    assert apply_recipe(given, _info(3, (32, 32)), {"recipe", "model"}).progressive_resize is None
    # sizes given win, and 0 turns it off
    given = RunConfig(recipe="fast", progressive_resize=[28])
    assert apply_recipe(given, _info(3, (32, 32)), {"recipe", "progressive_resize"}).resize_sizes == [28]
    with caplog.at_level(logging.INFO, logger="imgrec.recipes"):
        off = apply_recipe(RunConfig(recipe="fast", progressive_resize=[0]), _info(3, (32, 32)),
                           {"recipe", "progressive_resize"})
    assert off.progressive_resize == [0] and off.resize_sizes == []
    assert caplog.records[-1].getMessage().endswith("(given: --progressive-resize 0)")  # as typed, not [0]


def test_the_recipes_resizing_trains_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On 32x32 colour images the recipe's first two epochs train at 24x24, and --progressive-resize 0 keeps every
    epoch at full size; both run to the end and resume as finished."""
    folder = make_image_folder(tmp_path / "photos", size=32, per_class=12)
    sizes = {}
    for name, extra in (("recipe", []), ("off", ["--progressive-resize", "0"])):
        argv = ["train", "--data", str(folder), "--recipe", "fast", "--epochs", "3", "--batch-size", "16",
                "--project", str(tmp_path / "runs"), "--name", name, "--threads", "1", "--device", "cpu", *extra]
        code, out, err = run_main(argv, capsys)
        assert code == 0, err
        run = tmp_path / "runs" / name
        config = yaml.safe_load((run / "config.yaml").read_text())
        cfg = RunConfig(**{k: v for k, v in config.items() if k in ("progressive_resize", "epochs")})
        sizes[name] = (config["progressive_resize"], [resized_side(cfg, epoch, 3) for epoch in (1, 2, 3)])
        code, out, err = run_main(["train", "--resume", str(run)], capsys)
        assert code == 0 and "already finished" in out, err
    assert sizes == {"recipe": ([24, 24], [24, 24, None]), "off": ([0], [None, None, None])}


def test_with_a_time_budget_the_recipe_leaves_the_epochs_to_the_plan() -> None:
    cfg = apply_recipe(RunConfig(recipe="fast", time_budget="1m"), _info(1, (28, 28)), set())
    assert cfg.epochs == RunConfig().epochs


@pytest.mark.parametrize("channels,size", [(3, (64, 64)), (1, (28, 40)), (4, (32, 32))])
def test_other_shapes_are_one_clear_error(channels: int, size: tuple[int, int]) -> None:
    with pytest.raises(UsageError, match=r"--recipe fast is tuned for .* up to 32x32 .* add --image-size 32"):
        apply_recipe(RunConfig(recipe="fast"), _info(channels, size), set())


@pytest.mark.parametrize("flag", ["epochs", "max_steps"])
def test_a_budget_with_epochs_is_a_usage_error(flag: str) -> None:
    cfg = RunConfig(time_budget="2m", **{flag: 3})
    with pytest.raises(UsageError, match=f"give --{flag.replace('_', '-')} or --time-budget, not both"):
        recipe_data_settings(cfg, {flag, "time_budget"})


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "photos", size=16)
    cases = [
        (["--time-budget", "soon"], "--time-budget 'soon': give a positive duration such as 90s, 6m or 1h"),
        (["--time-budget", "1m", "--epochs", "3"], "give --epochs or --time-budget, not both"),
        (["--tta", "flip", "--augment", "crop"], "--tta flip needs flip in --augment"),
        (["--recipe", "slow"], "argument --recipe: invalid choice"),
        (["--ema", "1.5"], "--ema must be in [0, 1)"),
        (["--select", "last", "--patience", "2"], "give --patience or --select last, not both"),
        (["--select", "first"], "argument --select: invalid choice"),
    ]
    for argv, fragment in cases:
        code, _, err = run_main(["train", "--data", str(folder), "--project", str(tmp_path / "runs"), "--threads", "1",
                                 "--device", "cpu", *argv], capsys)
        assert code == 2, argv
        assert fragment in error_line(err), err


def test_a_budgeted_recipe_run_records_its_plan_and_resumes_without_replanning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_image_folder(tmp_path / "photos", size=16, per_class=20)
    argv = ["train", "--data", str(folder), "--recipe", "fast", "--time-budget", "20s", "--batch-size", "16",
            "--project", str(tmp_path / "runs"), "--name", "fast", "--threads", "1", "--device", "cpu"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "fast"
    plan = json.loads((run / "plan.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == "airnet" and config["batch_size"] == 16 and config["epochs"] == plan["epochs"]
    assert config["max_steps"] in (None, plan["total_steps"])
    assert plan["budget_seconds"] == 20 and plan["total_steps"] >= 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan"] == plan and summary["time_budget_seconds"] == 20
    # re-planned at epoch ends from the speed it really had: the state holds the last plan
    total = plan["revisions"][-1]["total_steps"] if plan.get("revisions") else plan["total_steps"]
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["config"]["epochs"] == math.ceil(total / plan["steps_per_epoch"]) and state["averaged"] is not None
    assert state["config"]["max_steps"] in (None, total)
    code, out, err = run_main(["train", "--resume", str(run)], capsys)
    assert code == 0 and "already finished" in out
    # config.yaml holds the first plan, the state the last: the resume does not take that for a hand edit
    assert "config.yaml" not in err and not (run / "config.yaml.edited").exists()
    code, _, err = run_main(["train", "--resume", str(run), "--epochs", str(state["config"]["epochs"] + 5)], capsys)
    assert code == 2 and "planned for --time-budget 20s" in error_line(err)


@pytest.mark.slow
def test_fashion_mnist_fast_recipe_within_a_short_budget(shared_data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["train", "--data", "fashion-mnist", "--data-dir", str(shared_data), "--recipe", "fast",
                               "--time-budget", "60s", "--threads", "1", "--project", str(tmp_path / "runs"),
                               "--name", "fm"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "fm"
    plan = json.loads((run / "plan.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "airnet-small" and summary["plan"] == plan and plan["total_steps"] >= 1
    assert summary["test_accuracy"] > 0.5  # a fraction of an epoch already learns most of Fashion-MNIST
    assert "test accuracy" in out
