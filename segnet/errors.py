"""Errors that are the user's to fix: the CLI prints them in one line and exits with status 2."""

from __future__ import annotations

from collections.abc import Sequence


def shortened(items: Sequence[str], limit: int, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then how many more there are: messages name
    a few examples, not two hundred case ids."""
    more = len(items) - limit
    tail = f"{'; ' if sep.startswith(';') else ' '}and {more} more" if more > 0 else ""
    return sep.join(items[:limit]) + tail


class UserError(Exception):
    """A problem with the user's input (config, data, flags, run directory).

    The message must name the file or key, say what is wrong and how to fix it. The CLI prints
    it without a traceback (``--debug`` shows one) and exits with status 2.
    """

    exit_status = 2


class ConfigError(UserError):
    """The experiment config is malformed: every problem is listed, one per line."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{where}{len(self.problems)} problems in the config:\n{lines}"
        super().__init__(text)


class DataError(UserError):
    """One or more volumes or dataset descriptions are unusable: each problem names its file."""

    def __init__(self, problems: list[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{len(self.problems)} problems in the dataset:\n{lines}"
        if hint:
            text = f"{text}\n{hint}"
        super().__init__(text)


class RunDirError(UserError):
    """The run directory cannot be used (unwritable, full, or holds another experiment)."""
