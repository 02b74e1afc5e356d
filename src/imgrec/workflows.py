"""What the commands do, end to end: train a run, evaluate weights (with the run report), show samples.

This is the one place where data, models, the engine and evaluation meet for training (a finished run is loaded
through imgrec.saved_runs); the CLI only parses arguments and calls these functions, which return plain results
(and raise ImgrecError for the user to read).
Under torchrun, train and resume run in every process (engine/distributed.py): the main process makes and
writes the run folder and tells the others where it is; after training it alone tests and reports.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgrec.config import RunConfig, flag_name, load_yaml, parse_duration, resume_safe_settings
from imgrec.data.datasets import NAMED_DATASETS, load_data
from imgrec.data.info import DataBundle, DatasetInfo
from imgrec.data.loaders import make_loader
from imgrec.data.transforms import BatchMix, BatchTransform, parse_augment
from imgrec.data.verify import skipped_table, skipped_warning
from imgrec.engine import distributed
from imgrec.engine.board import TensorBoardLog, summary_writer_class
from imgrec.engine.budget import Deadline, StepCosts
from imgrec.engine.checkpoint import (
    load_model_state,
    load_weights_file,
    remove_partial_writes,
)
from imgrec.engine.flops import peak_rss_mb, training_flops_per_image
from imgrec.engine.lr_finder import RangeTest, range_test
from imgrec.engine.runs import (
    RunLock,
    check_run_name,
    create_run_dir,
    default_run_name,
    find_run,
    read_results,
    write_json,
    write_text,
)
from imgrec.engine.selection import (
    PROXY_BATCH,
    SELECTION_FILE,
    Selection,
    choose_hardest,
    proxy_input,
    read_selection,
)
from imgrec.engine.state import (
    PREVIOUS_STATE_FILE,
    STATE_FILE,
    Progress,
    check_same_data,
    check_world_size,
    load_state,
    make_current,
    resolve_state,
    resume_config,
    resumed_settings,
)
from imgrec.engine.system import (
    EVAL_BATCH_SIZE,
    Compute,
    git_commit,
    precision_name,
    seed_everything,
    set_threads,
    versions,
)
from imgrec.engine.trainer import FitResult, Loader, fit, inverse_frequency_weights, scaled_size
from imgrec.errors import ImgrecError, UsageError, os_error_cause
from imgrec.evaluation.drawing import FigureDrawer
from imgrec.evaluation.plots import plot_results
from imgrec.finetune import InputSpec, fit_on_features, input_spec, load_source, resolve_source, transfer_plan
from imgrec.inference.calibrate import calibrate_run
from imgrec.models.hooks import FitsToImages
from imgrec.models.registry import build_model, count_parameters, is_user_model
from imgrec.models.transfer import TransferModel
from imgrec.recipes import apply_recipe, explicit_settings, plan_time_budget, recipe_data_settings
from imgrec.reporting import dataset_summary, report_split, write_html_report
from imgrec.saved_runs import (
    DataSource,
    data_options,
)

log = logging.getLogger(__name__)



@dataclass
class TrainOutcome:
    run_dir: Path
    summary: dict[str, Any]
    already_finished: bool = False  # a resumed run that had nothing left to do
    main_process: bool = True  # False in the other processes of a torchrun group (the main one reports)
    last_batch_at: float | None = None  # time.perf_counter() once the last training step was done


@dataclass
class ResumePoint:
    """A run to continue: its training state file and what it holds."""

    path: Path
    state: dict[str, Any]


def with_data_dir_recorded(cfg: RunConfig) -> RunConfig:
    """The config with the folder its named data set is read from, as an absolute path: the run's config.yaml and
    weights then find their data from any shell (evaluate, explain and export read it; --data-dir overrides it)."""
    if cfg.data not in NAMED_DATASETS or not NAMED_DATASETS[cfg.data].files:
        return cfg
    return dataclasses.replace(cfg, data_dir=str(Path(cfg.data_root).expanduser().resolve()))


@distributed.group_errors()
def resume(run: str | Path, given: dict[str, Any], data: DataSource | None = None) -> TrainOutcome:
    """Continue a run from its training state with the given (resume-safe) settings; a finished run is left as is.
    A run stopped during its start-up, before it saved any state, starts again from the beginning in its folder.
    data: where its images come from when not from its data setting (a run trained on data passed from Python)."""
    distributed.setup(given.get("dist_timeout", RunConfig.dist_timeout))
    with ExitStack() as owned:  # the main process owns the run folder from here to the end of training
        # The main process reads the run folder; the others get its state from it (their machines may not see it).
        path, state, cfg, notes, summary = distributed.from_main(lambda: _resume_point(run, given, owned))
        if summary is not None:
            return TrainOutcome(path.parent, summary, already_finished=True, main_process=distributed.is_main())
        for note in notes:
            log.info(note)
        return train(cfg, ResumePoint(path, state) if state is not None else None, data=data)


def _resume_point(run: str | Path, given: dict[str, Any], owned: ExitStack,
                  ) -> tuple[Path, dict | None, RunConfig, list[str], dict | None]:
    """The state to resume and its config; the run's summary instead when it has nothing left to do; no state
    (None) and the config to start again with when the run never got to save one."""
    target = Path(run)
    if target.exists():  # before anything is read: another process may be writing it
        owned.enter_context(RunLock(target if target.is_dir() else target.parent))
        _clear_partial_writes(target if target.is_dir() else target.parent)
    if _stopped_in_start_up(target):
        return target, None, *_restart_config(target, given), None
    path = resolve_state(run)
    state = load_state(path)
    cfg, notes = resume_config(state, given, path)
    _keep_edits_aside(path.parent, state["config"])
    check_world_size(state)
    for folder in (path.parent, path.parent / "weights"):
        remove_partial_writes(folder)  # what a kill in the middle of a write left behind
    progress = Progress.from_dict(state["progress"])
    summary = path.parent / "summary.json"
    if progress.finished(cfg.epochs, cfg.patience) and summary.is_file():
        return path, state, cfg, notes, json.loads(summary.read_text())
    return make_current(path), state, cfg, notes, None


EDITED_CONFIG = "config.yaml.edited"  # a run's config.yaml as someone changed it, kept aside by --resume


def _keep_edits_aside(folder: Path, saved: dict[str, Any]) -> None:
    """A warning when the run's config.yaml no longer says what its training state was saved with (edited by hand,
    or unreadable). --resume continues with the saved settings, so the changed file is copied to
    config.yaml.edited (.1, .2, ... after that) and config.yaml is written again from the state, even when the run
    has nothing left to do: the edits are neither lost nor taken silently, and config.yaml says what the run is.
    Resume-safe settings (flags of an earlier --resume) and a time budget's planned steps may differ: not edits."""
    source = folder / "config.yaml"
    if not source.is_file() and not source.is_symlink():
        return  # gone, or never written: it is written again
    planned = set(resume_safe_settings()) | {"max_steps"}
    try:
        written = load_yaml(source)
        changed = sorted(k for k in written.keys() | saved.keys() if k not in planned and written.get(k) != saved.get(k))
        if not changed:
            return
        what = "; ".join(f"{k}: {written.get(k)!r} there, {saved.get(k)!r} saved" for k in changed[:4])
        what += f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
        why = f"was changed after the run saved its training state ({what})"
    except ImgrecError as exc:
        why = f"cannot be read ({exc})"
    kept = folder / EDITED_CONFIG
    for number in range(1, 1000):  # an earlier edit kept aside stays: config.yaml.edited.1, .2, ...
        if not kept.exists() and not kept.is_symlink():
            break
        kept = folder / f"{EDITED_CONFIG}.{number}"
    try:  # the file as it is, then config.yaml again as the run has it (atomically: one or the other is there)
        shutil.copyfile(source, kept)
        write_text(source, RunConfig.from_dict(saved, source=str(source)).to_yaml())
    except OSError as exc:
        raise ImgrecError(f"{source} {why}, and cannot be kept aside and written again: {os_error_cause(exc)}") from None
    log.warning(f"{source} {why}: --resume continues with the saved settings (only "
                f"{', '.join('--' + flag_name(k) for k in resume_safe_settings())} may change, given as flags); "
                f"the changed file is kept as {kept} (a new run takes its settings with --config {kept})")


