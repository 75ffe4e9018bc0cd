"""Preemption: SIGTERM and SIGINT save the step they arrive in, exit 0 and say how to resume.

One run is stopped twice: SIGTERM in epoch 2 (a cluster scheduler's preemption), then, after
resuming with the exact command printed on stderr, SIGINT in epoch 3 (Ctrl-C); the same command
finishes it. Checkpoints are only written at epoch ends here (``checkpoint.every_steps: 0``) and
the signal is sent as soon as the previous epoch's checkpoint is reported, so the stop usually
falls inside the epoch and its checkpoint is written by the stop alone; on a busy machine the
signal can still land before the loop has left the epoch end, which stops there (also correct:
the newest checkpoint is the stop step either way). The final checkpoint must equal that of an
uninterrupted run started alongside.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import re
import shlex
import signal
from pathlib import Path

import pytest
from helpers import (
    TRAIN_SCRIPT,
    assert_same_checkpoints,
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

STEPS_PER_EPOCH = 5
EPOCHS = 3


def _config(tmp_path: Path, dataset: Path, name: str) -> Path:
    data = crash_experiment(dataset, tmp_path / f"{name}-cache", checkpoint={"every_steps": 0})
    assert data["train"]["epochs"] == EPOCHS
    assert data["train"]["steps_per_epoch"] == STEPS_PER_EPOCH
    return write_yaml(tmp_path / f"{name}.yaml", data)


def _latest_checkpoint(run_dir: Path) -> str:
    """The newest checkpoint named by the state file TensorFlow keeps (read without TF)."""
    state = read_text(run_dir / "checkpoints" / "checkpoint")
    match = re.search(r'^model_checkpoint_path: "(.+)"$', state, re.MULTILINE)
    assert match, state
    return match.group(1)


def _stop_during_epoch(
    args: list[str], run_dir: Path, output: Path, epoch: int, signum: signal.Signals
) -> tuple[int, int, str]:
    """Runs ``python ARGS``; sends ``signum`` once the end-of-epoch checkpoint of ``epoch`` is
    saved, so that it arrives during the next epoch's steps.

    Returns:
        The step the run restored, the step it stopped at, and its resume command (from the
        ``stopped`` event; the command must also be on the child's stderr).
    """
    offset = events_size(run_dir)
    proc = start(args, output)
    saved = epoch * STEPS_PER_EPOCH
    assert wait_until(proc, lambda: saved in saved_steps(run_dir, offset), 0.01), tail(output)
    proc.send_signal(signum)
    assert finish(proc) == 0, tail(output)
    text = read_text(output)
    assert "Traceback" not in text, tail(output)
    stopped = run_events(run_dir, offset, "stopped")
    assert [e["signal"] for e in stopped] == [signum.name], tail(output)
    command = stopped[0]["resume"]
    # Both on stderr: the signal's arrival, and the stop with the command that resumes.
    assert text.count(signum.name) >= 2 and command in text, tail(output)
    return restored_step(run_dir, offset) or 0, stopped[0]["step"], command


def _argv(command: str) -> list[str]:
    """The printed command's arguments after ``python`` (this interpreter runs them)."""
    program, *args = shlex.split(command)
    assert program == "python", command
    return args


def test_sigterm_and_sigint_save_exit_0_and_resume_where_they_stopped(
    tmp_path: Path, tiny_root: Path
) -> None:
    reference_dir = tmp_path / "reference"
    reference_args = ["--config", str(_config(tmp_path, tiny_root, "reference"))]
    reference = start(
        [str(TRAIN_SCRIPT), *reference_args, "--run-dir", str(reference_dir)],
        tmp_path / "reference.txt",
    )
    run_dir = tmp_path / "run"
    config = _config(tmp_path, tiny_root, "run")
    first = [str(TRAIN_SCRIPT), "--config", str(config), "--run-dir", str(run_dir)]
    hint = f"python {TRAIN_SCRIPT} --config {run_dir / 'config.yaml'} --run-dir {run_dir}"

    started, term_step, command = _stop_during_epoch(
        first, run_dir, tmp_path / "sigterm.txt", 1, signal.SIGTERM
    )
    assert (started, command) == (0, hint)
    assert STEPS_PER_EPOCH <= term_step <= 2 * STEPS_PER_EPOCH  # see the module docstring
    assert _latest_checkpoint(run_dir) == f"ckpt-{term_step}"
    assert not (run_dir / "export").exists()

    started, int_step, command = _stop_during_epoch(
        _argv(command), run_dir, tmp_path / "sigint.txt", 2, signal.SIGINT
    )
    assert (started, command) == (term_step, hint)
    assert 2 * STEPS_PER_EPOCH <= int_step <= EPOCHS * STEPS_PER_EPOCH
    assert _latest_checkpoint(run_dir) == f"ckpt-{int_step}"

    offset = events_size(run_dir)
    last = start(_argv(command), tmp_path / "final.txt")
    assert finish(last) == 0, tail(tmp_path / "final.txt")
    assert restored_step(run_dir, offset) == int_step
    assert _latest_checkpoint(run_dir) == f"ckpt-{EPOCHS * STEPS_PER_EPOCH}"
    assert (run_dir / "export" / "saved_model").is_dir()
    assert finish(reference) == 0, tail(tmp_path / "reference.txt")
    assert_same_checkpoints(newest_checkpoint(run_dir), newest_checkpoint(reference_dir))
    with open(run_dir / "metrics.csv", encoding="utf-8") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2", "3"]
