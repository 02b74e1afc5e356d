"""Training recipes (--recipe fast) and time budgets (--time-budget): settings chosen for the data at hand.

`recipe_data_settings` runs before the data loads (the recipe's validation fraction), `apply_recipe` after it
(model, optimiser, schedule, augmentation and precision by image shape), and `plan_time_budget` once the model
is built: it measures the run's speed (engine.budget) and sets cfg.epochs and cfg.max_steps so that the whole
run ends within the budget. Settings the user gave explicitly always win. Like workflows, this module joins
config, data and engine; only workflows imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import fields, replace
from typing import Any

import torch

from imgrec.config import RunConfig, flag_name
from imgrec.data.info import DataBundle, DatasetInfo
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchTransform
from imgrec.engine.budget import BudgetPlan, StepCosts, fit_budget_epochs, measure_speed, plan_budget
from imgrec.engine.system import EVAL_BATCH_SIZE, Compute
from imgrec.errors import UsageError
from imgrec.inference.calibrate import calibration_split

log = logging.getLogger(__name__)

MAX_SIDE = 32  # the fast recipe is tuned for 28x28 grey and 32x32 colour images

# Shared by both shapes (airbench's, per image: SGD with Nesterov momentum 0.85, learning rate 1.5 per 1,024 images,
# weight decay 0.0153 / 11.5 per step): a warm-up then linear decay, lookahead, label smoothing, translation by up to
# 1/16 of the size and mirroring, flip-and-translate test-time augmentation for the least confident quarter of the
# test images (as accurate as for all of them on Fashion-MNIST, at 2.5 passes an image instead of 6); 2% of the
# training images validate (enough for temperature scaling and the out-of-distribution threshold, little taken from
# training) and the last epoch's weights are kept: the schedule decays to zero, and a validation set that small
# picks among the last epochs by noise. Both train their conv filters with Muon at 0.1 instead (SGD as above for the
# rest), for about 4-5% more time a step: 93.98% against 93.72% at 5 epochs on Fashion-MNIST over two seeds, 89.98%
# against 89.42% at 6 epochs on the CIFAR-10 JPEGs (seed 0). The grey one trains on the hardest 70% of each class
# (--keep-hardest, an MLP proxy), 17 epochs for the steps of 12 on every image: +0.34 points on Fashion-MNIST in both
# seeds screened at the same steps; on the CIFAR-10 JPEGs the MLP proxy lost 0.36 points, so colour keeps every image.
_COMMON: dict[str, Any] = dict(optimizer="sgd", lr=0.375, momentum=0.85, weight_decay=1.33e-3, batch_size=256,
                               schedule="linear", lookahead=True, augment="translate,flip", tta="unsure",
                               val_fraction=0.02, select="last")
RECIPES: dict[str, dict[str, Any]] = {
    "grey": dict(_COMMON, model="airnet-small", optimizer="muon", muon_lr=0.1, label_smoothing=0.1, epochs=17,
                 keep_hardest=0.7),
    "colour": dict(_COMMON, model="airnet", optimizer="muon", muon_lr=0.1, label_smoothing=0.2, epochs=10),
}
# 32x32 colour images with the recipe's own model: the first two epochs at 24x24 (56% of the pixels, about half an
# epoch's time each), so that about 6 epochs fit where 5 did. In the tutorial's CIFAR-10 time (a budget of 633-638 s,
# the JPEG archive, seed 0) it reached 89.78% against 89.59% and 89.87% against 89.37%, each pair the same day.
COLOUR_PROGRESSIVE_RESIZE = [24, 24]
DATA_SETTINGS = ("val_fraction",)  # chosen before the data loads: they decide the splits


def explicit_settings(cfg: RunConfig, given: Collection[str] | None) -> set[str]:
    """The settings the user chose: those given (flags and --config keys), or, when unknown, those that differ
    from RunConfig's defaults."""
    if given is not None:
        return set(given)
    defaults = RunConfig()
    return {f.name for f in fields(RunConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def recipe_data_settings(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """The recipe's data settings (the validation fraction), before the data loads; checks --time-budget's company."""
    if cfg.time_budget is not None:
        clash = sorted({"epochs", "max_steps"} & explicit)
        if clash:
            flag = "--" + clash[0].replace("_", "-")
            raise UsageError(f"give {flag} or --time-budget, not both: the budget plans the epochs")
    if cfg.recipe == "none":
        return cfg
    chosen = {k: RECIPES["grey"][k] for k in DATA_SETTINGS if k not in explicit}
    return replace(cfg, **chosen)


def apply_recipe(cfg: RunConfig, info: DatasetInfo, explicit: set[str]) -> RunConfig:
    """The recipe's settings for the data's shape, under the ones given explicitly; logs what it chose."""
    if cfg.recipe == "none":
        return cfg
    shape = f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}"
    if info.channels not in (1, 3) or max(info.image_size) > MAX_SIDE:
        raise UsageError(f"--recipe {cfg.recipe} is tuned for grey or colour images of up to {MAX_SIDE}x{MAX_SIDE} "
                         f"(28x28 grey, 32x32 colour) but these are {shape}: add --image-size {MAX_SIDE}, or drop "
                         f"--recipe and choose the settings")
    kind = "grey" if info.channels == 1 else "colour"
    settings = dict(RECIPES[kind])  # precision stays auto: bf16 where the CPU or GPU computes it natively
    if kind == "colour" and min(info.image_size) == MAX_SIDE and "model" not in explicit:  # another model may not
        settings["progressive_resize"] = list(COLOUR_PROGRESSIVE_RESIZE)                  # take smaller images
    if cfg.time_budget is not None:
        settings.pop("epochs")  # the budget plans them
    chosen = {k: v for k, v in settings.items() if k not in explicit and k not in DATA_SETTINGS}
    if cfg.lookahead and "ema" in chosen:  # one weight average: the one given
        chosen.pop("ema")
    if cfg.ema and "lookahead" in chosen:
        chosen.pop("lookahead")
    if cfg.patience and "select" in chosen:  # early stopping keeps the best validated epoch
        chosen.pop("select")
    augment = chosen.get("augment", cfg.augment)
    if "tta" in chosen and "flip" not in augment.split(","):
        chosen["tta"] = "none"  # flip TTA only for models trained on flipped images
    kept = [k for k in settings if k in explicit and k not in DATA_SETTINGS]
    given = f" (given: {', '.join(_flag(k, getattr(cfg, k)) for k in kept)})" if kept else ""
    log.info(f"recipe {cfg.recipe} for {shape} {kind} images: " + ", ".join(_flag(k, v) for k, v in chosen.items())
             + given)
    return replace(cfg, **chosen)


def _flag(key: str, value: Any) -> str:
    """A setting as it would be typed: --lookahead, --lr 0.375, --progressive-resize 24 24."""
    if value is True:
        return f"--{flag_name(key)}"
    return f"--{flag_name(key)} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def plan_time_budget(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, train_transform: BatchTransform,
                     eval_transform: BatchTransform, elapsed: float, compute: Compute | None = None,
                     costs: StepCosts | None = None) -> tuple[RunConfig, BudgetPlan]:
    """Measure the speed of this run and plan its steps to end within cfg.time_budget (elapsed: seconds gone);
    costs: its epochs' step costs relative to the measured full-size steps (progressive resizing)."""
    from imgrec.config import parse_duration

    loader = make_loader(bundle.train, cfg.batch_size, train_transform, train=True, seed=cfg.seed, workers=cfg.workers)
    loader.set_epoch(0)  # an epoch that training never draws (it starts at epoch 1)
    eval_split = bundle.test
    images, _ = next(iter(make_loader(eval_split, min(EVAL_BATCH_SIZE, len(eval_split)), eval_transform,
                                      train=False, workers=0)))
    speed = measure_speed(model, loader, images, cfg, compute)
    val_images = len(bundle.val) if bundle.val is not None else 0
    calibration = len(calibration_split(bundle)[1])
    # after training: temperature on val and the OOD threshold on the calibration images, then the test split; when
    # best.pt and last.pt hold different epochs the first two run twice, which the margin covers (val is small)
    final_images = val_images + calibration + len(bundle.test)
    plan = plan_budget(parse_duration(cfg.time_budget or ""), elapsed + speed.measure_seconds, speed, len(loader),
                       val_images, final_images, costs)
    log.info(plan.describe())
    return fit_budget_epochs(cfg, plan.total_steps, plan.steps_per_epoch), plan