def _stopped_in_start_up(folder: Path) -> bool:
    """A run folder whose training was stopped (killed) during its start-up: config.yaml, but no training state."""
    return (folder.is_dir() and (folder / "config.yaml").is_file()
            and not any((folder / name).exists() for name in (STATE_FILE, PREVIOUS_STATE_FILE, "summary.json")))


def _restart_config(folder: Path, given: dict[str, Any]) -> tuple[RunConfig, list[str]]:
    """The config a run that never saved a state starts again with: its config.yaml (and the resume-safe settings
    given), in its own folder."""
    source = folder / "config.yaml"
    _, cfg = resumed_settings(load_yaml(source), given, source)
    cfg = dataclasses.replace(cfg, project=str(folder.parent), name=folder.name, exist_ok=True)
    return cfg, [f"{folder} stopped before it saved a training state: starting it again from the beginning with its "
                 f"config.yaml"]


def _restarted(cfg: RunConfig) -> TrainOutcome | None:
    """After torchrun restarted a failed group (--max-restarts): resume the run this command started, in the
    same folder, as `imgrec train --resume` would; None when there is nothing to resume (start afresh)."""
    name = cfg.name or default_run_name(cfg.data, cfg.model)
    found = distributed.from_main(lambda: _with_state(find_run(cfg.project, name, cfg.to_dict())))
    if found is None:
        return None
    folder, has_state = found
    if not has_state:  # killed before its first save: start again in the same folder
        log.info(f"restart {distributed.restart_count()}: {folder} has no training state yet; starting it again")
        cfg.name, cfg.exist_ok = folder.name, True
        return None
    log.info(f"restart {distributed.restart_count()}: resuming {folder} from its last training state")
    return resume(folder, {k: getattr(cfg, k) for k in resume_safe_settings()})


