"""Process-wide TensorFlow settings that only work before TensorFlow is imported.

oneDNN's fast 3D convolutions are on by default only on CPUs with AVX512-VNNI/BF16,
AVX-VNNI or AMX; elsewhere 3D convolutions run 4-5x slower without them. TensorFlow reads
``TF_ENABLE_ONEDNN_OPTS`` once, at import, so segnet sets it here, in the package's first
import, and records whether the user had already chosen, so the choice can be logged later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"

_user_choice = os.environ.get(ONEDNN_VAR)
_tf_already_imported = "tensorflow" in sys.modules
if _user_choice is None:
    os.environ[ONEDNN_VAR] = "1"
# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines) drowns our one-line
# messages; the user can still raise it by setting the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def onednn_status() -> str:
    """One sentence saying whether oneDNN is on and who decided."""
    if _tf_already_imported and _user_choice is None:
        return (
            f"oneDNN: unknown, TensorFlow was imported before segnet, so {ONEDNN_VAR}=1 came "
            "too late; import segnet first or export the variable"
        )
    if _user_choice is not None:
        return f"oneDNN: {ONEDNN_VAR}={_user_choice} (set by the user)"
    return f"oneDNN: enabled by segnet ({ONEDNN_VAR}=1)"


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels, as far as the variable tells.

    Only an explicit "0" turns them off: segnet sets "1" otherwise, and where TensorFlow was
    imported too early it keeps its own default, which is on for the CPUs (AMX, AVX512-BF16)
    whose bfloat16 speed depends on it.
    """
    return os.environ.get(ONEDNN_VAR, "1").strip().lower() not in ("0", "false", "off")


def log_onednn_status(logger: logging.Logger | None = None) -> None:
    (logger or logging.getLogger("segnet")).info(onednn_status())


# TensorFlow's C++ logging starts before absl is initialised, so TF_CPP_MIN_LOG_LEVEL no longer
# silences its start-up lines (oneDNN notice, CUDA probing on CPU-only machines). The CLI filters
# exactly those lines out of stderr unless --debug; everything else passes through untouched.
_NATIVE_LOG_LINE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] )"
)


def _pump(source: int, sink: int) -> None:
    """Copies ``source`` to ``sink`` dropping TensorFlow's native log lines."""
    pending = b""
    while True:
        chunk = os.read(source, 65536)
        if not chunk:
            break
        pending += chunk
        out: list[bytes] = []
        while pending:
            end = pending.find(b"\n")
            if end < 0:
                # A native log line is only recognisable whole; anything else (progress bars
                # redrawn with '\r') must not wait for a newline.
                if pending[:1] not in (b"I", b"W", b"E"):
                    out.append(pending)
                    pending = b""
                break
            line, pending = pending[: end + 1], pending[end + 1 :]
            if not _NATIVE_LOG_LINE.match(line):
                out.append(line)
        if out:
            os.write(sink, b"".join(out))
    if pending and not _NATIVE_LOG_LINE.match(pending):
        os.write(sink, pending)
    os.close(source)


_terminal: TextIO | None = None  # the real stderr while the filter holds fd 2, if a terminal


def filtered_terminal() -> TextIO | None:
    """The user's terminal while :func:`native_log_filter` has put a pipe on fd 2, else None.

    Progress bars must draw there directly: on the pipe, ``isatty()`` is false (tqdm would stay
    hidden) and the window size is unknown.
    """
    return _terminal


@contextlib.contextmanager
def native_log_filter(enabled: bool = True) -> Iterator[None]:
    """Within the block, TensorFlow's C++ start-up log lines are dropped from stderr (fd 2)."""
    global _terminal
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        terminal = os.fdopen(os.dup(saved), "w", buffering=1) if os.isatty(saved) else None
    except OSError:
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved), daemon=True)
    pump.start()
    _terminal = terminal
    try:
        yield
    finally:
        _terminal = None
        if terminal is not None:
            terminal.close()
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end, so the pump sees EOF
        pump.join(timeout=5)
        os.close(saved)
