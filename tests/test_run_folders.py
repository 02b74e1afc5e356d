"""Run folders under stress: one writer at a time (a lock the OS releases), plain run names, no folder left by a
failed start, a start-up killed before its first save resumed from the beginning, and writes the system refuses
(a full disk, no permission, a read-only folder) as one line that leaves what was on disk valid."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import REPO, error_line, make_image_folder, run_main
from imgrec.engine.checkpoint import load_weights_file
from imgrec.engine.runs import LOCK_FILE, RunLock
from imgrec.engine.state import STATE_FILE, load_state
from imgrec.errors import ImgrecError

SETTINGS = ["--model", "mlp", "--batch-size", "8", "--threads", "1", "--workers", "0", "--device", "cpu",
            "--lr", "0.003"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
       "OMP_WAIT_POLICY": "PASSIVE"}  # chosen: no note on how busy the CPUs are
TIMEOUT = 240

# Runs imgrec's CLI after waiting, at the end of every epoch's training steps, until the file argv[1] exists:
# the first writer keeps its run folder for as long as the test needs.
GATED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from imgrec.engine import trainer
    gate, real = Path(sys.argv[1]), trainer.train_one_epoch
    def gated(*args, **kwargs):
        real(*args, **kwargs)
        waited = time.monotonic()
        while not gate.exists() and time.monotonic() - waited < 200:
            time.sleep(0.05)
    trainer.train_one_epoch = gated
    from imgrec.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def imgrec(*args: str, wrapper: str | None = None, extra: list[str] | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", wrapper, *(extra or [])] if wrapper else [sys.executable, "-m", "imgrec"]
    return subprocess.run([*command, *args], env=env or ENV, capture_output=True, text=True, timeout=TIMEOUT)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1, logged: bool = False) -> str:
    """The process ended with `code` and said exactly one line on stderr, no traceback (logged: after the log
    lines of a training that had started)."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("imgrec ")]
    assert errors == lines[-1:] and (logged or len(lines) == 1), proc.stderr
    return lines[-1]


def epochs_of(run: Path) -> list[str]:
    with (run / "results.csv").open(newline="") as f:
        return [row[0] for row in csv.reader(f)][1:]


def seeds_in(run: Path) -> dict[str, int]:
    """The seed each file of the run records: who wrote it."""
    return {"config.yaml": yaml.safe_load((run / "config.yaml").read_text())["seed"],
            STATE_FILE: load_state(run / STATE_FILE)["config"]["seed"],
            **{name: load_weights_file(run / "weights" / name)["config"]["seed"] for name in ("best.pt", "last.pt")}}


