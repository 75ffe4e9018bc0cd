"""Exact resume through the CLI: SIGTERM stops cleanly, SIGKILL loses nothing saved.

One run is trained without interruption. Another is stopped with SIGTERM after its step-10
checkpoint (it must exit 0 and print the command that resumes it), resumed with that command,
killed with SIGKILL after its next checkpoint, and resumed again to the end. With op determinism
on the CPU, both end with bit-identical checkpoints.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import csv
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_helpers import (
    REPO,
    assert_same_checkpoints,
    experiment,
    run_cli,
    subprocess_env,
    write_yaml,
)

from segnet.training.checkpoints import checkpoint_candidates

pytestmark = pytest.mark.slow
EVERY = 10
STEPS = 80  # 2 epochs of 40: long enough that a signal sent after step 10 lands mid-run


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _saved_steps(checkpoints: Path) -> list[int]:
    """Steps the state file lists: only checkpoints whose save completed."""
    state = checkpoints / "checkpoint"
    text = state.read_text() if state.exists() else ""
    return [int(s) for s in re.findall(r'all_model_checkpoint_paths: ".*?ckpt-(\d+)"', text)]


def _wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, after: int) -> int:
    """Polls until a checkpoint past step ``after`` is saved; returns its step."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        later = [s for s in _saved_steps(checkpoints) if s > after]
        if later:
            return max(later)
        if process.poll() is not None:
            pytest.fail(
                f"training ended before a checkpoint after step {after}: "
                f"{process.stderr.read()[-3000:]}"
            )
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint after step {after} within 240 s")


def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_root: Path, tmp_path: Path
) -> None:
    data = experiment(
        tiny_root,
        tmp_path / "cache",
        train={"epochs": 2, "steps_per_epoch": STEPS // 2},
        checkpoint={"every_steps": EVERY},
    )
    config = write_yaml(tmp_path / "tiny.yaml", data)
    reference = run_cli(["--config", str(config), "--run-dir", str(tmp_path / "ref"), "--quiet"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    script = str(REPO / "scripts" / "train.py")
    first = _start(
        [sys.executable, script, "--config", str(config), "--run-dir", str(run)], tmp_path
    )
    _wait_for_checkpoint(first, checkpoints, after=0)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    stopped_at = max(_saved_steps(checkpoints))
    assert EVERY <= stopped_at < STEPS and not (run / "export").exists()
    hint = re.search(r"resume with: (.+)", stderr)
    assert hint, stderr[-3000:]
    command = shlex.split(hint.group(1))
    assert command[:2] == ["python", script] and command[-2:] == ["--run-dir", str(run)]

    second = _start([sys.executable, *command[1:]], tmp_path)
    _wait_for_checkpoint(second, checkpoints, after=stopped_at)
    second.kill()  # SIGKILL: no handler runs
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL
    assert max(_saved_steps(checkpoints)) < STEPS, "the kill came too late to test anything"

    third = run_cli([*command[2:], "--quiet"], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert_same_checkpoints(
        checkpoint_candidates(checkpoints)[0],
        checkpoint_candidates(tmp_path / "ref" / "checkpoints")[0],
    )
    with (run / "metrics.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
