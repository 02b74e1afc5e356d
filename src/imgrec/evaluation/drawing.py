"""The report's figures drawn beside the main process, so that drawing them holds nobody up.

A `FigureDrawer` forks worker processes (on Linux) when it is made: two where there are two CPUs or more (on the
idle 2-core machine, 0.8 s from the last batch to the exit instead of 1.2 s with one worker and 1.6 s drawing in
the main process). `train` makes it first thing: the workers load matplotlib while the main process is still
loading the data and building the model, and draw each figure as soon as it is asked for,
beside what the main process has left to do. `finish()` waits for every figure and raises the first error a
figure met (a full disk, say) in the main process, as drawing it there would have. A worker that dies has its
figures drawn in the main process; workers end when the main process ends, however it ends. Elsewhere, with one
usable CPU, in a process with other threads (a notebook's kernel), or with `workers=0`, each figure is drawn at
once in the calling process.

Figure functions and their arguments are plain values (numbers, lists, numpy arrays, paths): they cross to a
worker by pickling. Imports: the standard library, the figure modules and imgrec.openmp only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from imgrec.evaluation.plots import pyplot
from imgrec.openmp import usable_cpus

log = logging.getLogger(__name__)

WORKERS = 2  # at most two figures at a time: the report has five to six, each a few tenths of a second
WATCH_SECONDS = 0.2  # how often a worker checks that the main process is still there
WARM_UP_TURN_SECONDS = 10.0  # a worker waits at most this long for the other to have loaded matplotlib

_warm_up_turn: Any = None  # in a worker: the lock that makes the workers load matplotlib one at a time
_ahead: tuple[int, ProcessPoolExecutor] | None = None  # workers started by workers_ahead(), and the pid they serve


def _worker_start(main_pid: int, turn: Any) -> None:
    """A worker leaves Ctrl-C to the main process, which stops the workers itself, and ends with the main process
    however that ends (a worker waits for work on a pipe it holds both ends of: it would wait for ever)."""
    global _warm_up_turn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # what the fork copied is the main process's to finalise (see FigureDrawer)
    _warm_up_turn = turn
    threading.Thread(target=_end_with, args=(main_pid,), daemon=True, name="imgrec-figures-watch").start()


def _end_with(main_pid: int) -> None:
    while os.getppid() == main_pid:
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def _warm_up() -> None:
    """A worker's first job: load matplotlib (a third of a second) before any figure needs it; one worker at a
    time, so that together they take one CPU, not the main process's share of two."""
    turn = _warm_up_turn.acquire(timeout=WARM_UP_TURN_SECONDS) if _warm_up_turn is not None else False
    try:
        pyplot()
    finally:
        if turn:
            _warm_up_turn.release()


def _start_workers(workers: int) -> ProcessPoolExecutor | None:
    """`workers` forked worker processes, each loading matplotlib; None where no process could be started."""
    # fork (Linux's default, as for data-loading workers): a worker needs none of the caller's modules
    # re-imported (spawn would re-run a user's script); macOS's fork is unsafe, and there figures are
    # drawn in the main process
    # the main process's garbage is finalised here, not in a worker's copy: a data loader's iterator
    # finalised there would try to stop worker processes that are not its children
    gc.collect()
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                               initargs=(os.getpid(), context.Lock()))
    try:
        for _ in range(workers):  # the first submission starts every worker
            pool.submit(_warm_up)
    except (OSError, BrokenProcessPool) as exc:  # no process to spare (a limit on processes): draw here
        log.debug(f"figures drawn in this process: {exc}")
        pool.shutdown(wait=True, cancel_futures=True)
        return None
    return pool


@contextlib.contextmanager
def workers_ahead() -> Iterator[None]:
    """Start the figure workers now, for the next FigureDrawer made in this process to take over; stop them at the
    end if none did. For a command, before it imports torch (see the module's note). Not in a torchrun group's
    processes, where only the main one draws, and it decides late."""
    global _ahead
    workers = default_workers()
    started = None
    if workers > 0 and sys.platform.startswith("linux") and "LOCAL_RANK" not in os.environ and _ahead is None:
        started = _start_workers(workers)
        _ahead = (os.getpid(), started) if started is not None else None
    try:
        yield
    finally:
        if started is not None and _ahead is not None and _ahead[1] is started:  # no drawer took them over
            _ahead = None
            started.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Two workers, or none: with one CPU (a worker would only take turns with this process), or in a process
    that runs other threads (a Jupyter kernel's, a progress bar's), whose locks a fork could copy held for ever."""
    cpus = usable_cpus()
    if cpus < 2 or threading.active_count() > 1:
        return 0
    return min(WORKERS, cpus)


class FigureDrawer:
    """Draws figures in worker processes; use as a context manager, call finish() before reading the figures."""

    def __init__(self, workers: int | None = None) -> None:
        global _ahead
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]] = []
        if workers is None and _ahead is not None and _ahead[0] == os.getpid():
            self._pool, _ahead = _ahead[1], None  # the workers workers_ahead() started
            return
        if workers is None:
            workers = default_workers()
        if workers > 0 and sys.platform.startswith("linux"):
            self._pool = _start_workers(workers)

    @property
    def parallel(self) -> bool:
        """Whether figures are drawn in worker processes."""
        return self._pool is not None

    def draw(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Draw one figure: in a worker when there are workers (its errors come out of finish()), else now."""
        if self._pool is None:
            function(*args, **kwargs)
            return
        try:
            future = self._pool.submit(function, *args, **kwargs)
        except BrokenProcessPool:  # a worker died (killed for memory, say): the rest are drawn here
            self.close()
            function(*args, **kwargs)
            return
        self._jobs.append((function, args, kwargs, future))

    def finish(self) -> None:
        """Wait for every figure asked for so far; raise the first error a figure met."""
        jobs, self._jobs = self._jobs, []
        for function, args, kwargs, future in jobs:
            try:
                future.result()
            except BrokenProcessPool:  # the worker died under this figure: draw it here instead
                self.close()
                function(*args, **kwargs)

    def close(self) -> None:
        """Stop the workers (figures not yet drawn are dropped: call finish() first to keep them)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FigureDrawer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