def _with_state(folder: Path | None) -> tuple[Path, bool] | None:
    return None if folder is None else (folder, (folder / "train_state.pt").is_file())


@distributed.group_errors()
def train(cfg: RunConfig, resumed: ResumePoint | None = None, given: Collection[str] | None = None,
          started: float | None = None, data: DataSource | None = None) -> TrainOutcome:
    """Load the data, build the model, fit (or continue a saved run), test the best weights, write the run folder.

    given: the settings the user chose explicitly (they win over --recipe; default: those unlike the defaults);
    started: the time.perf_counter() at which the command started (what --time-budget counts from);
    data: the data loaded from the options when it does not come from cfg.data (data passed from Python).
    The main process owns the run folder (RunLock) until the end; a new folder that fails before training saved
    anything is removed again."""
    with ExitStack() as owned:
        return _train(cfg, resumed, given, started, data, owned)


def _train(cfg: RunConfig, resumed: ResumePoint | None, given: Collection[str] | None, started: float | None,
           data: DataSource | None, owned: ExitStack) -> TrainOutcome:
    started = time.perf_counter() if started is None else started
    cfg, restarted = _join_and_check(cfg, resumed, owned)
    if restarted is not None:
        return restarted
    here = distributed.context()
    # the report's figures: a worker loads matplotlib now, beside this process's single-threaded start
    drawer = owned.enter_context(FigureDrawer(workers=None if here.is_main else 0))
    set_threads(cfg.threads)
    compute = Compute.of(cfg)  # a bad --device fails before any data is loaded
    if cfg.log == "tensorboard":
        summary_writer_class()  # so does a missing tensorboard package
    explicit = explicit_settings(cfg, given)
    if not resumed:  # a resumed run keeps the settings and the plan its state holds
        cfg = recipe_data_settings(cfg, explicit)
    source = resolve_source(cfg)  # --pretrained / --weights: a missing or foreign file fails before the data loads
    bundle = data(data_options(cfg)) if data is not None else load_data(cfg.data, data_options(cfg))
    info = bundle.info
    if not resumed:
        cfg = apply_recipe(cfg, info, explicit)
    for note in bundle.notes:
        log.info(note)
    model, spec, plain = _start_model(cfg, bundle, source, resumed is not None)
    check_progressive_resize(cfg, model, spec, info.num_classes)
    selection = keep_hardest(cfg, bundle, plain, compute, resumed.path.parent if resumed else None)
    found = None
    if cfg.lr == "find":  # a resumed run has the number in its config
        found = find_lr(cfg, bundle, model, spec, compute=compute)
        cfg = dataclasses.replace(cfg, lr=found.suggestion)
    deadline = None
    if cfg.time_budget and not resumed:  # a new budgeted run keeps to its budget; a resumed one to its saved plan
        cfg, deadline = _budget(cfg, bundle, model, spec, plain, started, compute)
    run_dir = _run_folder(cfg, bundle, resumed, owned)
    if selection is not None and not resumed and here.is_main:
        write_json(run_dir / SELECTION_FILE, selection.to_dict())
    if found is not None:
        _plot_lr_find(found, run_dir / "lr_find.png")
    distributed.seed_processes(cfg.seed)  # the model is built: each process its own dropout from here on
    _log_start(cfg, run_dir, bundle, model, source, spec)
    val_loader = make_loader(bundle.val, EVAL_BATCH_SIZE, plain, train=False, workers=cfg.workers,
                             shard=here.shard) if bundle.val else None
    meta = weights_meta(cfg, info, model, spec)
    if resumed:
        _check_resumed(resumed, meta, len(bundle.train))
    board = TensorBoardLog(run_dir) if cfg.log == "tensorboard" and here.is_main else None
    try:
        return _fit_and_test(cfg, bundle, model, spec, plain, val_loader, run_dir, meta, resumed, deadline,
                             source, started, board, compute, drawer)
    finally:
        if board is not None:
            board.close()


def _join_and_check(cfg: RunConfig, resumed: ResumePoint | None, owned: ExitStack,
                    ) -> tuple[RunConfig, TrainOutcome | None]:
    """Before any data is loaded: the run's name checked, its data folder recorded, the process group joined, and
    a folder another command is writing (--exist-ok) refused; after torchrun restarted the group, the resumed run's
    outcome instead."""
    if cfg.name is not None and not resumed:
        check_run_name(cfg.name)
    if resumed is None:
        cfg = with_data_dir_recorded(cfg)
    distributed.setup(cfg.dist_timeout)
    if resumed is None and distributed.restart_count() > 0:
        outcome = _restarted(cfg)
        if outcome is not None:
            return cfg, outcome
    if cfg.exist_ok and not resumed:
        existing = Path(cfg.project) / (cfg.name or default_run_name(cfg.data, cfg.model))
        distributed.from_main(lambda: _lock(existing, owned) if existing.is_dir() else None)
    return cfg, None


