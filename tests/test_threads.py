"""The imgrec command lets torch's OpenMP threads sleep while they wait (they collapse next to a busy process
when they spin), unless the user already chose a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SCRIPT = "import os, sys, imgrec.cli; imgrec.cli.main(['datasets']); print(repr(os.environ.get('OMP_WAIT_POLICY')), file=sys.stderr)"


def policy_seen(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO / "src")
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_the_command_makes_waiting_threads_sleep() -> None:
    assert policy_seen(None) == "'PASSIVE'"


def test_a_policy_the_user_chose_is_kept() -> None:
    assert policy_seen("ACTIVE") == "'ACTIVE'"
    assert policy_seen("") == "''"  # set but empty: OpenMP's own default


def test_nothing_changes_once_torch_is_imported() -> None:
    """The OpenMP runtime has read its settings by then: changing them would only mislead."""
    script = "import torch, os, sys, imgrec.cli; imgrec.cli.main(['datasets']); print(repr(os.environ.get('OMP_WAIT_POLICY')), file=sys.stderr)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO / "src")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "None"
