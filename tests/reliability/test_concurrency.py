"""Two training processes started on one run directory: the second is refused at once with one
message and exit status 2, and the first runs to the end as if alone (every checkpoint and
metrics row written once)."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import os
import signal
from pathlib import Path

import pytest
from helpers import (
    TRAIN_SCRIPT,
    crash_experiment,
    finish,
    read_text,
    saved_steps,
    start,
    tail,
    wait_until,
    write_yaml,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_a_second_training_on_a_busy_run_directory_is_refused(tmp_path: Path, tiny_root: Path):
    config = write_yaml(tmp_path / "x.yaml", crash_experiment(tiny_root, tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = [str(TRAIN_SCRIPT), "--config", str(config), "--run-dir", str(run_dir), "--quiet"]
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"
    first = start(args, first_out)
    # The first holds the run once it has saved a checkpoint. It is paused there (SIGSTOP keeps
    # its lock), so the second meets it mid-run however slowly the second starts.
    assert wait_until(first, lambda: bool(saved_steps(run_dir)), 0.01), tail(first_out)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = start(args, second_out)
        assert finish(second) == 2, tail(second_out)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    refusal = read_text(second_out)
    assert "Traceback" not in refusal
    assert f"--run-dir {run_dir}" in refusal and f"pid {first.pid}" in refusal, refusal
    assert finish(first) == 0, tail(first_out)
    with open(run_dir / "metrics.csv", encoding="utf-8") as handle:
        epochs = [row["epoch"] for row in csv.DictReader(handle)]
    assert epochs == sorted(set(epochs)) and len(epochs) == 3, epochs
    steps = saved_steps(run_dir)
    assert steps == sorted(set(steps)), steps  # no checkpoint written twice
