"""What a person at a terminal sees: progress bars only when someone is watching.

Bars are drawn when the command's stderr is a terminal and ``--quiet`` is off; in logs, CI and
pipes they stay off. The CLI puts a filtering pipe on stderr (``_tf_env.native_log_filter``),
so "is stderr a terminal" is asked of the stream the filter saved, and bars draw on it directly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

from segnet._tf_env import filtered_terminal


def terminal() -> TextIO | None:
    """The terminal progress bars draw on, or None when stderr is not one."""
    filtered = filtered_terminal()
    if filtered is not None:
        return filtered
    return sys.stderr if sys.stderr.isatty() else None


def is_interactive(quiet: bool) -> bool:
    """Whether progress bars are shown: not ``--quiet`` and stderr is a terminal."""
    return not quiet and terminal() is not None


def progress_bar(iterable: Iterable[Any] | None = None, *, quiet: bool, **options: Any) -> tqdm:
    """A tqdm bar on the terminal, or a disabled one (still iterable) when nobody watches.

    Args:
        iterable: what to iterate over, as for tqdm.
        quiet: ``--quiet`` was given.
        **options: tqdm's options (``desc``, ``total``, ``unit``, ``leave``...).
    """
    stream = terminal() if not quiet else None
    return tqdm(iterable, file=stream, disable=stream is None, dynamic_ncols=True, **options)
