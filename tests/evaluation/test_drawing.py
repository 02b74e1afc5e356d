"""FigureDrawer: figures drawn in a worker process beside the main one, their errors raised in the main process,
and a dead worker's figures drawn in the main process instead."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_no_worker_finalises_it
from imgrec.evaluation.charts import plot_confusion_matrix
from imgrec.evaluation.drawing import FigureDrawer
from imgrec.evaluation.plots import plot_image_grid
from imgrec.openmp import usable_cpus

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")


def _write_pid(path: Path) -> None:
    path.write_text(str(os.getpid()))


def _full_disk(path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _killed_in_a_worker(path: Path, main_pid: int) -> None:
    if os.getpid() != main_pid:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _write_pid(path)


@linux_only
def test_figures_are_drawn_in_a_worker_and_finish_waits_for_them(tmp_path: Path) -> None:
    with FigureDrawer(workers=2) as drawer:
        assert drawer.parallel
        drawer.draw(_write_pid, tmp_path / "pid")
        drawer.draw(plot_confusion_matrix, [[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "cm.png")
        drawer.draw(plot_image_grid, np.random.default_rng(0).random((4, 3, 8, 8)), list("abcd"), tmp_path / "grid.png")
        drawer.finish()
        assert int((tmp_path / "pid").read_text()) != os.getpid()
        assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_workers_only_where_there_is_a_second_cpu() -> None:
    expected = sys.platform.startswith("linux") and usable_cpus() > 1 and threading.active_count() == 1
    with FigureDrawer() as drawer:
        assert drawer.parallel == expected


def test_no_worker_is_forked_from_a_process_with_other_threads(tmp_path: Path) -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # as a Jupyter kernel's threads are
    other.start()
    try:
        with FigureDrawer() as drawer:
            assert not drawer.parallel
            drawer.draw(plot_image_grid, np.zeros((1, 1, 8, 8)), ["a"], tmp_path / "grid.png")
            assert (tmp_path / "grid.png").is_file()  # drawn at once, here
    finally:
        stop.set()
        other.join()


def test_without_workers_each_figure_is_drawn_at_once(tmp_path: Path) -> None:
    with FigureDrawer(workers=0) as drawer:
        assert not drawer.parallel
        drawer.draw(_write_pid, tmp_path / "pid")
        assert int((tmp_path / "pid").read_text()) == os.getpid()  # before finish(): drawn already


@pytest.mark.parametrize("workers", [0, 1])
def test_a_figures_error_comes_out_in_the_main_process(tmp_path: Path, workers: int) -> None:
    with FigureDrawer(workers=workers) as drawer, pytest.raises(OSError) as caught:
        drawer.draw(_full_disk, tmp_path / "cm.png")
        drawer.finish()
    assert caught.value.errno == errno.ENOSPC


@linux_only
def test_a_dead_workers_figures_are_drawn_in_the_main_process(tmp_path: Path) -> None:
    with FigureDrawer(workers=1) as drawer:
        drawer.draw(_killed_in_a_worker, tmp_path / "first", os.getpid())
        drawer.draw(_write_pid, tmp_path / "second")
        drawer.finish()
        assert not drawer.parallel  # no more workers: what comes next is drawn here
        drawer.draw(_write_pid, tmp_path / "third")
    for name in ("first", "second", "third"):
        assert int((tmp_path / name).read_text()) == os.getpid()


@linux_only
def test_the_workers_are_gone_when_the_drawer_closes(tmp_path: Path) -> None:
    import multiprocessing

    with FigureDrawer(workers=2) as drawer:
        drawer.draw(_write_pid, tmp_path / "pid")
        drawer.finish()
        assert multiprocessing.active_children()
    assert not multiprocessing.active_children()


KILLED_MID_FIGURE = """
import os, signal, sys, time
from pathlib import Path
from imgrec.evaluation.drawing import FigureDrawer

def slow_figure(path):
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)

drawer = FigureDrawer(workers=1)
drawer.draw(slow_figure, sys.argv[1])
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\\nState:\\tZ" not in status  # a zombie has ended; only its exit status waits to be read


@linux_only
def test_a_worker_ends_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """Killed mid-figure, the main process leaves no worker behind, and none holding its output pipes open (a
    caller reading them would wait for ever)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", KILLED_MID_FIGURE, str(tmp_path / "pid")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL
    worker = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


FIGURE_WORKER_COLLECTS = """
from imgrec.evaluation.drawing import FigureDrawer

def collect():
    gc.collect()

with FigureDrawer(workers=1) as drawer:
    drawer.draw(collect)  # a worker's own garbage collection
    drawer.finish()
gc.enable()
print("done")
"""


@linux_only
def test_a_worker_never_finalises_the_main_process_garbage() -> None:
    """A data loader left in a reference cycle, its workers still running, is copied into a forked figure worker;
    that copy, collected there, tried to stop workers that are not the figure worker's children (a traceback,
    "can only test a child process", on the command's stderr)."""
    assert_no_worker_finalises_it(FIGURE_WORKER_COLLECTS)


AHEAD = """
import multiprocessing, sys
from imgrec.evaluation import drawing
from imgrec.evaluation.plots import plot_results

def children():
    return {p.pid for p in multiprocessing.active_children()}

expected = int(sys.argv[2])  # 2, or none (one CPU; not Linux)
with drawing.workers_ahead():
    assert "torch" not in sys.modules
    ahead = children()
    assert len(ahead) == expected, ahead
    import torch  # noqa: F401  (what a command loads next, with its threads)
    with drawing.FigureDrawer() as drawer:  # takes the workers over: forks none
        assert drawer.parallel == (expected > 0) and children() == ahead
        drawer.draw(plot_results, [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}], sys.argv[1])
        drawer.finish()
    assert not children()  # the drawer stopped them
with drawing.workers_ahead():  # no drawer takes them over: stopped at the end
    assert len(children()) == expected
assert not children()
print("ok")
"""


def test_workers_started_ahead_are_taken_over_by_the_next_drawer(tmp_path: Path) -> None:
    expected = 2 if sys.platform.startswith("linux") and usable_cpus() > 1 else 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", AHEAD, str(tmp_path / "results.png"), str(expected)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


TRAIN_SPY = """
import sys
import imgrec.cli as cli
from imgrec.evaluation import drawing

real, forks = drawing._start_workers, []

def spy(workers):
    forks.append("torch" in sys.modules)
    return real(workers)

drawing._start_workers = spy
code = cli.main(["train", "--model", "mlp", "--epochs", "1", "--project", sys.argv[1], "--name", "run", "-q"])
print(code, forks)
"""


def test_the_train_command_forks_its_figure_workers_before_torch_loads(tmp_path: Path) -> None:
    """Forked from the small process the command starts as, once: the run's drawer takes them over (forked after
    torch, they cost the main process 0.35 s of copied pages)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_SPY, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    forks = sys.platform.startswith("linux") and usable_cpus() > 1
    assert proc.stdout.strip().splitlines()[-1] == ("0 [False]" if forks else "0 []")
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()