def _budget(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec, plain: BatchTransform,
            started: float, compute: Compute) -> tuple[RunConfig, Deadline]:
    """--time-budget: this run's speed measured, its steps planned (cfg.epochs, cfg.max_steps) and the deadline
    fit() keeps to."""
    if distributed.context().distributed:
        raise UsageError("--time-budget plans one process's speed: run it without torchrun, or give --epochs")
    costs = StepCosts.of(cfg, spec.size)  # --progressive-resize: its first epochs' steps cost less
    cfg, plan = plan_time_budget(cfg, bundle, model, train_transform(cfg, bundle, model, spec), plain,
                                 time.perf_counter() - started, compute, costs)
    return cfg, Deadline.from_plan(plan, started, costs)


def _log_start(cfg: RunConfig, run_dir: Path, bundle: DataBundle, model: torch.nn.Module, source: Any,
               spec: InputSpec) -> None:
    """The run folder, the data, the model and (transfer learning) what trains when."""
    info = bundle.info
    log.info(f"run folder: {run_dir}")
    log.info(f"data: {info.name}: {len(bundle.train)} train / {len(bundle.val) if bundle.val else 0} val / "
             f"{len(bundle.test)} test, {info.num_classes} classes, {info.channels}x{info.image_size[0]}x{info.image_size[1]}")
    log.info(f"model: {cfg.model}, {count_parameters(model):,} parameters"
             + (f", weights from {source.description}" if source else ""))
    if source:
        log.info(transfer_plan(cfg, info, spec))


def _check_resumed(resumed: ResumePoint, meta: dict[str, Any], train_images: int) -> None:
    """A resumed run's data must be what its state was trained on; logs where it goes on from."""
    check_same_data(resumed.state, meta, train_images, resumed.path)
    at = Progress.from_dict(resumed.state["progress"])
    log.info(f"resuming from {resumed.path}: epoch {at.epoch}, step {at.step}")


def _fit_and_test(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec, plain: BatchTransform,
                  val_loader: Any, run_dir: Path, meta: dict[str, Any], resumed: ResumePoint | None,
                  deadline: Deadline | None, source: Any, started: float,
                  board: TensorBoardLog | None, compute: Compute, drawer: FigureDrawer) -> TrainOutcome:
    """Train, then (in the main process) calibrate, test and report; the end of train()."""
    here = distributed.context()
    try:
        result, feature_seconds = _fit(cfg, bundle, model, spec, plain, val_loader, run_dir, meta, resumed, compute,
                                       deadline, board)
    finally:  # the plan and its revisions, also when training stopped (a resumed run reports it from there)
        if deadline is not None and here.is_main:
            write_json(run_dir / "plan.json", deadline.record())
    distributed.teardown()  # from here on the main process works alone: calibration, the test report
    if not here.is_main:
        return TrainOutcome(run_dir, {}, main_process=False)
    if here.distributed and bundle.val:  # the whole validation split now, not this process's shard
        val_loader = make_loader(bundle.val, EVAL_BATCH_SIZE, plain, train=False, workers=cfg.workers)
    drawer.draw(plot_results, read_results(run_dir / "results.csv"), run_dir / "results.png")
    # temperature, OOD threshold and training-image background, for the report and `predict`
    calibrate_run(model, val_loader, run_dir, bundle, cfg, plain, compute)
    summary = _test_and_report(model, bundle, cfg, run_dir, result, started, compute, drawer)
    if board is not None:
        log_final(board, cfg, summary, run_dir)
    if source:
        summary.update(weights_source=source.description, feature_cache_seconds=feature_seconds)
    if cfg.time_budget:  # the plan (also on resume: it is in plan.json) and how well the run kept to it
        summary.update(time_budget_seconds=parse_duration(cfg.time_budget), plan=_read_plan(run_dir))
    timing = _timing(result, started)
    if timing:
        summary["timing"] = timing
    if source or cfg.time_budget or timing:
        write_json(run_dir / "summary.json", summary)
    _clear_partial_writes(run_dir)  # a finished run holds no temporary file, whatever an earlier kill cut short
    return TrainOutcome(run_dir, summary, last_batch_at=result.last_batch_at)


def _timing(result: FitResult, started: float) -> dict[str, float] | None:
    """Where the run's time went outside its training steps: from the start of the command (or of imgrec.train)
    to its first training batch (imports, data, model), and from its last step to the finished run folder
    (validation, calibration, the test pass, figures and report.html)."""
    if result.first_batch_at is None or result.last_batch_at is None:
        return None
    return {"startup_seconds": round(result.first_batch_at - started, 3),
            "training_seconds": round(result.last_batch_at - result.first_batch_at, 3),
            "after_training_seconds": round(time.perf_counter() - result.last_batch_at, 3)}


