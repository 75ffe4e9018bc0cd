"""Writing to the file system without losing what is there.

Two rules every writer in segnet follows: a file is replaced atomically (readers see the old
or the new one, never half), and an output folder is checked before any work starts, so a
typo in a path costs a second, not an hour of training or inference.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from segnet.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: Path, what: str, fix: str) -> Path:
    """Creates the folder ``path`` (and its parents) and checks this process can write in it.

    Args:
        path: the folder.
        what: how the message names it: the flag or key it came from, or a description.
        fix: what the user should do, e.g. "set data.cache_dir to a writable folder".

    Returns:
        ``path``.

    Raises:
        UserError: ``path`` is a file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{what} {path}: cannot create the folder ({exc.strerror}); {fix}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: not writable; {fix}")
    return path
