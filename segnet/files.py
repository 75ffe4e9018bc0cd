"""Writing to the file system without losing what is there.

Two rules every writer in segnet follows: a file is replaced atomically (readers see the old
or the new one, never half), and an output folder is checked before any work starts, so a
typo in a path costs a second, not an hour of training or inference.

Files are created with the mode any other tool would give them (``0o666`` less the umask, so
usually readable by the user's group), not the owner-only mode of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from segnet.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; FolderLock then only warns nobody
    fcntl = None  # type: ignore[assignment]

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


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
WRITE_ERRORS = (*_NO_SPACE, *_NO_PERMISSION)  # the failures a user fixes, not a bug of ours


def describe_write_error(exc: OSError, path: Path | str, elsewhere: str) -> str:
    """The one phrasing of a failed write, for every writer: where, what, and the fix.

    Args:
        exc: the error.
        path: the file or folder being written.
        elsewhere: the alternative to offer, e.g. "another --run-dir".
    """
    if exc.errno in _NO_SPACE:
        return f"{path}: no space left on the device; free some space or choose {elsewhere}"
    if exc.errno in _NO_PERMISSION:
        return f"{path}: not writable ({exc.strerror}); fix the permissions or choose {elsewhere}"
    return f"{path}: {exc.strerror or exc}; choose {elsewhere}"


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


class FolderBusyError(UserError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive advisory lock on a folder, held for a ``with`` block.

    The lock is ``flock`` on the folder itself, so no lock file is left behind and the kernel
    releases it when its process ends in any way, SIGKILL included: a killed owner never leaves
    a folder locked. A folder the lock had to create is removed again at exit if it is still
    empty, so a command that fails before writing anything leaves no trace.

    Args:
        path: the folder; created (with its parents) when missing.
        busy: the message for ``FolderBusyError``; ``{pid}`` is replaced by the owner's process
            id where the system tells it (``/proc/locks``), else by "unknown".
    """

    def __init__(self, path: Path, busy: str) -> None:
        self.path = Path(path)
        self.busy = busy
        self._fd: int | None = None
        self._created: Path | None = None

    def __enter__(self) -> FolderLock:
        self._created = _first_missing(self.path)
        while True:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _lock_owner(fd)
                    os.close(fd)
                    raise FolderBusyError(self.busy.format(pid=owner or "unknown")) from None
            # The owner before us may have removed the (empty) folder after we opened it:
            # a lock on a deleted folder guards nothing, so take the one now at the path.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    return self
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        self._remove_if_created()  # while still holding the lock: nobody else is inside
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def _remove_if_created(self) -> None:
        if self._created is None:
            return
        with contextlib.suppress(OSError):  # not empty (the command wrote into it): keep it
            path = self.path
            while True:
                path.rmdir()
                if path == self._created:
                    break
                path = path.parent


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if it exists)."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _lock_owner(fd: int) -> str | None:
    """The pid holding an flock on the file behind ``fd``, from ``/proc/locks`` (Linux)."""
    inode = os.fstat(fd).st_ino
    try:
        text = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        match = re.search(r"FLOCK\s+\S+\s+WRITE\s+(\d+)\s+[0-9a-f]+:[0-9a-f]+:(\d+)\s", line)
        if match and int(match.group(2)) == inode:
            return match.group(1)
    return None