@pytest.mark.parametrize("second", ["exist-ok", "resume"])
def test_a_second_writer_is_refused_naming_the_process_that_holds_the_run(image_folder: Path, tmp_path: Path,
                                                                          second: str) -> None:
    project, gate = tmp_path / "runs", tmp_path / "gate"
    base = ["train", "--data", str(image_folder), *SETTINGS, "--project", str(project), "--name", "x"]
    if second == "resume":  # an existing run, continued by two commands at once
        gate.touch()
        assert imgrec(*base, "--epochs", "1", "--seed", "1").returncode == 0
        gate.unlink()
        first_args = ["train", "--resume", str(project / "x"), "--epochs", "3"]
        second_args = first_args
    else:  # two new runs of other seeds into one folder
        first_args = [*base, "--epochs", "2", "--seed", "1", "--exist-ok"]
        second_args = [*base, "--epochs", "2", "--seed", "2", "--exist-ok"]
    first = subprocess.Popen([sys.executable, "-c", GATED, str(gate), *first_args], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stderr is not None
        for line in first.stderr:  # the first one holds the folder once it names it
            if line.startswith("run folder:") or line.startswith("resuming from"):
                break
        refused = imgrec(*second_args)
        evaluated = imgrec("evaluate", str(project / "x")) if second == "resume" else None  # weights to test
        gate.touch()
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        first.kill()
    line = one_error_line(refused)
    assert f"{project / 'x'} is in use by process {first.pid}" in line, line
    if evaluated is not None:
        assert f"{project / 'x'} is in use by process {first.pid}" in one_error_line(evaluated)
    assert first.returncode == 0, err
    assert epochs_of(project / "x") == (["1", "2", "3"] if second == "resume" else ["1", "2"])
    assert set(seeds_in(project / "x").values()) == {1}
    assert sorted(p.name for p in project.iterdir()) == ["x"]


# Holds a run folder's lock, with a forked child (as a data loader worker is) still running, until killed.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from imgrec.engine.runs import RunLock
    with RunLock(sys.argv[1]):
        if os.fork() == 0:  # the child says its id once its fork handlers have run (closed its copy of the lock)
            print(os.getpid(), flush=True)
            time.sleep(120)
            os._exit(0)
        time.sleep(120)
""")


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, text=True,
                              stdout=subprocess.PIPE)
    child = None
    try:
        assert holder.stdout is not None
        child = int(holder.stdout.readline())
        with pytest.raises(ImgrecError, match=rf"is in use by process {holder.pid}: one command at a time"), \
                RunLock(tmp_path):
            pass
        holder.kill()
        holder.wait(timeout=30)
        # free again at once (no stale lock, though the child lives on); the same process may hold it twice
        with RunLock(tmp_path), RunLock(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    finally:
        holder.kill()
        if child:
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("name", ["../../outside", ".", "..", "a/b", "", "x" * 300])
def test_a_run_name_is_a_plain_folder_name(image_folder: Path, tmp_path: Path, name: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "deep" / "runs"
    code, _, err = run_main(["train", "--data", str(image_folder), *SETTINGS, "--epochs", "1", "--project",
                             str(project), "--name", name], capsys)
    assert code == 2
    assert "is not a plain folder name" in error_line(err) or "a folder name may have at most 250" in err
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # nothing made, in --project or beside it


def test_a_start_that_fails_leaves_no_folder_and_frees_its_name(image_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "runs"
    base = ["train", "--data", str(image_folder), *SETTINGS, "--epochs", "1", "--project", str(project),
            "--name", "x"]
    # --tta flip without flip in --augment is refused once the model is built, after the folder was made
    code, _, err = run_main([*base, "--tta", "flip", "--augment", "none"], capsys)
    assert code == 2 and "--tta flip needs flip in --augment" in error_line(err)
    assert list(project.iterdir()) == []
    code, out, err = run_main(base, capsys)
    assert code == 0, err
    assert sorted(p.name for p in project.iterdir()) == ["x"]  # the name was free
    # a failed --exist-ok start in a folder that holds a run leaves that run alone
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    code, _, err = run_main([*base, "--exist-ok", "--tta", "flip", "--augment", "none"], capsys)
    assert code == 2
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before
    assert load_weights_file(project / "x" / "weights" / "best.pt")["epoch"] == 1


# Runs imgrec's CLI and dies (SIGKILL) as training is about to start: the run folder has its config.yaml only.
KILLED_AT_START = textwrap.dedent("""
    import os, signal, sys
    from imgrec import workflows
    workflows.fit = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    from imgrec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_killed_during_start_up_resumes_from_the_beginning(image_folder: Path, tmp_path: Path) -> None:
    project = tmp_path / "runs"
    run = ["train", "--data", str(image_folder), *SETTINGS, "--epochs", "2", "--seed", "7", "--project", str(project)]
    killed = imgrec(*run, "--name", "x", wrapper=KILLED_AT_START)
    assert killed.returncode == -9, killed.stderr
    assert (project / "x" / "config.yaml").is_file() and not (project / "x" / STATE_FILE).exists()
    resumed = imgrec("train", "--resume", str(project / "x"))
    assert resumed.returncode == 0, resumed.stderr
    notes = [ln for ln in resumed.stderr.splitlines() if "stopped before it saved a training state" in ln]
    assert notes == [f"{project / 'x'} stopped before it saved a training state: starting it again from the "
                     f"beginning with its config.yaml"]
    assert sorted(p.name for p in project.iterdir()) == ["x"]
    assert epochs_of(project / "x") == ["1", "2"]
    # the same run as one never killed: its own config (seed 7), bit for bit
    assert imgrec(*run, "--name", "reference").returncode == 0
    for name in ("best.pt", "last.pt"):
        got, expected = (load_weights_file(project / r / "weights" / name) for r in ("x", "reference"))
        assert got["config"]["seed"] == 7
        assert all(torch.equal(got["state_dict"][k], expected["state_dict"][k]) for k in expected["state_dict"])


# Runs imgrec's CLI in a file system that refuses writes: argv[1] an errno name (ENOSPC, EACCES, EROFS,
# ENAMETOOLONG), argv[2] a folder, argv[3] a part of the file names refused in it ("" for all). Creating, opening
# for writing and making folders are refused, as are (but for ENOSPC) renaming, linking and removing. With
# argv[3] ".pt", only torch.save writing to the file it was handed fails, after argv[4] saves that succeed,
# and the way torch fails on a full disk: a RuntimeError of its stream writer.
REFUSING = textwrap.dedent("""
    import builtins, errno, io, os, shutil, sys, torch
    code, folder, part, allowed = getattr(errno, sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def refused(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return (path + "/").startswith(folder + "/") and part in os.path.basename(path)

    def guard(real, is_write=lambda *a, **k: True):
        def guarded(path, *args, **kwargs):
            if is_write(*args, **kwargs) and refused(path):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return guarded

    if part == ".pt":
        saves, real_save = [0], torch.save
        def save(obj, f, *args, **kwargs):
            name = getattr(f, "name", "")
            if isinstance(name, int):  # a file opened from a descriptor (mkstemp's)
                name = os.readlink(f"/proc/self/fd/{name}")
            if hasattr(f, "write") and refused(name):
                saves[0] += 1
                if saves[0] > allowed:
                    f.write(b"PK\\x03\\x04 half a checkpoint")
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                                       "writing file data/0: file write failed")
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    else:
        builtins.open = io.open = guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
        os.open = guard(os.open, lambda flags, *a, **k: bool(flags & WRITE))
        for name in ("mkdir",) + (() if code == errno.ENOSPC else ("replace", "rename", "link", "unlink", "remove")):
            setattr(os, name, guard(getattr(os, name)))
    if code == errno.ENOSPC:  # what a full disk reports
        shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0)
    from imgrec.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def refusing(errno_name: str, folder: Path, part: str = "", allowed: int = 0) -> dict[str, Any]:
    return {"wrapper": REFUSING, "extra": [errno_name, str(folder), part, str(allowed)]}


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def assert_same_weights(run: Path, reference: Path) -> None:
    for name in ("best.pt", "last.pt"):
        got, expected = (load_weights_file(r / "weights" / name)["state_dict"] for r in (run, reference))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_a_full_disk_during_a_save_is_one_line_and_resume_is_exact_once_there_is_space(image_folder: Path,
                                                                                       tmp_path: Path) -> None:
    project = tmp_path / "runs"
    run = ["train", "--data", str(image_folder), *SETTINGS, "--epochs", "2", "--save-every-minutes", "0",
           "--project", str(project)]
    # epoch 1 saves last.pt, best.pt and train_state.pt; epoch 2's last.pt finds the disk full
    full = imgrec(*run, "--name", "x", **refusing("ENOSPC", project / "x", ".pt", allowed=3))
    line = one_error_line(full, logged=True)
    assert f"cannot write {project / 'x' / 'weights' / 'last.pt'}: no space left on device (it needs about" in line
    assert "enforce fail" not in line
    x = project / "x"
    assert load_state(x / STATE_FILE)["progress"]["epoch"] == 2  # epoch 1 done, all files loadable
    assert all(load_weights_file(x / "weights" / name)["epoch"] == 1 for name in ("best.pt", "last.pt"))
    assert not list(x.rglob("*.tmp"))
    resumed = imgrec("train", "--resume", str(x))
    assert resumed.returncode == 0, resumed.stderr
    assert imgrec(*run, "--name", "reference").returncode == 0
    assert_same_weights(x, project / "reference")
    assert epochs_of(x) == ["1", "2"]


@pytest.mark.parametrize("errno_name, part, cause", [
    ("ENOSPC", "metrics.json", "no space left on device (it needs about"),
    ("EROFS", "summary.json", "read-only file system"),
    ("ENOSPC", "report.html", "no space left on device (it needs about"),
    ("ENAMETOOLONG", "results.csv", "file name too long"),
    ("EACCES", "config.yaml", "permission denied"),
])
def test_a_refused_text_write_is_one_line_naming_the_file(image_folder: Path, tmp_path: Path, errno_name: str,
                                                         part: str, cause: str) -> None:
    project = tmp_path / "runs"
    proc = imgrec("train", "--data", str(image_folder), *SETTINGS, "--epochs", "1", "--project", str(project),
                  "--name", "x", **refusing(errno_name, project / "x", part))
    assert f"cannot write {project / 'x' / part}: {cause}" in one_error_line(proc, logged=True)
    if part in ("metrics.json", "summary.json", "report.html"):  # after training: what it saved stays, and resuming
        assert load_weights_file(project / "x" / "weights" / "best.pt")["epoch"] == 1  # finishes it, report and all
        assert not (project / "x" / "summary.json").exists()  # the finished run's mark is written last
        assert imgrec("train", "--resume", str(project / "x")).returncode == 0
        assert (project / "x" / "summary.json").is_file() and (project / "x" / "report.html").is_file()
    else:  # before anything of training was saved: the folder is gone
        assert not (project / "x").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    data = make_image_folder(root / "photos")
    proc = imgrec("train", "--data", str(data), *SETTINGS, "--epochs", "1", "--project", str(root / "runs"),
                  "--name", "done")
    assert proc.returncode == 0, proc.stderr
    return root / "runs" / "done"


@pytest.mark.parametrize("command", [["evaluate"], ["explain", "--mistakes", "1"], ["train", "--resume"]])
def test_a_read_only_run_folder_is_one_line_and_stays_as_it_was(finished_run: Path, command: list[str]) -> None:
    if command[0] == "train":
        (finished_run / "summary.json").rename(finished_run / "summary.moved")  # something left to do
    before = contents(finished_run)
    args = [*command[:1], *command[1:], str(finished_run)] if command[0] != "explain" else \
        [command[0], str(finished_run), *command[1:]]
    try:
        if os.geteuid() == 0:  # root writes through any mode: the folder refuses as a read-only one would
            proc = imgrec(*args, **refusing("EACCES", finished_run))
        else:
            modes = {p: p.stat().st_mode for p in [finished_run, *finished_run.rglob("*")] if p.is_dir()}
            for p in modes:
                p.chmod(0o555)
            try:
                proc = imgrec(*args)
            finally:
                for p, mode in modes.items():
                    p.chmod(mode)
        line = one_error_line(proc)
    finally:
        if command[0] == "train":
            (finished_run / "summary.moved").rename(finished_run / "summary.json")
    assert str(finished_run) in line and "permission denied" in line, line
    after = contents(finished_run)
    if command[0] == "train":
        before["summary.json"] = before.pop("summary.moved")
    assert after == before


def test_an_unwritable_cache_is_one_warning_and_training_goes_on(image_folder: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "IMGREC_CACHE"}
    env.update(HOME="/proc/1", MPLCONFIGDIR=str(tmp_path / "mpl"))  # no cache can be made in /proc/1
    proc = imgrec("train", "--data", str(image_folder), *SETTINGS, "--epochs", "1", "--project",
                  str(tmp_path / "runs"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("cannot")]
    assert warnings == ["cannot write the cache in /proc/1/.cache/imgrec (no such file or folder); going on "
                        "without it (IMGREC_CACHE chooses another folder)"], proc.stderr
