"""Helpers of the training tests: tiny experiment configs and running the CLI in a subprocess."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import yaml

from segnet.config import ExperimentConfig, build_config
from segnet.data.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[2]
# 5 cases of odd size 17x18x19, 3 classes; fold 0 of folds.json holds out one case.
SPEC = SyntheticSpec(num_cases=5, shape=(17, 18, 19), num_classes=3, num_folds=5)


def experiment(root: Path, cache: Path, **sections: Any) -> dict[str, Any]:
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
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_config(root: Path, tmp_path: Path, *overrides: str, **sections: Any) -> ExperimentConfig:
    """:func:`experiment` plus ``key.path=value`` overrides, validated; cache in ``tmp_path``."""
    return build_config(experiment(root, tmp_path / "cache", **sections), list(overrides))


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(args: list[str], timeout: float = 240, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python scripts/train.py ARGS`` in a subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        **kwargs,
    )


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: segnet importable, TF quiet, one thread pool."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def _tensors(checkpoint: str, ignore: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(checkpoint)
    skip = ("save_counter", *ignore)
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith(skip)]
    return {n: reader.get_tensor(n) for n in names if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_checkpoints(a: str, b: str, ignore: tuple[str, ...] = ()) -> None:
    """Every variable of two checkpoints bit for bit (model, optimizer, counters, best score,
    weight averages), but those whose names start with one of ``ignore``."""
    first, second = _tensors(a, ignore), _tensors(b, ignore)
    assert sorted(first) == sorted(second)
    different = [n for n in first if not np.array_equal(first[n], second[n])]
    assert not different, f"{len(different)} variables differ, e.g. {different[:3]}"
