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
import re
import shlex
import signal
from pathlib import Path

import pytest

from .conftest import (
    TRAIN_SCRIPT,
    assert_same_tensors,
    checkpoint_tensors,
    experiment,
    finish,
    read_text,
    restored_step,
    saved_steps,
    start,
    tail,
    wait_until,
    write_yaml,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

STEPS_PER_EPOCH = 5
EPOCHS = 3
STOPPED = re.compile(r"stopped at step (\d+) \((SIG\w+)\); resume with: (.+)$", re.MULTILINE)


def _config(tmp_path: Path, dataset: Path, name: str) -> Path:
    data = experiment(dataset, tmp_path / f"{name}-cache", checkpoint={"every_steps": 0})
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
        The step the run restored, the step it stopped at, and its resume command.
    """
    log = run_dir / "train.log"
    offset = log.stat().st_size if log.exists() else 0
    proc = start(args, output)
    saved = epoch * STEPS_PER_EPOCH
    assert wait_until(proc, lambda: saved in saved_steps(read_text(log, offset)), 0.01), tail(
        output
    )
    proc.send_signal(signum)
    assert finish(proc) == 0, tail(output)
    text = read_text(output)
    assert "Traceback" not in text, tail(output)
    assert f"{signum.name} received" in text, tail(output)
    match = STOPPED.search(text)
    assert match and match.group(2) == signum.name, tail(output)
    return restored_step(read_text(log, offset)) or 0, int(match.group(1)), match.group(3)


def _argv(command: str) -> list[str]:
    """The printed command's arguments after ``python`` (this interpreter runs them)."""
    program, *args = shlex.split(command)
    assert program == "python", command
    return args


def test_sigterm_and_sigint_save_exit_0_and_resume_where_they_stopped(
    tmp_path: Path, dataset: Path
) -> None:
    reference_dir = tmp_path / "reference"
    reference_args = ["--config", str(_config(tmp_path, dataset, "reference"))]
    reference = start(
        [str(TRAIN_SCRIPT), *reference_args, "--run-dir", str(reference_dir)],
        tmp_path / "reference.txt",
    )
    run_dir = tmp_path / "run"
    config = _config(tmp_path, dataset, "run")
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

    offset = (run_dir / "train.log").stat().st_size
    last = start(_argv(command), tmp_path / "final.txt")
    assert finish(last) == 0, tail(tmp_path / "final.txt")
    assert restored_step(read_text(run_dir / "train.log", offset)) == int_step
    assert _latest_checkpoint(run_dir) == f"ckpt-{EPOCHS * STEPS_PER_EPOCH}"
    assert (run_dir / "export" / "saved_model").is_dir()
    assert finish(reference) == 0, tail(tmp_path / "reference.txt")
    assert_same_tensors(checkpoint_tensors(run_dir), checkpoint_tensors(reference_dir))
