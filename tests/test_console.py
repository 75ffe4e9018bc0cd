"""Progress bars: drawn on a real terminal (a pseudo-terminal with a window size here), also
behind the CLI's native-log filter; never in a pipe or a log file, nor with --quiet."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from segnet.console import is_interactive

REPO = Path(__file__).resolve().parents[1]
# A command run as the CLI runs its commands (segnet.cli._run: the native-log filter on fd 2),
# whose body iterates a progress bar over 3 items.
CHILD = """
import sys, time
from segnet import cli
from segnet.console import progress_bar

def body(args):
    for _ in progress_bar(range(3), desc="Evaluating", unit="case", quiet=args.quiet):
        time.sleep(0.05)
    return 0

parser = cli._Parser(prog="segnet-test")
cli._common_flags(parser)
sys.exit(cli._run("segnet-test", body, parser, sys.argv[1:]))
"""


def _run_on_a_terminal(*args: str, columns: int = 100) -> str:
    """Runs the child with stderr (and stdout) on a pseudo-terminal of ``columns`` columns."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("COLUMNS", None)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            child.kill()
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert child.wait(timeout=60) == 0, output
    return output.decode("utf-8", errors="replace")


def test_the_bar_is_drawn_on_a_terminal_behind_the_cli_filter():
    screen = _run_on_a_terminal()
    assert "Evaluating" in screen and "3/3" in screen, screen


def test_quiet_draws_no_bar_on_a_terminal():
    assert "Evaluating" not in _run_on_a_terminal("--quiet")


def test_no_bar_in_a_pipe_or_a_log():
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert done.returncode == 0 and "Evaluating" not in done.stderr, done.stderr


@pytest.mark.parametrize("quiet", [True, False])
def test_pytest_captured_stderr_is_not_interactive(quiet: bool):
    assert not is_interactive(quiet)
