"""Exact resume: a run continued from any saved training state ends bit-exactly like an uninterrupted one;
what a resume may change, what it refuses, and how damaged or malicious state files are handled."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, make_image_folder
from imgrec import workflows
from imgrec.cli import main
from imgrec.config import RunConfig
from imgrec.engine import state as state_module
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.runs import LOCK_FILE
from imgrec.engine.state import PREVIOUS_STATE_FILE, STATE_FILE, Progress, load_state
from imgrec.errors import ImgrecError

SETTINGS: dict[str, Any] = dict(model="lenet", epochs=3, batch_size=8, threads=1, workers=0, lr=3e-3,
                                device="cpu", schedule="onecycle", augment="crop,flip,erase", save_every_steps=1)


def train_run(data: Path, project: Path, name: str, **overrides: Any) -> Path:
    values = {**SETTINGS, "data": str(data), "project": str(project), "name": name, **overrides}
    return workflows.train(RunConfig(**values)).run_dir


def rows(run_dir: Path) -> list[list[str]]:
    """results.csv without the `seconds` column (the one thing that may differ)."""
    with (run_dir / "results.csv").open(newline="") as f:
        return [r[:-1] for r in csv.reader(f)]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-exact weights (every tensor of best and last), the same results.csv and test accuracy."""
    for name in ("best.pt", "last.pt"):
        a = load_weights_file(run / "weights" / name)["state_dict"]
        b = load_weights_file(reference / "weights" / name)["state_dict"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
    assert rows(run) == rows(reference)
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["test_accuracy"] == expected["test_accuracy"] and summary["best_epoch"] == expected["best_epoch"]


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Every training state a run writes, copied aside as it is written."""
    taken: list[Path] = []
    real = state_module.save_state

    def keep_a_copy(state: dict[str, Any], run_dir: Path) -> Path:
        path = real(state, run_dir)
        taken.append(Path(shutil.copy(path, tmp_path / f"snapshot-{len(taken):03d}.pt")))
        return path

    monkeypatch.setattr(state_module, "save_state", keep_a_copy)
    return taken


def run_stopped_at(reference: Path, snapshot: Path, target: Path) -> Path:
    """The reference run folder as a kill would have left it, its state being the snapshot: later rows of
    results.csv and later weights are still there (written before the state), summary and plots are not."""
    shutil.copytree(reference, target)
    shutil.copy(snapshot, target / STATE_FILE)
    for name in ("summary.json", "metrics.json", "results.png"):
        (target / name).unlink()
    return target


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_resuming_from_any_saved_state_ends_like_an_uninterrupted_run(image_folder: Path, tmp_path: Path,
                                                                     snapshots: list[Path], loader: str) -> None:
    reference = train_run(image_folder, tmp_path / "runs", "reference", loader=loader)
    # 27 training images, batches of 8: 4 steps an epoch, 3 epochs; a save after every step and every epoch end
    assert len(snapshots) == 15
    positions = [(p.epoch, p.step) for p in (Progress.from_dict(load_state(s)["progress"]) for s in snapshots)]
    assert positions[:5] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 0)]
    saved = list(snapshots)
    for k in (0, 2, 3, 4, 9, 13, 14):  # mid-epoch, the last step before validation, epoch ends, the very end
        run = run_stopped_at(reference, saved[k], tmp_path / f"resumed-{k}")
        outcome = workflows.resume(run, {})
        assert outcome.run_dir == run and not outcome.already_finished
        assert_same_run(run, reference)


def test_resuming_a_finished_run_does_nothing(image_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = train_run(image_folder, tmp_path / "runs", "done", epochs=2)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_FILE}  # the lock names its holder
    code = main(["train", "--resume", str(run), "--model", "lenet"])  # an unchanged setting may be repeated
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "has already finished (2 epochs" in out and "nothing to do" in out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_FILE} == before
    assert sorted(run.parent.iterdir()) == [run]  # no new run folder either


@pytest.mark.parametrize("argv, fragments", [
    (["--data", "digits"], ["cannot resume", "--data digits", "trained with --data"]),
    (["--model", "mlp"], ["cannot resume", "--model mlp", "--model lenet"]),
    (["--lr", "0.5", "--batch-size", "4"], ["--lr, --batch-size cannot change on resume", "--epochs"]),
    (["--epochs", "1"], ["--epochs 1 is fewer than the 2 epochs"]),
])
def test_changing_what_was_learnt_is_a_usage_error(image_folder: Path, tmp_path: Path, argv: list[str],
                                                    fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run = train_run(image_folder, tmp_path / "runs", "fixed", epochs=2)
    code = main(["train", "--resume", str(run), *argv])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_epochs_extension_is_logged_and_equals_a_longer_run(image_folder: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """With a constant learning rate, 2 epochs then 2 more are exactly 4 epochs."""
    settings = dict(schedule="constant", epochs=2, save_every_steps=0)
    run = train_run(image_folder, tmp_path / "runs", "extended", **settings)
    reference = train_run(image_folder, tmp_path / "runs", "four", **{**settings, "epochs": 4})
    with caplog.at_level(logging.INFO):
        outcome = workflows.resume(run, {"epochs": 4})
    assert "extending the run from 2 to 4 epochs" in caplog.text
    assert outcome.summary["epochs"] == 4 and len(rows(run)) == 5
    assert load_state(run / STATE_FILE)["config"]["epochs"] == 4
    assert "epochs: 4" in (run / "config.yaml").read_text()
    assert_same_run(run, reference)


def test_extending_a_scheduled_run_stretches_the_schedule(image_folder: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run = train_run(image_folder, tmp_path / "runs", "cycle", epochs=2, save_every_steps=0)
    with caplog.at_level(logging.INFO):
        workflows.resume(run, {"epochs": 3})
    assert "the onecycle schedule is stretched to the new length" in caplog.text
    lrs = [float(r[5]) for r in rows(run)[1:]]
    assert len(lrs) == 3 and all(lr > 0 for lr in lrs)


def test_a_changed_folder_is_refused_on_resume(image_folder: Path, tmp_path: Path) -> None:
    run = train_run(image_folder, tmp_path / "runs", "changed", epochs=2)
    make_image_folder(image_folder, classes=("cat", "dog", "fox"), per_class=14)  # two more images per class
    with pytest.raises(ImgrecError, match=r"the data changed since .*train_state.pt was saved \(train images: 27 then"):
        workflows.resume(run, {"epochs": 3})


def test_no_state_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty-run")]) == 1
    err = capsys.readouterr().err
    assert "has no train_state.pt" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 1
    assert "no such run folder" in capsys.readouterr().err


class _Evil:
    """Unpickling this creates (or empties) the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_a_malicious_train_state_is_refused_and_runs_nothing(image_folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = train_run(image_folder, tmp_path / "runs", "evil", epochs=1)
    marker = tmp_path / "precious.txt"
    marker.write_text("untouched")
    state = load_state(run / STATE_FILE)
    state["payload"] = _Evil(marker)
    torch.save(state, run / STATE_FILE)
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 1
    assert marker.read_text() == "untouched", "loading the training state ran code"
    assert str(run / STATE_FILE) in err and "refused" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_train_state_names_the_previous_one_which_resumes(image_folder: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    reference = train_run(image_folder, tmp_path / "runs", "reference", save_every_steps=0)
    run = train_run(image_folder, tmp_path / "runs", "damaged", save_every_steps=0)
    for name in ("summary.json", "metrics.json"):
        (run / name).unlink()
    state = run / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 1
    assert str(state) in err and "damaged" in err and str(run / PREVIOUS_STATE_FILE) in err
    # the previous state (end of epoch 2) continues the run to the same end
    code = main(["train", "--resume", str(run / PREVIOUS_STATE_FILE)])
    assert code == 0, capsys.readouterr().err
    assert_same_run(run, reference)


def test_a_crash_in_the_middle_of_writing_keeps_the_previous_state_loadable(tmp_path: Path) -> None:
    """A process killed (SIGKILL) half-way through writing train_state.pt: the file before it still loads."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from imgrec.engine.state import save_state
        run = Path({str(tmp_path)!r})
        save_state({{"kind": "first", "w": torch.arange(1000.0)}}, run)
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            import io
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        save_state({{"kind": "second", "w": torch.zeros(1000)}}, run)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["kind"] == "first" and torch.equal(state["w"], torch.arange(1000.0))
    assert not (tmp_path / PREVIOUS_STATE_FILE).exists()  # the first save had nothing to keep


def test_the_state_holds_only_tensors_and_plain_values(image_folder: Path, tmp_path: Path) -> None:
    run = train_run(image_folder, tmp_path / "runs", "plain", epochs=1, schedule="cosine")
    state = torch.load(run / STATE_FILE, weights_only=True)  # refuses anything else

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)
    assert {"model", "optimizer", "scheduler", "scaler", "loader", "rng", "progress", "config"} <= set(state)
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == 0


def test_saves_are_due_by_steps_and_by_minutes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clock = {"now": 1000.0}
    monkeypatch.setattr(state_module.time, "monotonic", lambda: clock["now"])
    by_steps = state_module.StateSaver(tmp_path, RunConfig(save_every_steps=3, save_every_minutes=0), lambda p: {})
    assert [by_steps.due() for _ in range(3)] == [False, False, True]
    by_time = state_module.StateSaver(tmp_path, RunConfig(save_every_minutes=2), lambda p: {"kind": "x"})
    clock["now"] += 119
    assert not by_time.due()
    clock["now"] += 1
    assert by_time.due()
    by_time.save(Progress())
    assert not by_time.due() and (tmp_path / STATE_FILE).is_file()
    never = state_module.StateSaver(tmp_path, RunConfig(save_every_minutes=0), lambda p: {})
    clock["now"] += 10**6
    assert not any(never.due() for _ in range(1000))


def test_only_settings_that_cannot_change_the_past_are_resume_safe() -> None:
    from imgrec.config import resume_safe_settings

    assert sorted(resume_safe_settings()) == sorted(
        ["epochs", "patience", "workers", "threads", "save_every_minutes", "save_every_steps", "dist_timeout", "log"])


def test_resume_with_a_weight_average_and_a_cut_last_epoch_is_exact(image_folder: Path, tmp_path: Path,
                                                                      snapshots: list[Path]) -> None:
    """The EMA of the weights is part of the state; a run cut by --max-steps resumes to the same cut."""
    extra = dict(ema=0.9, tta="flip", schedule="linear", max_steps=10)
    reference = train_run(image_folder, tmp_path / "runs", "reference", **extra)
    # 4 steps an epoch: epochs 1 and 2 whole, epoch 3 cut after 2 steps; a save after each step and epoch end
    positions = [(p.epoch, p.step) for p in (Progress.from_dict(load_state(s)["progress"]) for s in snapshots)]
    assert positions[-3:] == [(3, 1), (3, 2), (4, 0)] and len(snapshots) == 13
    final = load_state(snapshots[-1])
    assert final["averaged"]["updates"] == 10
    assert not torch.equal(final["averaged"]["model"]["features.0.weight"], final["model"]["features.0.weight"])
    saved = list(snapshots)
    for k in (1, 4, 10, 11):  # mid-epoch, an epoch end, within the cut epoch, its last step
        run = run_stopped_at(reference, saved[k], tmp_path / f"resumed-{k}")
        workflows.resume(run, {})
        assert_same_run(run, reference)
    # what was saved and tested is the average, not the trained model's last weights
    last = load_weights_file(reference / "weights" / "last.pt")["state_dict"]
    assert all(torch.equal(last[key], final["averaged"]["model"][key]) for key in last)


def test_resume_with_lookahead_is_exact(image_folder: Path, tmp_path: Path, snapshots: list[Path]) -> None:
    """Lookahead's slow copy and its step count are part of the state: a run resumed between two of its updates
    (and at an epoch end) ends with the same weights and results as one never stopped."""
    extra = dict(lookahead=True, tta="flip-translate", augment="translate,flip", schedule="linear", max_steps=10)
    reference = train_run(image_folder, tmp_path / "runs", "reference", **extra)
    final = load_state(snapshots[-1])
    assert final["averaged"]["updates"] == 10 and final["averaged"]["total_steps"] == 10
    saved = list(snapshots)
    for k in (2, 6):  # between lookahead updates in epoch 1, and within epoch 2 after one
        run = run_stopped_at(reference, saved[k], tmp_path / f"resumed-{k}")
        workflows.resume(run, {})
        assert_same_run(run, reference)
    last = load_weights_file(reference / "weights" / "last.pt")["state_dict"]
    assert all(torch.equal(last[key], final["averaged"]["model"][key]) for key in last)


def test_mixed_and_randaugmented_runs_resume_exactly(image_folder: Path, tmp_path: Path,
                                                     snapshots: list[Path]) -> None:
    """MixUp/CutMix and RandAugment draw from the loader's generator: a run stopped mid-epoch or at an epoch end
    ends bit-exact like the uninterrupted one."""
    mixed = dict(epochs=2, mixup=0.4, cutmix=1.0, augment="randaugment,crop,flip")
    reference = train_run(image_folder, tmp_path / "runs", "reference", **mixed)
    saved = list(snapshots)
    for k in (1, 4):  # (1, 2) and (2, 0)
        run = run_stopped_at(reference, saved[k], tmp_path / f"resumed-{k}")
        workflows.resume(run, {})
        assert_same_run(run, reference)


def events(run: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_read_back_and_a_resumed_run_continues_its_curves(image_folder: Path, tmp_path: Path,
                                                                           snapshots: list[Path]) -> None:
    """--log tensorboard: per-step loss and learning rate, epoch metrics at each epoch's last step, the test's
    figures and the settings with the final metrics; a run stopped mid-epoch (its events already past the saved
    step) and resumed has every step once, with the uninterrupted run's values."""
    reference = train_run(image_folder, tmp_path / "runs", "reference", log="tensorboard")
    ref = events(reference)
    steps = list(range(1, 13))  # 4 steps an epoch, 3 epochs
    assert [e.step for e in ref.Scalars("train/step_loss")] == steps
    assert [e.step for e in ref.Scalars("train/lr")] == steps
    with (reference / "results.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    val_acc = ref.Scalars("epoch/val_acc")
    assert [e.step for e in val_acc] == [4, 8, 12]
    assert [round(e.value, 5) for e in val_acc] == [round(float(r["val_acc"]), 5) for r in table]
    # the epoch's train_loss is the mean of its steps' losses (all batches of 8 but the last of 3 images)
    losses = [e.value for e in ref.Scalars("train/step_loss")][:4]
    assert abs((sum(losses[:3]) * 8 + losses[3] * 3) / 27 - float(table[0]["train_loss"])) < 1e-4
    tags = ref.Tags()
    assert {"test/confusion_matrix", "test/sample_predictions"} <= set(tags["images"])
    assert ref.Images("test/confusion_matrix")[0].width > 100
    summary = json.loads((reference / "summary.json").read_text())
    assert abs(ref.Scalars("final/test_accuracy")[-1].value - summary["test_accuracy"]) < 1e-6
    assert "_hparams_/session_start_info" in ref.PluginTagToContent("hparams")

    run = run_stopped_at(reference, snapshots[5], tmp_path / "resumed")  # saved at (2, 1); events go on to step 12
    workflows.resume(run, {})
    resumed = events(run)
    assert [e.step for e in resumed.Scalars("train/step_loss")] == steps
    assert [e.value for e in resumed.Scalars("train/step_loss")] == [e.value for e in ref.Scalars("train/step_loss")]
    assert [e.step for e in resumed.Scalars("epoch/val_acc")] == [4, 8, 12]


def test_tensorboard_without_its_package_is_one_line(image_folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package makes of the import
    code = main(["train", "--data", str(image_folder), "--project", str(tmp_path / "runs"), "--log", "tensorboard",
                 "--epochs", "1", "--workers", "0"])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines() == ["imgrec train: error: --log tensorboard needs the Python package 'tensorboard', which is not "
                                        "installed: pip install 'imgrec[tensorboard]'"]
    assert not (tmp_path / "runs").exists()  # it failed before any data was loaded or folder made


def test_resume_with_muon_is_exact(image_folder: Path, tmp_path: Path, snapshots: list[Path]) -> None:
    """--optimizer muon keeps two inner states (Muon's momentum for the conv filters, SGD's for the rest): a run
    resumed mid-epoch and at an epoch end ends with the same weights and results as one never stopped."""
    extra = dict(optimizer="muon", lr=0.05, momentum=0.85, schedule="linear", max_steps=8)
    reference = train_run(image_folder, tmp_path / "runs", "reference", **extra)
    final = load_state(snapshots[-1])
    assert set(final["optimizer"]) == {"muon", "sgd"} and final["optimizer"]["muon"]["state"]
    saved = list(snapshots)
    for k in (2, 5):  # within epoch 1, and (2, 0)
        run = run_stopped_at(reference, saved[k], tmp_path / f"resumed-{k}")
        workflows.resume(run, {})
        assert_same_run(run, reference)


def test_the_whitening_bias_trains_for_its_epochs_then_stays_and_alternate_flips_resume_exactly(
        image_folder: Path, tmp_path: Path, snapshots: list[Path]) -> None:
    """--whiten-bias-epochs 1: the stem's bias moves in epoch 1 only; with --alternate-flip too, a run resumed in
    epoch 1 and in epoch 3 (the bias then fixed) ends like one never stopped."""
    extra = dict(model="airnet-small", optimizer="sgd", lr=0.05, momentum=0.85, schedule="linear",
                 augment="translate,flip", alternate_flip=True, whiten_bias_epochs=1)
    reference = train_run(image_folder, tmp_path / "runs", "reference", **extra)
    saved = list(snapshots)
    at = {(p.epoch, p.step): s for s, p in ((s, Progress.from_dict(load_state(s)["progress"])) for s in saved)}
    after_first = load_state(at[(2, 0)])["model"]["whiten.bias"]
    assert not torch.equal(after_first, torch.zeros_like(after_first))  # it trained (it starts at zero)
    assert torch.equal(load_state(saved[-1])["model"]["whiten.bias"], after_first)  # and then stayed
    assert not torch.equal(load_state(saved[-1])["model"]["head.weight"], load_state(at[(2, 0)])["model"]["head.weight"])
    for position in ((1, 2), (3, 1)):
        run = run_stopped_at(reference, at[position], tmp_path / f"resumed-{position[0]}")
        workflows.resume(run, {})
        assert_same_run(run, reference)


def test_progressive_resizing_resumes_exactly_at_each_size(image_folder: Path, tmp_path: Path,
                                                           snapshots: list[Path]) -> None:
    """--progressive-resize 13 14: a run resumed within epoch 1 (13 px), at the end of epoch 1, within epoch 2 (14 px)
    and within epoch 3 (full size) ends with the same weights and results as one never stopped."""
    extra = dict(model="airnet-small", optimizer="sgd", lr=0.05, momentum=0.85, schedule="linear",
                 augment="translate,flip", progressive_resize=[13, 14])
    reference = train_run(image_folder, tmp_path / "runs", "reference", **extra)
    saved = list(snapshots)
    at = {(p.epoch, p.step): s for s, p in ((s, Progress.from_dict(load_state(s)["progress"])) for s in saved)}
    for position in ((1, 2), (2, 0), (2, 3), (3, 1)):
        run = run_stopped_at(reference, at[position], tmp_path / f"resumed-{position[0]}-{position[1]}")
        workflows.resume(run, {})
        assert_same_run(run, reference)


def test_a_hand_edited_config_yaml_is_kept_aside_and_said_on_resume(image_folder: Path, tmp_path: Path) -> None:
    """The CLI: --resume continues with the settings saved in the training state. A config.yaml changed since (a
    setting edited, or the file broken) gets a warning naming what differs, and is kept as config.yaml.edited
    (then .1, ...) rather than silently overwritten; an unedited one, or one whose resume-safe settings an earlier
    --resume changed, gets neither. config.yaml is written again from the state, also for a finished run."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    common = ["--threads", "1", "--workers", "0", "--device", "cpu"]

    def imgrec(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imgrec", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    done = imgrec("train", "-d", str(image_folder), "-m", "mlp", "-e", "1", "-b", "8", "--lr", "0.001",
                  "--project", str(tmp_path / "runs"), "--name", "r", *common)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "r"
    saved = (run / "config.yaml").read_text()
    edited = saved.replace("\nlr: 0.001\n", "\nlr: 0.05\n").replace("\nbatch_size: 8\n", "\nbatch_size: 4\n")
    assert edited != saved
    (run / "config.yaml").write_text(edited)
    done = imgrec("train", "--resume", str(run), "-e", "2", *common)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    warning = [line for line in done.stderr.splitlines() if "config.yaml was changed" in line]
    assert len(warning) == 1 and "batch_size: 4 there, 8 saved; lr: 0.05 there, 0.001 saved" in warning[0], done.stderr
    assert (run / "config.yaml.edited").read_text() == edited  # the edit is kept, not lost
    assert (run / "config.yaml").read_text() == saved.replace("\nepochs: 1\n", "\nepochs: 2\n")
    with (run / "results.csv").open(newline="") as f:
        assert len(list(csv.reader(f))) == 3  # header and two epochs: it did continue
    done = imgrec("train", "--resume", str(run), "-e", "3", "--save-every-steps", "0", *common)  # nothing edited
    assert done.returncode == 0 and "config.yaml" not in done.stderr, done.stderr
    (run / "config.yaml").write_text("lr: [\n")
    done = imgrec("train", "--resume", str(run), "-e", "4", *common)
    assert done.returncode == 0 and "config.yaml cannot be read (config file" in done.stderr, done.stderr
    assert (run / "config.yaml.edited.1").read_text() == "lr: [\n"
    assert (run / "config.yaml.edited").read_text() == edited  # the first edit is still there
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(edited)  # a finished run has nothing to train, and still keeps its config.yaml
    done = imgrec("train", "--resume", str(run), *common)
    assert done.returncode == 0 and "already finished" in done.stdout and "config.yaml was changed" in done.stderr
    assert (run / "config.yaml.edited.2").read_text() == edited
    assert "lr: 0.001" in (run / "config.yaml").read_text() and "epochs: 4" in (run / "config.yaml").read_text()
