"""Real processes, really interrupted: SIGKILL at random moments (during steps and validation) and in the middle of
each kind of write a run makes (training state, weights, the final JSON files), Ctrl-C and SIGTERM. Each time the
run is resumed, and in the end it equals an uninterrupted run bit for bit (CPU, deterministic): the same weights
and the same results.csv (but for the `seconds` column)."""

from __future__ import annotations

import csv
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.state import STATE_FILE

# lenet on digits: dropout (the torch generator), translate (the loader's generator), a one-cycle schedule;
# 40 steps an epoch, the state saved every 3 of them
RUN = ["--data", "digits", "--model", "lenet", "--epochs", "5", "--batch-size", "32", "--augment", "translate",
       "--schedule", "onecycle", "--threads", "1", "--workers", "0", "--device", "cpu", "--save-every-steps", "3"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


# Runs imgrec's CLI (argv[3:]) and dies (SIGKILL) in the middle of the argv[2]-th write of a file named argv[1]: its
# temporary file is written, the rename that would put it in place is not done.
KILLED_IN_A_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    name, nth, real_replace, seen = sys.argv[1], int(sys.argv[2]), os.replace, []
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            seen.append(dst)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    from imgrec.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def start(args: list[str], cwd: Path, killed_in: tuple[str, int] | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", KILLED_IN_A_WRITE, killed_in[0], str(killed_in[1])] if killed_in else \
        [sys.executable, "-m", "imgrec"]
    return subprocess.Popen([*command, *args], cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    """Read stderr until a line starts with prefix (or the process ends); returns the lines read."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines


def rows(run_dir: Path) -> list[list[str]]:
    with (run_dir / "results.csv").open(newline="") as f:
        return [r[:-1] for r in csv.reader(f)]  # all but `seconds`


def assert_same_run(run: Path, reference: Path) -> None:
    for name in ("best.pt", "last.pt"):
        a = load_weights_file(run / "weights" / name)["state_dict"]
        b = load_weights_file(reference / "weights" / name)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    assert rows(run) == rows(reference)
    assert not list(run.rglob(".*.tmp"))  # writes a kill cut short are cleared away on resume
    got, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert got["test_accuracy"] == expected["test_accuracy"] and got["epochs"] == expected["epochs"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The uninterrupted run, and how long its training took (from the model line to the last epoch's line)."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = start(["train", *RUN, "--project", str(cwd), "--name", "run"], cwd)
    wait_for_line(proc, "model:")
    began = time.monotonic()
    wait_for_line(proc, "epoch   5/5")
    seconds = time.monotonic() - began
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return cwd / "run", seconds


def kill_and_resume(run: Path, cwd: Path, kills: int, seed: int, training_seconds: float) -> int:
    """SIGKILL the run at `kills` random moments of its training, resuming after each; returns how many kills
    hit a live process. The moments are spread over the training, which each resume continues."""
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0, 1.1 * training_seconds) for _ in range(kills))
    hits = 0
    for gap in [moments[0]] + [b - a for a, b in zip(moments, moments[1:])]:
        # killed before its first save: start it again, as a user would
        args = ["train", "--resume", str(run)] if (run / STATE_FILE).exists() else \
            ["train", *RUN, "--project", str(run.parent), "--name", run.name, "--exist-ok"]
        proc = start(args, cwd)
        wait_for_line(proc, "model:")
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), proc.returncode
    final = start(["train", "--resume", str(run)], cwd)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    return hits


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(reference: tuple[Path, float],
                                                                         tmp_path: Path) -> None:
    run_ref, seconds = reference
    hits = kill_and_resume(tmp_path / "run", tmp_path, kills=3, seed=1, training_seconds=seconds)
    assert hits >= 2
    assert_same_run(tmp_path / "run", run_ref)


# (file name, which of its writes in that process, the start of the last line logged before): each kill in another
# kind of write, in the order a run makes them; each process resumes from what the one before left. 40 steps an
# epoch, the state saved every 3 of them.
KILLS_IN_WRITES = [
    ("train_state.pt", 1, "compute:"),  # the first training state (step 3): none on disk yet, the resume starts again
    ("train_state.prev.pt", 1, "compute:"),  # the second (step 6), keeping the first as the previous one
    ("last.pt", 1, "compute:"),  # epoch 1's end: its row is in results.csv, its weights are being written
    ("train_state.pt", 1, "compute:"),  # epoch 1's end again: its state (the previous one already kept)
    ("last.pt", 6, "epoch   5/5"),  # epochs 1-5 end (5 writes), then the calibration after training
    ("summary.json", 1, "prediction:"),  # the test results of the finished training
]


def test_sigkill_in_the_middle_of_each_kind_of_write(reference: tuple[Path, float], tmp_path: Path) -> None:
    run = tmp_path / "run"
    for i, (name, nth, last_line) in enumerate(KILLS_IN_WRITES):
        args = ["train", "--resume", str(run)] if i else ["train", *RUN, "--project", str(tmp_path), "--name", "run"]
        proc = start(args, tmp_path, killed_in=(name, nth))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"{name} {nth}: {proc.returncode} {err}"
        assert err.strip().splitlines()[-1].startswith(last_line), f"{name} {nth}: {err}"
        assert list(run.rglob(f".{name}.*.tmp")), f"{name} {nth}"  # killed in the middle of that write
    final = start(["train", "--resume", str(run)], tmp_path)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert_same_run(run, reference[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_save_say_how_to_resume_and_exit_130(reference: tuple[Path, float], tmp_path: Path,
                                                                 sig: signal.Signals) -> None:
    run = tmp_path / "run"
    proc = start(["train", *RUN, "--project", str(tmp_path), "--name", "run"], tmp_path)
    wait_for_line(proc, "epoch   2/5")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"imgrec train: stopped by {sig.name} at ") and "test accuracy" not in out
    assert f"the training state is saved in {run / STATE_FILE}" in last
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command == ["imgrec", "train", "--resume", str(run)]
    resumed = start(command[1:], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "test accuracy" in out
    assert_same_run(run, reference[0])
