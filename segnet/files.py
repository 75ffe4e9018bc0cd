"""Writing to the file system without losing what is there.

Two rules every writer in segnet follows: a file is replaced atomically (readers see the old
or the new one, never half), and an output folder is checked before any work starts, so a
typo in a path costs a second, not an hour of training or inference.

Files are created with the mode any other tool would give them (``0o666`` less the umask, so
usually readable by the user's group), not the owner-only mode of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from segnet.errors import UserError

TEMPORARY_PREFIX = ".tmp-"  # hidden, so folder scans (predict's inputs, caches) skip them


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path`` that keeps its suffixes (``.nii.gz`` stays last, so
    libraries that pick a format by suffix write the right one)."""
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-{path.name}")


@contextlib.contextmanager
def atomic_output(path: Path, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block ends normally, the file written
    there replaces ``path`` in one rename. On any exception the temporary file is removed and
    ``path`` keeps its old content.

    Args:
        path: the final file.
        fsync: flush the file to disk before the rename, so a power cut cannot leave an empty
            file under the final name (skip it only for files that are cheap to recompute).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # after success it was renamed away
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Writes ``data`` to ``path`` so that readers see the old or the new file, never half."""
    with atomic_output(path, fsync=fsync) as tmp:
        # O_EXCL: the name is fresh; 0o666 lets the umask decide the mode, as for any file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    """Writes ``text`` as UTF-8 to ``path``; readers see the old or the new file, never half."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


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
