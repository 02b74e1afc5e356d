"""OpenMP's wait policy for torch's threads, chosen before torch is first imported (the OpenMP runtime reads it
once, then). Standard library only: the CLI calls it before any command loads torch."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def patient_threads(meanwhile: Callable[[], object] | None = None) -> None:
    """On a busy machine, let torch's OpenMP threads sleep instead of spin while they wait, unless the user chose.

    Spinning threads are quicker on an idle machine (OpenMP's default), but when other processes want the same
    cores they spin away each other's time slices and training runs several times slower; sleeping threads are
    slower on an idle machine (benchmarks/thread_policy.py measures both). So the choice follows how busy the
    CPUs are when the command starts. The OpenMP runtime reads the setting once, when torch is first imported.
    The note saying so is a debug message (`imgrec -v`): it changes no result, and a one-line error must stay one line.
    `meanwhile`: work for this process to do while the CPUs are measured (see busy_cpus).
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    busy = busy_cpus(meanwhile=meanwhile)
    if busy is not None and busy >= BUSY_CPUS:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        logging.getLogger("imgrec").debug(f"the CPUs are busy ({busy:.1f} of {os.cpu_count()} in use by other "
                                          f"processes): torch's threads will sleep while they wait")


BUSY_CPUS = 0.5  # CPUs in use by other processes from which spinning threads lose more than they gain


def busy_cpus(window: float = 0.1, meanwhile: Callable[[], object] | None = None) -> float | None:
    """How many CPUs other processes keep busy right now, from /proc/stat over at least `window` seconds; None
    where there is no /proc/stat. This process runs `meanwhile` (work it must do anyway, such as an import) and
    sleeps for the rest of the window; the CPU time it spent itself is taken out of the reading."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all time, idle + iowait

    try:
        ticks = os.sysconf("SC_CLK_TCK")  # /proc/stat's unit, per second
        total0, idle0 = sample()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    start, own = time.perf_counter(), time.process_time()
    if meanwhile is not None:
        meanwhile()
    time.sleep(max(0.0, window - (time.perf_counter() - start)))
    own = time.process_time() - own  # every thread of this process
    try:
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    others = max(0.0, elapsed - (idle1 - idle0) - own * ticks)
    return others / elapsed * (os.cpu_count() or 1) if elapsed > 0 else 0.0
