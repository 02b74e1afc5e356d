"""Ctrl-C (SIGINT) and SIGTERM during training: ask the loop to stop at its next safe point, not mid-step.

A safe point is the end of a training step or of a validation batch: the loop then saves its state and
exits with the command that resumes it. A second signal stops at once (KeyboardInterrupt), keeping the last
saved state. Handlers can only be installed in the main thread; elsewhere the guard does nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Raised at a safe point after a stop signal arrived (the training loop turns it into Interrupted)."""


class StopSignals:
    """Within the block, SIGINT and SIGTERM set `requested` (the signal's name) instead of killing the process."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # the second signal: stop now, the last saved state stays the latest
        self.requested = signal.Signals(signum).name
        log.warning(f"{self.requested}: saving the training state at the end of this step "
                    f"(send it again to stop at once, without saving)")

    def check(self) -> None:
        """Raise StopRequested when a stop signal has arrived."""
        if self.requested is not None:
            raise StopRequested(self.requested)
