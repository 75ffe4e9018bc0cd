"""Reliability helpers: a tiny dataset and experiment, training child processes, snapshots.

Shared by the runs that are killed and resumed (``test_crash_resume``, ``test_preemption``) and
by the bad-input corpus (``test_bad_inputs``). Children are real processes (``scripts/train.py``
or ``python -m reliability.test_crash_resume``) whose output goes to a file, because a pipe
nobody reads can block a child and a killed child's last lines must survive it.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from segnet.data.synthetic import SyntheticSpec, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
# 4 cases of odd size 17x18x19, 3 classes; fold 0 of folds.json holds out 2 cases.
SPEC = SyntheticSpec(num_cases=4, shape=(17, 18, 19), num_classes=3, num_folds=2)
CHILD_TIMEOUT = 300.0  # seconds for one child; a hung child fails its test, not CI's clock
# The trainer's own log lines that the harnesses read (train.log survives a SIGKILL intact:
# every record is written straight to the file, while stderr goes through a pipe thread).
SAVED = re.compile(r"checkpoint saved: \S*ckpt-(\d+)$", re.MULTILINE)
RESTORED = re.compile(r"restored \S*ckpt-(\d+) \(step (\d+)\)")
PIPELINE_STARTED = "data stream: "  # logged once the run has restored (or not) and starts its data


def experiment(root: Path, cache: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny deterministic experiment as plain data.

    SegNet with 4 filters and depth 2 (BatchNorm statistics and argmax unpooling in every
    checkpoint) on 16^3 patches; 3 epochs of 4 steps of batch 1; a checkpoint every step with
    the latest 2 kept; validation on one held-out case each epoch. ``sections`` update the
    top-level sections key by key.
    """
    data: dict[str, Any] = {
        "name": "reliability",
        "data": {
            "root": str(root),
            "num_classes": SPEC.num_classes,
            "patch_size": [16, 16, 16],
            "cache_dir": str(cache),
            "split": {"folds_file": "folds.json", "fold": 0},
        },
        "model": {"name": "segnet", "segnet": {"filters": 4, "depth": 2}},
        "train": {
            "epochs": 3,
            "steps_per_epoch": 5,
            "batch_size": 1,
            "deterministic": True,
            "val_every": 1,
            "val_max_cases": 1,
        },
        "checkpoint": {"every_steps": 1, "keep": 2},
        "evaluation": {"batch_size": 4, "montage": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic dataset, written once per worker; tests must not modify it."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("reliability") / "tiny", SPEC)


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """segnet and the ``reliability`` package importable; ``extra`` added."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def start(args: list[str], output: Path, **env: str) -> subprocess.Popen:
    """Starts ``python ARGS``, appending its stdout and stderr to ``output``."""
    with open(output, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=child_env(**env),
            cwd=REPO,
        )


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], poll: float = 0.005) -> bool:
    """Polls ``condition`` until it holds (True) or ``proc`` has exited (False)."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(poll)
    proc.kill()
    raise TimeoutError(f"child {proc.args} did not get there within {CHILD_TIMEOUT:.0f} s")


def finish(proc: subprocess.Popen) -> int:
    """Waits for ``proc``; its exit status (negative: the signal that ended it)."""
    try:
        return proc.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def tail(path: Path, lines: int = 25) -> str:
    """The end of a child's output, for assertion messages."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def read_text(path: Path, offset: int = 0) -> str:
    """The file's text from byte ``offset`` on ("" while it does not exist)."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace")


def saved_steps(log_text: str) -> list[int]:
    """Steps whose checkpoint the trainer reported saved (written and read back)."""
    return [int(step) for step in SAVED.findall(log_text)]


def restored_step(log_text: str) -> int | None:
    """The step a run started from: its restored checkpoint, 0 when it restored none, or None
    when it never got that far (it was killed earlier)."""
    match = RESTORED.search(log_text)
    if match:
        return int(match.group(2))
    return 0 if PIPELINE_STARTED in log_text else None


def checkpoint_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the run's newest checkpoint, except the save counter (it counts calls to
    save, which a resumed run repeats; the step, weights and optimizer slots must not differ)."""
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert prefix, f"no checkpoint in {run_dir}"
    reader = tf.train.load_checkpoint(prefix)
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith("save_counter")]
    return {name: reader.get_tensor(name) for name in names}


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    different = [name for name in expected if not np.array_equal(actual[name], expected[name])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ: {different[:5]}"


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------
def snapshot(path: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, tuple]:
    """``relative path -> (size, sha256, mtime_ns)`` for ``path`` (a file) or every file under it
    whose relative path ``skip`` does not reject; empty when ``path`` does not exist."""
    if path.is_file():
        files = {".": path}
    elif path.is_dir():
        files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    else:
        return {}
    return {
        rel: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for rel, p in files.items()
        if not skip(rel)
    }
