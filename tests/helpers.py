"""Helpers shared by the tests: tiny datasets and experiments, child processes, run events,
checkpoint comparison and file snapshots.

Fixtures built on them live in ``tests/conftest.py``. Child processes are real processes
(``scripts/train.py`` or ``python -m reliability.test_crash_resume``) whose output goes to a
file, because a pipe nobody reads can block a child and a killed child's last lines must
survive it. Tests follow a training child through its ``events.jsonl``
(:mod:`segnet.training.events`), never through the wording of its log.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segnet.config import ExperimentConfig, build_config
from segnet.data.synthetic import SyntheticSpec
from segnet.run_dir import RunLayout
from segnet.training.events import read_events

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
# The dataset every training test shares (``tiny_root``): 5 cases of odd size 17x18x19,
# 3 classes; fold 0 of folds.json holds out case_002.
SPEC = SyntheticSpec(num_cases=5, shape=(17, 18, 19), num_classes=3, num_folds=5)
# The variant the data tests edit (``tiny_dataset``, one copy per test): 6 cases of 19x20x21,
# 4 classes (data.num_classes' default), 3 folds. They name case_005, fold 2 and the 4 labels.
DATA_SPEC = SyntheticSpec(num_cases=6, shape=(19, 20, 21), num_classes=4, num_folds=3)
CHILD_TIMEOUT = 300.0  # seconds for one child; a hung child fails its test, not CI's clock


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------
def experiment(root: Path, cache: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny experiment as plain data: U-Net with 4 filters and depth 2 on 16^3 patches,
    2 epochs of 3 steps, batch 2, validation on the held-out case, deterministic.

    ``sections`` update top-level sections key by key (one level deep).
    """
    data: dict[str, Any] = {
        "name": "tiny",
        "data": {
            "root": str(root),
            "num_classes": SPEC.num_classes,
            "patch_size": [16, 16, 16],
            "cache_dir": str(cache),
            "split": {"folds_file": "folds.json", "fold": 0},
            "num_workers": 2,
        },
        "model": {
            "name": "unet3d",
            "unet3d": {"filters": 4, "depth": 2},
            "segnet": {"filters": 4, "depth": 2},
        },
        "optimizer": {"learning_rate": 0.01},
        "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "deterministic": True},
        "evaluation": {"batch_size": 4},
        "runtime": {"log_every_steps": 1},
    }
    return _updated(data, sections)


def crash_experiment(root: Path, cache: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The experiment the reliability suite kills, stops and resumes: :func:`experiment` with
    SegNet (BatchNorm statistics and argmax unpooling in every checkpoint), 3 epochs of 5 steps
    of batch 1, a checkpoint every step with the latest 2 kept, validation on one held-out case
    each epoch, no montages, and the data workers and TensorBoard cadence at their defaults (as
    RELIABILITY.md's times were measured). ``sections`` as there.
    """
    train = {"epochs": 3, "steps_per_epoch": 5, "batch_size": 1, "val_every": 1}
    data = experiment(
        root,
        cache,
        model={"name": "segnet"},
        train={**train, "val_max_cases": 1},
        checkpoint={"every_steps": 1, "keep": 2},
        evaluation={"montage": False},
    )
    del data["data"]["num_workers"], data["runtime"]
    return _updated(data, sections)


def _updated(data: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_config(root: Path, tmp_path: Path, *overrides: str, **sections: Any) -> ExperimentConfig:
    """:func:`experiment` plus ``key.path=value`` overrides, validated; cache in ``tmp_path``."""
    return build_config(experiment(root, tmp_path / "cache", **sections), list(overrides))


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: segnet and the ``reliability`` package importable,
    TensorFlow's native log quiet unless the caller's environment says otherwise; ``extra``
    added."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def run_python(code: str, timeout: float = 300) -> str:
    """Runs ``python -c CODE`` in a fresh interpreter (e.g. with its own TensorFlow device
    setup); asserts it succeeded and returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def printed_values(stdout: str) -> dict[str, str]:
    """The ``name value`` lines a child printed, as a mapping."""
    return dict(line.split() for line in stdout.splitlines() if line.count(" ") == 1)


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
    return "\n".join(read_text(path).splitlines()[-lines:])


def read_text(path: Path, offset: int = 0) -> str:
    """The file's text from byte ``offset`` on ("" while it does not exist)."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# What a training run did, from its events.jsonl
# ---------------------------------------------------------------------------------------------
def events_size(run_dir: Path) -> int:
    """The size of the run's ``events.jsonl`` now: the offset of the next child's events."""
    path = RunLayout(run_dir).events
    return path.stat().st_size if path.exists() else 0


def run_events(run_dir: Path, offset: int = 0, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's events from byte ``offset`` on, only those named ``kind`` if given."""
    events = read_events(RunLayout(run_dir).events, offset)
    return [e for e in events if kind is None or e["event"] == kind]


def saved_steps(run_dir: Path, offset: int = 0) -> list[int]:
    """Steps whose latest checkpoint the trainer reported saved (written and read back)."""
    return [e["step"] for e in run_events(run_dir, offset, "checkpoint_saved")]


def restored_step(run_dir: Path, offset: int = 0) -> int | None:
    """The step a run started from: its restored checkpoint's, 0 when it restored none, or None
    when it never got that far (it was killed earlier)."""
    for event in run_events(run_dir, offset):
        if event["event"] in ("restored", "started"):
            return event["step"]
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_tensors(
    prefix: str, object_graph: bool = True, ignore: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint ``prefix`` except the save counter (it counts calls to
    save, which a resumed run repeats; the step, weights and optimizer slots must not differ).

    Args:
        prefix: e.g. ``RUN/checkpoints/ckpt-15``.
        object_graph: include the serialised object graph. It names each variable by its Keras
            name, which one process numbers on: equal only between runs of separate processes.
        ignore: leave out the tensors whose names start with one of these.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    skip = ("save_counter", *ignore)
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith(skip)]
    if not object_graph:
        names = [n for n in names if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    return {name: reader.get_tensor(name) for name in names}


def newest_checkpoint(run_dir: Path) -> str:
    """The newest complete checkpoint of a run, as TensorFlow's state file names it."""
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(str(RunLayout(run_dir).checkpoints))
    assert prefix, f"no checkpoint in {run_dir}"
    return prefix


def assert_same_checkpoints(
    actual: str, expected: str, object_graph: bool = True, ignore: tuple[str, ...] = ()
) -> None:
    """Two checkpoints' tensors bit for bit (see :func:`checkpoint_tensors`)."""
    assert_same_tensors(
        checkpoint_tensors(actual, object_graph, ignore),
        checkpoint_tensors(expected, object_graph, ignore),
    )


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Every tensor bit for bit (model, optimizer, counters, best score)."""
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


def without_relu(keras_layer: Any) -> Any:
    """A Keras normalisation layer class as a factory taking segnet's ``relu`` argument, which
    must be False: how segnet built its layers before the ReLU was fused into them."""

    def make(*args: Any, relu: bool = False, **kwargs: Any) -> Any:
        assert relu is False
        return keras_layer(*args, **kwargs)

    return make