def _start_model(cfg: RunConfig, bundle: DataBundle, source: Any, resumed: bool,
                 ) -> tuple[torch.nn.Module, InputSpec, BatchTransform]:
    """The model to train, its input spec and its plain (evaluation) transform: built for the data's classes and
    started from --pretrained / --weights or fitted to the data where the model wants it (not when resumed: the
    training state has the weights)."""
    # Seed after loading: decoding a folder the first time draws from torch's generator, a cached load does not.
    seed_everything(cfg.seed, cfg.deterministic)
    info = bundle.info
    spec = input_spec(info, source)
    model = build_model(cfg.model, info.num_classes, spec.channels, spec.size)  # a new head for the data's classes
    if source and not resumed:  # a resumed run's weights come from its training state
        load_source(model, cfg.model, source)
    plain = BatchTransform(spec.mean, spec.std, size=spec.size, channels=spec.channels)
    if not source and not resumed and isinstance(model, FitsToImages):
        init_from_data(model, bundle, plain, cfg.seed)
    return model, spec, plain


def check_progressive_resize(cfg: RunConfig, model: torch.nn.Module, spec: InputSpec, num_classes: int) -> None:
    """--progressive-resize: every size below the model's input, and a model that takes the smaller images (one
    forward pass of two blank images at each size, in evaluation mode with the random generators left as they
    were: nothing of the model or the run changes). A model with a fixed-size layer (a Linear after a flatten) is
    a one-line usage error."""
    sizes = cfg.resize_sizes
    if not sizes:
        return
    flag = "--progressive-resize " + " ".join(map(str, sizes))
    shape = f"{spec.size[0]}x{spec.size[1]}"
    if max(sizes) >= min(spec.size):
        raise UsageError(f"{flag}: the model's input is {shape}; give sizes below {min(spec.size)} (the shorter side "
                         f"in pixels)")
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for side in sorted(set(sizes)):
                size = scaled_size(spec.size, side)
                try:
                    out = model(torch.zeros(2, spec.channels, *size))
                except Exception as exc:  # a shape mismatch, or a user model's own check of the size
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise UsageError(f"{flag}: model {cfg.model!r} built for {shape} images does not take "
                                     f"{size[0]}x{size[1]} ones ({first}); use larger sizes, a model with global "
                                     f"pooling (airnet, airnet-small, resnet8, speednet), or drop --progressive-resize"
                                     ) from None
                if tuple(out.shape) != (2, num_classes):
                    raise UsageError(f"{flag}: model {cfg.model!r} gives outputs of shape {tuple(out.shape)} for "
                                     f"{size[0]}x{size[1]} images instead of (2, {num_classes}); use a model with "
                                     f"global pooling or drop --progressive-resize")
    finally:
        model.train(was_training)


LR_FIND_STEPS = 200  # steps of the range test (at most: it stops when the loss diverges)


def keep_hardest(cfg: RunConfig, bundle: DataBundle, plain: BatchTransform, compute: Compute,
                 run_dir: Path | None) -> Selection | None:
    """--keep-hardest: the training split cut to the images a proxy finds hardest (chosen now, or for a resumed
    run read from its run_dir's selection.json); None when every image trains."""
    if cfg.keep_hardest >= 1:
        return None
    if distributed.context().distributed:
        raise UsageError("--keep-hardest chooses its images in one process: run it without torchrun")
    labels = bundle.train.labels
    if run_dir is not None:
        selection = read_selection(run_dir / SELECTION_FILE, len(labels), cfg.keep_hardest)
    else:
        def proxy() -> torch.nn.Module:
            return _proxy_model(cfg, bundle, plain)

        train_loader = make_loader(bundle.train, PROXY_BATCH, plain, train=True, seed=cfg.seed, workers=cfg.workers)
        score_loader = make_loader(bundle.train, EVAL_BATCH_SIZE, plain, train=False, workers=cfg.workers)
        selection = choose_hardest(proxy, train_loader, score_loader, labels, cfg.keep_hardest, compute, cfg.seed)
        log.info(selection.describe())
    bundle.train = bundle.train.subset(selection.kept)
    return selection


def _proxy_model(cfg: RunConfig, bundle: DataBundle, plain: BatchTransform) -> torch.nn.Module:
    """--proxy-model for --keep-hardest, on the images average-pooled to at most PROXY_SIZE a side; a model with
    a data-dependent first layer (airnet-small's whitening) is fitted to those pooled images."""
    info = bundle.info
    size = proxy_input(info.image_size)
    pool = torch.nn.AdaptiveAvgPool2d(size) if size != tuple(info.image_size) else torch.nn.Identity()
    model = build_model(cfg.proxy_model, info.num_classes, info.channels, size)
    if isinstance(model, FitsToImages):
        init_from_data(model, bundle, plain, cfg.seed, resize=pool, name="keep-hardest proxy")
    return torch.nn.Sequential(pool, model)


