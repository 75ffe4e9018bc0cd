"""SIGINT/SIGTERM turn into a request to stop at the next step boundary.

A cluster scheduler preempts with SIGTERM (then SIGKILL after a grace period); a user presses
Ctrl-C. Either way the handler only sets a flag: the training loop finishes the step it is in,
saves a checkpoint and returns normally, so the process exits with status 0 and the same
command resumes. A second Ctrl-C while stopping raises KeyboardInterrupt at once (the last
checkpoint stays as it was).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("segnet")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere a no-op).

    Attributes:
        signal_name: the signal that asked to stop (``"SIGTERM"``), or None.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str) -> None:
        """Asks to stop, as a signal would (also used by tests)."""
        self.signal_name = name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(name)
        log.warning("%s received: saving a checkpoint after the current step, then stopping", name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
