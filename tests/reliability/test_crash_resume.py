"""Crash safety: a training run SIGKILLed 12 times, resumed each time, ends bit-identical.

One chain of resumes over one run directory (``SCHEDULE``): each child process is killed with
SIGKILL at its point, and the next one resumes. Eight points are reached by a fault hook that
makes the child kill itself at an exact place (inside the cache write, the config write and
six places inside a checkpoint save); four are chosen by this process, at seeded random moments
(start-up, two mid-training moments) or as soon as the final export's temporary file appears.
After every kill the next run must start from the last checkpoint that was complete (never
earlier than the last one the trainer reported saved), and the final checkpoint must equal an
uninterrupted reference run's, tensor for tensor (CPU, op determinism). This process follows
each child through the run's ``events.jsonl`` (checkpoint saved, restored, started), not its log.

The fault hook: this module doubles as the child's entry point. ``python -m
reliability.test_crash_resume ARGS`` runs ``segnet-train ARGS`` (``segnet.cli.train_main``)
after, when ``SEGNET_RELIABILITY_KILL=<point>:<step>`` is set, wrapping the one library function
at that point so that the process SIGKILLs itself there (after appending ``<point>:<step>`` to
the file named by ``SEGNET_RELIABILITY_MARK``, which proves where it died). Nothing in segnet
knows about it; the trainer and the checkpoint code run unchanged.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TRAIN_SCRIPT,
    assert_same_tensors,
    checkpoint_tensors,
    crash_experiment,
    events_size,
    finish,
    newest_checkpoint,
    read_text,
    restored_step,
    run_events,
    saved_steps,
    start,
    tail,
    wait_until,
    write_yaml,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

KILL_ENV = "SEGNET_RELIABILITY_KILL"
MARK_ENV = "SEGNET_RELIABILITY_MARK"
SEED = 8  # seeds the random kill moments (printed with the schedule)
CHILD_MODULE = "reliability.test_crash_resume"


@dataclass(frozen=True)
class Kill:
    """One SIGKILL of the chain.

    Attributes:
        point: what the child is doing when it dies (RELIABILITY.md lists these).
        hook: ``<point>:<step>`` for the fault hook, or "" when this process kills the child.
        after: this process waits for events.jsonl to report ``ckpt-<after>`` saved (None:
            waits from the child's start) ...
        delay: ... then a seeded random delay in this range, in seconds ...
        until: ... but no later than events.jsonl reporting ``ckpt-<until>`` saved (0: training
            started), so that every later point of the schedule is still ahead.
        export: ... or until the final export's temporary file appears.
        resumes_at: the step the next run must restore (hook kills know it exactly); None:
            the last reported checkpoint or the one after it (a save may have been under way).
        in_save: whether the point is inside a checkpoint write.
    """

    point: str
    hook: str = ""
    after: int | None = None
    delay: tuple[float, float] = (0.0, 0.0)
    until: int | None = None
    export: bool = False
    resumes_at: int | None = None
    in_save: bool = False


# A checkpoint every step; epochs end at steps 5, 10 and 15 (validation, best, then latest save).
# Random kills stop at `until` at the latest, so that every later point is still ahead.
SCHEDULE = (
    Kill("preprocessing cases into the data cache", hook="cache:0", resumes_at=0),
    Kill("writing config.yaml into the run directory", hook="config:0", resumes_at=0),
    Kill("start-up, random moment before training", delay=(0.5, 8.0), until=0),
    Kill("ckpt-2: shards written, not merged", hook="shards:2", resumes_at=1, in_save=True),
    Kill("ckpt-3: merged, state file not updated", hook="merged:3", resumes_at=2, in_save=True),
    Kill("best ckpt-5 (epoch end): shards written", hook="best:5", resumes_at=4, in_save=True),
    Kill("ckpt-5: state file written, not renamed", hook="state:5", resumes_at=4, in_save=True),
    Kill("training, random moment after ckpt-6", after=6, delay=(0.0, 0.3), until=8),
    Kill("ckpt-10 (epoch end): deleting ckpt-8", hook="sweep:10", resumes_at=10, in_save=True),
    Kill("ckpt-11: saved, not yet read back", hook="saved:11", resumes_at=11, in_save=True),
    Kill("training, random moment after ckpt-12", after=12, delay=(0.0, 0.3), until=14),
    Kill("exporting the final model", after=15, export=True, resumes_at=15),
)
FINAL_STEP = 15


def kill_moments(seed: int = SEED) -> list[float]:
    """The seeded random delay of each kill (0 where the kill has no random part)."""
    rng = random.Random(seed)
    return [round(rng.uniform(*kill.delay), 3) for kill in SCHEDULE]


# ---------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------
class Chain:
    """Children training one run directory in turn, each resuming what the last one left."""

    def __init__(self, tmp_path: Path, dataset: Path) -> None:
        self.tmp = tmp_path
        self.run_dir = tmp_path / "run"
        self.config = write_yaml(
            tmp_path / "chain.yaml", crash_experiment(dataset, tmp_path / "chain-cache")
        )
        self.mark = tmp_path / "killed-at.txt"
        self.children = 0

    def spawn(self, hook: str) -> tuple[subprocess.Popen, Path]:
        self.children += 1
        output = self.tmp / f"child-{self.children:02d}.txt"
        args = ["--config", str(self.config), "--run-dir", str(self.run_dir)]
        if hook:
            env = {KILL_ENV: hook, MARK_ENV: str(self.mark)}
            return start(["-m", CHILD_MODULE, *args], output, **env), output
        return start([str(TRAIN_SCRIPT), *args], output), output

    def kill_when_due(self, proc: subprocess.Popen, kill: Kill, delay: float) -> None:
        """Kills ``proc`` at the kill's moment (hook kills happen inside the child)."""
        if kill.hook:
            return
        if kill.after is not None:
            wait_until(proc, lambda: kill.after in saved_steps(self.run_dir))
        if kill.export:
            export_dir = self.run_dir / "export"
            wait_until(
                proc,
                lambda: export_dir.is_dir() and any(p.name[0] == "." for p in export_dir.iterdir()),
                poll=0.002,
            )
        if kill.delay != (0.0, 0.0):
            deadline = time.monotonic() + delay
            wait_until(proc, lambda: time.monotonic() >= deadline or self._reached(kill.until))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    def _reached(self, until: int | None) -> bool:
        if until is None:
            return False
        if until == 0:
            return bool(run_events(self.run_dir, kind="started"))
        return until in saved_steps(self.run_dir)

    def last_reported(self) -> int:
        """The newest checkpoint any child reported saved (0: none)."""
        return max(saved_steps(self.run_dir), default=0)


def _expected_resume(kill: Kill, last_reported: int) -> tuple[int, int]:
    if kill.resumes_at is not None:
        return kill.resumes_at, kill.resumes_at
    return last_reported, last_reported + 1  # a save may have been between its steps


def _run_reference(tmp_path: Path, dataset: Path) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "reference"
    data = crash_experiment(dataset, tmp_path / "ref-cache")
    config = write_yaml(tmp_path / "reference.yaml", data)
    args = [str(TRAIN_SCRIPT), "--config", str(config), "--run-dir", str(run_dir)]
    return start(args, tmp_path / "reference.txt"), run_dir


def test_twelve_kills_lose_nothing_and_end_bit_identical(tmp_path: Path, tiny_root: Path) -> None:
    reference, reference_dir = _run_reference(tmp_path, tiny_root)  # runs alongside the chain
    chain = Chain(tmp_path, tiny_root)
    moments = kill_moments()
    print(f"kill schedule (seed {SEED}):")
    for kill, delay in zip(SCHEDULE, moments):
        print(f"  {kill.point}: {kill.hook or 'parent'}, random delay {delay:.3f} s")
    expected = (0, 0)  # the steps the next run may restore
    for index, (kill, delay) in enumerate(zip(SCHEDULE, moments), start=1):
        offset = events_size(chain.run_dir)
        proc, output = chain.spawn(kill.hook)
        chain.kill_when_due(proc, kill, delay)
        status = finish(proc)
        assert status == -signal.SIGKILL, (
            f"kill {index} ({kill.point}): the child exited with {status} instead of dying "
            f"there\n{tail(output)}"
        )
        if kill.hook:
            marks = read_text(chain.mark).split()
            assert marks[-1:] == [kill.hook], f"kill {index}: died elsewhere; marks {marks}"
        _check_restore(chain, offset, expected, index, output)
        last = chain.last_reported()
        expected = _expected_resume(kill, last)
        assert expected[0] >= last, f"kill {index}: resuming before reported ckpt-{last}"
        print(f"kill {index} survived ({kill.point}); last reported ckpt-{last}")
    offset = events_size(chain.run_dir)
    proc, output = chain.spawn("")
    assert finish(proc) == 0, tail(output)
    assert _check_restore(chain, offset, expected, len(SCHEDULE) + 1, output)
    assert (chain.run_dir / "export" / "saved_model").is_dir()
    assert (chain.run_dir / "export" / "model.keras").is_file()
    assert finish(reference) == 0, tail(tmp_path / "reference.txt")
    final = checkpoint_tensors(newest_checkpoint(chain.run_dir))
    assert int(final["step/.ATTRIBUTES/VARIABLE_VALUE"]) == FINAL_STEP
    assert_same_tensors(final, checkpoint_tensors(newest_checkpoint(reference_dir)))
    with open(chain.run_dir / "metrics.csv", encoding="utf-8") as handle:
        epochs = [row["epoch"] for row in csv.DictReader(handle)]
    assert epochs == ["1", "2", "3"], "an epoch resumed after a kill wrote its row twice"


def _check_restore(
    chain: Chain, offset: int, expected: tuple[int, int], index: int, output: Path
) -> bool:
    """Checks the step the child that just ended restored; False if it was killed before."""
    started = restored_step(chain.run_dir, offset)
    if started is not None:
        low, high = expected
        assert low <= started <= high, (
            f"child {index} resumed at step {started}, expected {low}..{high}\n{tail(output)}"
        )
    return started is not None


# ---------------------------------------------------------------------------------------------
# The fault hook (runs in the child)
# ---------------------------------------------------------------------------------------------
def _install_fault(point: str, step: int, mark: Path) -> None:
    """Wraps the one function where ``point`` is, so that the process SIGKILLs itself there."""
    import numpy as np
    from tensorflow.python.checkpoint import checkpoint_management as management
    from tensorflow.python.lib.io import file_io
    from tensorflow.python.ops import gen_io_ops

    saving: list[tuple[str, int]] = []  # (manager folder name, step) of the save under way
    calls = [0]

    def die(*_: Any, **__: Any) -> bool:
        with open(mark, "a", encoding="utf-8") as handle:
            handle.write(f"{point}:{step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
        return True

    def during(folder: str) -> Callable[..., bool]:
        return lambda *_, **__: saving[-1:] == [(folder, step)]

    def second_call(*_: Any, **__: Any) -> bool:
        calls[0] += 1
        return calls[0] == 2

    faults: dict[str, tuple[Any, str, Callable[..., bool], bool]] = {
        # (owner, function, when, after the call)
        "cache": (np, "save", second_call, False),  # image.npy written, label.npy not
        "config": (os, "replace", lambda src, dst: Path(dst).name == "config.yaml", False),
        "shards": (gen_io_ops, "merge_v2_checkpoints", during("checkpoints"), False),
        "best": (gen_io_ops, "merge_v2_checkpoints", during("best"), False),
        "merged": (management, "update_checkpoint_state_internal", during("checkpoints"), False),
        "state": (
            file_io,
            "rename",
            lambda src, dst, *a: during("checkpoints")() and Path(dst).name == "checkpoint",
            False,
        ),
        "sweep": (file_io, "delete_file", during("checkpoints"), True),
    }
    _track_saves(management.CheckpointManager, saving, die if point == "saved" else None, step)
    if point in faults:
        owner, name, when, after = faults[point]
        _wrap(owner, name, when, die, after)


def _wrap(
    owner: Any, name: str, when: Callable[..., bool], then: Callable[..., Any], after: bool
) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after and when(*args, **kwargs):
            then()
        result = original(*args, **kwargs)
        if after and when(*args, **kwargs):
            then()
        return result

    setattr(owner, name, wrapper)


def _track_saves(
    manager: type, saving: list[tuple[str, int]], die_after: Callable[..., Any] | None, step: int
) -> None:
    """Records which manager saves which step; ``die_after`` the latest manager saved ``step``."""
    original = manager.save

    @functools.wraps(original)
    def save(self: Any, checkpoint_number: Any = None, **kwargs: Any) -> Any:
        key = (Path(self.directory).name, int(checkpoint_number))
        saving.append(key)
        try:
            path = original(self, checkpoint_number=checkpoint_number, **kwargs)
        finally:
            saving.pop()
        if die_after is not None and key == ("checkpoints", step):
            die_after()
        return path

    manager.save = save


def _child_main() -> int:
    point, _, step = os.environ.get(KILL_ENV, "").partition(":")
    if point:
        _install_fault(point, int(step), Path(os.environ[MARK_ENV]))
    from segnet.cli import train_main

    return train_main()


if __name__ == "__main__":
    sys.exit(_child_main())