def find_lr(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec,
            steps: int = LR_FIND_STEPS, compute: Compute | None = None) -> RangeTest:
    """The learning-rate range test of a copy of model on the run's training batches (augmented, mixed and
    balanced as the run's), with its optimiser, loss and precision; logs the suggestion."""
    if distributed.context().distributed:
        raise UsageError("--lr find runs the range test in one process: run imgrec lr-find first, then torchrun "
                         "with --lr set to its suggestion")
    numeric = dataclasses.replace(cfg, lr=1e-3)  # the optimiser's base rate: the test sets the rates itself
    loader = training_loader(cfg, bundle, model, spec)
    weights = balance_weights(cfg, bundle.train.labels, bundle.info.num_classes)
    started = time.perf_counter()
    found = range_test(model, loader, numeric, steps=steps, class_weights=weights, compute=compute)
    stop = "the loss diverged" if found.diverged else "all steps ran"
    log.info(f"lr-find: {len(found.lrs)} steps from {found.lrs[0]:.0e} to {found.lrs[-1]:.2g} ({stop}, "
             f"{time.perf_counter() - started:.1f}s); the loss is lowest at {found.minimum:.3g}: suggested --lr "
             f"{found.suggestion:.3g}")
    return found


@dataclass
class LRFindOutcome:
    result: RangeTest
    plot: Path
    config: RunConfig  # the settings the test ran with (after --recipe)

    @property
    def suggestion(self) -> float:
        """The suggested learning rate."""
        return self.result.suggestion


