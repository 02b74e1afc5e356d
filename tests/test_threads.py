"""The imgrec command lets torch's OpenMP threads sleep while they wait when other processes keep the CPUs busy
(spinning threads then run several times slower), leaves OpenMP's spinning default on an idle machine (where it
is faster), and never overrides a wait policy the user chose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from imgrec import openmp


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """As at the start of a command: torch not imported yet, no wait policy set (both restored afterwards)."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    return monkeypatch


def test_busy_cpus_make_waiting_threads_sleep(fresh: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fresh.setattr(openmp, "busy_cpus", lambda **_: 1.3)
    with caplog.at_level(logging.DEBUG, logger="imgrec"):
        openmp.patient_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "the CPUs are busy (1.3 of" in caplog.text


@pytest.mark.parametrize("busy", [0.0, 0.3, None])  # idle, lightly used, unknown (no /proc/stat)
def test_an_idle_machine_keeps_openmps_spinning_default(fresh: pytest.MonkeyPatch, busy: float | None) -> None:
    fresh.setattr(openmp, "busy_cpus", lambda **_: busy)
    openmp.patient_threads()
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("chosen", ["ACTIVE", ""])  # set but empty: OpenMP's own default
def test_a_policy_the_user_chose_is_kept(fresh: pytest.MonkeyPatch, chosen: str) -> None:
    fresh.setenv("OMP_WAIT_POLICY", chosen)
    fresh.setattr(openmp, "busy_cpus", lambda **_: 2.0)
    openmp.patient_threads()
    assert os.environ["OMP_WAIT_POLICY"] == chosen


def test_nothing_changes_once_torch_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenMP runtime has read its settings by then: changing them would only mislead."""
    import torch  # noqa: F401

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(openmp, "busy_cpus", lambda **_: 2.0)
    openmp.patient_threads()
    assert "OMP_WAIT_POLICY" not in os.environ


def test_busy_cpus_sees_a_process_spinning_beside_it() -> None:
    """Measured from /proc/stat while this process sleeps: a busy loop in another process is about one CPU."""
    idle_reading = openmp.busy_cpus()
    assert idle_reading is not None and 0.0 <= idle_reading <= (os.cpu_count() or 1) + 1e-9
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        readings = [openmp.busy_cpus(window=0.3) for _ in range(3)]
    finally:
        hog.kill()
        hog.wait()
    assert max(readings) >= 0.8, readings


def test_busy_cpus_leaves_out_what_this_process_does_meanwhile() -> None:
    """The window holds this process's own work (an import, at the start of a command): half a second of spinning here
    reads as what other processes take (as a window slept through does), and beside a spinning process still as at
    least most of a CPU."""
    def spin() -> None:
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass

    slept = [openmp.busy_cpus(window=0.5) for _ in range(2)]  # whatever else the machine runs
    spun = [openmp.busy_cpus(window=0.1, meanwhile=spin) for _ in range(2)]
    assert min(spun) < max(slept) + 0.4, (spun, slept)  # counted as others', the spinning would add a whole CPU
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        readings = [openmp.busy_cpus(window=0.1, meanwhile=spin) for _ in range(3)]
    finally:
        hog.kill()
        hog.wait()
    assert max(readings) >= 0.6, readings


def _busy_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`imgrec ARGS` on a machine that looks busy (a tiny threshold); stderr ends with the wait policy it left."""
    script = ("import os, sys, imgrec.openmp as o, imgrec.cli as c; o.BUSY_CPUS = -1.0; code = c.main(sys.argv[1:]); "
              "print(repr(os.environ.get('OMP_WAIT_POLICY')), file=sys.stderr); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO / "src")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_command_sets_the_policy_before_torch_loads_and_says_so_only_when_verbose() -> None:
    """End to end, on a busy machine: a command that computes runs with sleeping threads; a usage error stays the
    one line on stderr (the note is a debug message, shown with -v)."""
    proc = _busy_command("train", "--data", "nosuch")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "'PASSIVE'"
    assert len(lines) == 2 and lines[0].startswith("imgrec train: error: unknown data set 'nosuch'"), lines
    proc = _busy_command("-v", "train", "--data", "nosuch")
    assert "the CPUs are busy" in proc.stderr


def test_commands_that_only_list_leave_the_policy_alone() -> None:
    proc = _busy_command("-v", "datasets")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "None"
    assert "the CPUs are busy" not in proc.stderr


@pytest.mark.parametrize(("command", "measured"), [("models", False), ("datasets", False), ("train", True),
                                                   ("predict", True)])
def test_only_commands_that_compute_measure_the_cpus(monkeypatch: pytest.MonkeyPatch, command: str,
                                                     measured: bool) -> None:
    from imgrec import cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "patient_threads", lambda **_: calls.append("measured"))
    monkeypatch.setitem(cli.COMMANDS, command, lambda args: 0)  # the command itself is not the point here
    argv = {"predict": ["predict", "run", "x.png"]}.get(command, [command])
    assert cli.main(argv) == 0
    assert calls == (["measured"] if measured else [])
