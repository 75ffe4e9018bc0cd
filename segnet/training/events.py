"""``events.jsonl``: a run's milestones as one JSON object per line, for tools to follow.

The chief appends one line per event and closes the file at once, so a reader polling the file
(a monitoring tool, a test waiting for a checkpoint) sees each event as it happens, and a
process killed at any moment leaves every earlier event intact. Resumes append to the same file.
Each line has ``time`` (seconds since the epoch), ``event`` and ``step`` (optimizer steps done);
some events add more::

    {"time": 1767225600.123, "event": "restored", "step": 4, "path": "RUN/checkpoints/ckpt-4"}
    {"time": 1767225600.456, "event": "started", "step": 4}
    {"time": 1767225601.789, "event": "checkpoint_saved", "step": 5, "path": "RUN/.../ckpt-5"}
    {"time": ..., "event": "best_saved", "step": 5, "path": "RUN/.../best/ckpt-5", "score": 0.61}
    {"time": ..., "event": "epoch_end", "step": 5, "epoch": 1}
    {"time": ..., "event": "stopped", "step": 7, "signal": "SIGTERM", "resume": "python ..."}
    {"time": ..., "event": "exported", "step": 15, "path": "RUN/export"}

``restored`` comes only when a checkpoint was restored; ``started`` once the data stream
starts (training begins at ``step``); ``epoch_end`` after the epoch's metrics row and
checkpoint are written; ``stopped`` after a stop request's checkpoint (``signal`` is null when
another worker asked). A line cut short by a kill is skipped by :func:`read_events`, as any
reader should.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from segnet.run_dir import explain_os_error


class EventLog:
    """Appends events to ``path``; writes nothing when ``path`` is None (not the chief).

    Args:
        path: the run's ``events.jsonl``, or None.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None and _ends_mid_line(path):
            self._append("\n")  # a kill cut the last line: keep it from swallowing the next

    def emit(self, event: str, step: int, **fields: Any) -> None:
        """Appends ``{"time", "event", "step", **fields}`` as one line."""
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": event, "step": step, **fields}
        self._append(json.dumps(record) + "\n")

    def _append(self, text: str) -> None:
        assert self.path is not None
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise explain_os_error(exc, self.path) from None


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            if handle.tell() == 0:
                return False
            handle.seek(-1, 2)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The events of ``path`` from byte ``offset`` on; [] while it does not exist.

    Lines that do not parse as a JSON object (one cut short by a kill) are skipped.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events