def lr_find(cfg: RunConfig, out: str | Path | None = None, steps: int = LR_FIND_STEPS,
            given: Collection[str] | None = None, data: DataSource | None = None) -> LRFindOutcome:
    """The learning-rate range test for cfg's data, model and optimiser (`imgrec lr-find`): the suggestion, and
    a figure of the loss against the rate at out (default: lr_find.png). data: as train's."""
    if distributed.context().distributed:
        raise UsageError("imgrec lr-find runs in one process: run it without torchrun")
    cfg = with_data_dir_recorded(cfg)
    set_threads(cfg.threads)
    Compute.of(cfg)  # a bad --device fails before any data is loaded
    explicit = explicit_settings(cfg, given)
    cfg = recipe_data_settings(cfg, explicit)
    source = resolve_source(cfg)
    bundle = data(data_options(cfg)) if data is not None else load_data(cfg.data, data_options(cfg))
    cfg = apply_recipe(cfg, bundle.info, explicit)
    for note in bundle.notes:
        log.info(note)
    model, spec, plain = _start_model(cfg, bundle, source, resumed=False)
    keep_hardest(cfg, bundle, plain, Compute.of(cfg), None)  # the images the run would train on
    found = find_lr(cfg, bundle, model, spec, steps)
    path = Path(out) if out else Path("lr_find.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return LRFindOutcome(found, _plot_lr_find(found, path), cfg)


def _plot_lr_find(found: RangeTest, path: Path) -> Path:
    from imgrec.evaluation.plots import plot_lr_find

    return plot_lr_find(found.lrs, found.losses, found.smoothed, found.suggestion, path)


INIT_IMAGES = 5000  # training images a data-dependent first layer (a whitening stem) is fitted to


def init_from_data(model: FitsToImages, bundle: DataBundle, plain: BatchTransform, seed: int,
                   resize: torch.nn.Module | None = None, name: str = "model") -> None:
    """Fit a model's data-dependent layers to a random sample of the training images (normalised, not augmented,
    then through resize if given); the same sample for the same seed, so every process of a data-parallel run fits
    the same weights."""
    count = min(INIT_IMAGES, len(bundle.train))
    chosen = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[:count]
    images, _ = next(iter(make_loader(bundle.train.subset(chosen), count, plain, train=False, workers=0)))
    model.init_from_images(resize(images) if resize is not None else images)
    log.info(f"{name}: first layer fitted to {count} training images")


def _read_plan(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "plan.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_transform(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec) -> BatchTransform:
    """The training batches' preprocessing: augmentation (--augment), normalisation, the model's input size."""
    augment = parse_augment(cfg.augment, bundle.info.channels, photos=isinstance(model, TransferModel))
    if cfg.tta != "none" and "flip" not in augment:
        raise UsageError(f"--tta {cfg.tta} needs flip in --augment (now: {','.join(augment) or 'none'}): a model that "
                         f"never saw mirror images gains nothing from them; add flip, or drop --tta")
    return BatchTransform(spec.mean, spec.std, augment, size=spec.size, channels=spec.channels,
                          alternate_flip=cfg.alternate_flip)


def _test_and_report(model: torch.nn.Module, bundle: DataBundle, cfg: RunConfig, run_dir: Path, result: FitResult,
                     started: float, compute: Compute, drawer: FigureDrawer) -> dict[str, Any]:
    """Test the best weights; write metrics.json, the figures (drawer's, with results.png already asked of it),
    report.html and, last, summary.json."""
    best_path = run_dir / "weights" / "best.pt"
    best = load_weights_file(best_path)
    load_model_state(model, best["state_dict"], best_path)
    metrics = report_split(model, best, bundle.test, "test", cfg, run_dir, dataset_summary(bundle), drawer, compute)
    metrics.update(data=cfg.data, weights=str(best_path))
    write_json(run_dir / "metrics.json", metrics)
    summary = {
        "data": cfg.data, "model": cfg.model, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"], "test_macro_f1": metrics["macro_f1"],
        "test_balanced_accuracy": metrics["balanced_accuracy"], "test_imbalanced": metrics["imbalanced"],
        "test_ece": metrics["ece"], "test_ece_calibrated": metrics["calibration"].get("ece_after"),
        "temperature": best.get("temperature"), "best_val_accuracy": result.best_val_accuracy,
        "params": count_parameters(model), "train_seconds": round(result.train_seconds, 3),
        "images_per_second": round(result.images_per_second, 1),
        "total_seconds": round(time.perf_counter() - started, 3), "stopped_early": result.stopped_early,
        "train_images": len(bundle.train), "test_images": len(bundle.test), "classes": bundle.info.classes,
        "versions": versions(), "git_commit": git_commit(), **_compute_summary(model, best, cfg, result, compute),
    }
    drawer.finish()
    write_html_report(run_dir, run_dir, metrics, summary=summary)
    # last: summary.json marks the run finished (a resume returns it); killed before it, a resume writes the report
    write_json(run_dir / "summary.json", summary)
    return summary


def _compute_summary(model: torch.nn.Module, best: dict[str, Any], cfg: RunConfig, result: FitResult,
                     compute: Compute) -> dict[str, Any]:
    """Precision, FLOPs per (full-size) training image, achieved GFLOP/s and peak memory of the run."""
    flops = training_flops_per_image(model, best["input_channels"], best["input_size"])
    epochs = max(result.epochs_run, 1)  # --progressive-resize: the smaller epochs did their share of the pixels' work
    done = flops * StepCosts.of(cfg, best["input_size"]).steps(0, epochs, 1) / epochs
    # a feature-cache run trains only the head on precomputed features: the model's FLOPs would overstate it
    rate = None if cfg.cache_features else round(done * result.images_per_second / 1e9, 2)
    return {"precision": precision_name(compute.dtype),
            "train_gflop_per_image": round(flops / 1e9, 6), "train_gflops_per_second": rate,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _fit(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec, plain: BatchTransform,
         val_loader: Any, run_dir: Path, meta: dict[str, Any], resumed: ResumePoint | None, compute: Compute,
         deadline: Deadline | None = None, board: TensorBoardLog | None = None) -> tuple[FitResult, float | None]:
    """fit() on batches of images (from scratch or a saved state), or (--cache-features) on the backbone's
    features computed once."""
    if cfg.cache_features:
        assert isinstance(model, TransferModel)
        if distributed.context().distributed:
            raise UsageError("--cache-features trains the head in one process (its epochs take seconds): run it "
                             "without torchrun")
        return fit_on_features(model, bundle.train, bundle.val, plain, cfg, run_dir, meta, compute)
    here = distributed.context()
    train_loader = training_loader(cfg, bundle, model, spec, shard=here.shard)
    if here.distributed:
        log.info(f"data-parallel: {here.world_size} processes ({here.backend}), {cfg.batch_size} images each per step: "
                 f"an effective batch of {cfg.batch_size * here.world_size}; {len(train_loader)} steps per epoch")
    return fit(model, train_loader, val_loader, cfg, run_dir, meta, resumed.state if resumed else None,
               deadline=deadline, board=board,
               class_weights=balance_weights(cfg, bundle.train.labels, bundle.info.num_classes), compute=compute), None


def training_loader(cfg: RunConfig, bundle: DataBundle, model: torch.nn.Module, spec: InputSpec,
                    shard: tuple[int, int] = (0, 1)) -> Loader:
    """The run's training batches, for the run and for its range test alike: augmented (train_transform), mixed
    (--mixup / --cutmix), balanced (--balance sampler), seeded; shard: this process's share under torchrun."""
    mix = BatchMix(bundle.info.num_classes, cfg.mixup, cfg.cutmix) if cfg.mixup or cfg.cutmix else None
    return make_loader(bundle.train, cfg.batch_size, train_transform(cfg, bundle, model, spec), train=True,
                       seed=cfg.seed, workers=cfg.workers, shard=shard, mix=mix, balanced=cfg.balance == "sampler")


def balance_weights(cfg: RunConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The loss's class weights under --balance weights (logged), else None."""
    if cfg.balance != "weights":
        return None
    weights = inverse_frequency_weights(labels, num_classes)
    log.info(f"balance: class weights in the loss from {weights.min():.3g} to {weights.max():.3g} (inverse frequency)")
    return weights


FINAL_METRICS = ("test_accuracy", "test_loss", "test_macro_f1", "best_val_accuracy")


def log_final(board: TensorBoardLog, cfg: RunConfig, summary: dict[str, Any], run_dir: Path) -> None:
    """The end of a run for TensorBoard: the test's confusion matrix and sample predictions (the report's figures),
    and the settings with the final metrics."""
    board.log_images({"test/confusion_matrix": run_dir / "confusion_matrix.png",
                      "test/sample_predictions": run_dir / "samples.png",
                      "test/most_confident_mistakes": run_dir / "mistakes.png"})
    metrics = {f"final/{k}": float(summary[k]) for k in FINAL_METRICS if summary.get(k) is not None}
    board.log_hparams(cfg.to_dict(), metrics)


def weights_meta(cfg: RunConfig, info: DatasetInfo, model: torch.nn.Module, spec: InputSpec | None = None,
                 ) -> dict[str, Any]:
    """What a weights file records besides the tensors: enough to rebuild the model and its preprocessing.

    image_size and channels say how images are decoded; input_size and input_channels what the model takes
    (batches are resized and converted on the fly); mean and std have input_channels values.
    """
    spec = spec or input_spec(info, None)
    return {
        "kind": "imgrec-weights",
        "model": {"name": cfg.model, "num_classes": info.num_classes, "in_channels": spec.channels,
                  "image_size": list(spec.size), **_python_source(cfg.model, model)},
        "classes": list(info.classes), "channels": info.channels, "image_size": list(info.image_size),
        "input_channels": spec.channels, "input_size": list(spec.size),
        "mean": list(spec.mean), "std": list(spec.std), "data": cfg.data, "config": cfg.to_dict(),
        "params": count_parameters(model), "versions": versions(), "git_commit": git_commit(),
    }


def _python_source(name: str, model: torch.nn.Module) -> dict[str, str]:
    """For a model written in Python: the module and class it was defined as (recorded, never imported)."""
    if not is_user_model(name):
        return {}
    return {"module": type(model).__module__, "class": type(model).__qualname__}


def _run_folder(cfg: RunConfig, bundle: DataBundle, resumed: ResumePoint | None, owned: ExitStack) -> Path:
    """The run folder: the resumed run's, or a new one that the main process makes and names for all processes;
    the main process locks it (for as long as `owned` is open) and writes config.yaml, split.csv and skipped.txt
    into it. A folder made here is removed again if the command fails before training saved anything."""
    if resumed:
        if cfg.cache_features:
            raise UsageError("a run trained with --cache-features cannot be resumed: its epochs take seconds, rerun it")
        run_dir = resumed.path.parent
        distributed.from_main(lambda: _lock(run_dir, owned))  # resume() holds it already: counted, not locked again
    else:
        name = cfg.name or default_run_name(cfg.data, cfg.model)
        run_dir = distributed.from_main(lambda: _new_run_folder(cfg.project, name, cfg.exist_ok, owned))
    if distributed.is_main():
        _write_run_files(cfg, bundle, run_dir)
    return run_dir


def _new_run_folder(project: str, name: str, exist_ok: bool, owned: ExitStack) -> Path:
    run_dir, made = create_run_dir(project, name, exist_ok)
    _lock(run_dir, owned)  # a folder another process holds is left to it

    def remove_if_failed(kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            _remove_if_untrained(run_dir)

    if made:
        owned.push(remove_if_failed)  # runs before the lock is released
    return run_dir


def _lock(run_dir: Path, owned: ExitStack) -> None:
    owned.enter_context(RunLock(run_dir))
    _clear_partial_writes(run_dir)


def _clear_partial_writes(run_dir: Path) -> None:
    """Delete what writes cut short by a kill left in a run folder; only the lock's holder calls this, so no
    other process is writing there."""
    for folder in (run_dir, run_dir / "weights"):
        if folder.is_dir():
            remove_partial_writes(folder)


def _remove_if_untrained(run_dir: Path) -> None:
    """A new run folder its command failed to train: nothing of training saved (no state, no weights), so it is
    removed and its name is free again."""
    if not (run_dir / STATE_FILE).exists() and not (run_dir / "weights").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def _write_run_files(cfg: RunConfig, bundle: DataBundle, run_dir: Path) -> None:
    """config.yaml, and split.csv and skipped.txt when the data has them (each written atomically)."""
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    if bundle.manifest:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([("file", "class", "split", "skipped"), *bundle.manifest])
        write_text(run_dir / "split.csv", buffer.getvalue())
    if bundle.skipped:
        write_text(run_dir / "skipped.txt", skipped_table(bundle.skipped))
        log.warning(skipped_warning(bundle.skipped, run_dir / "skipped.txt"))
