"""The run directory: a self-describing folder holding one experiment.

Layout::

    runs/NAME/
      config.yaml            the resolved experiment (defaults filled in)
      fingerprint.json       dataset statistics that inference must reuse
      checkpoints/           tf.train checkpoints (latest K) and checkpoints/best/
      logs/                  TensorBoard event files
      metrics.csv            one row per epoch
      train.log              the text log
      export/model.keras     the final Keras model
      export/saved_model/    the final TensorFlow SavedModel (loads without segnet)
      evaluation/<ckpt>/     metrics.json, per_case.csv, montages

Running again on the same directory resumes; a different config is refused unless forced,
so a resumed run can never silently change its experiment.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from segnet.config import (
    ExperimentConfig,
    build_config,
    config_to_dict,
    config_to_yaml,
    read_yaml,
)
from segnet.errors import ConfigError, RunDirError
from segnet.files import atomic_write_text

CONFIG_NAME = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
FINGERPRINT_NAME = "fingerprint.json"


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / config.name


def explain_os_error(exc: OSError, path: Path) -> RunDirError:
    """One sentence for the usual ways a run directory write fails."""
    if exc.errno == errno.ENOSPC:
        return RunDirError(
            f"{path}: no space left on the device; free some space or choose "
            "another --run-dir (existing checkpoints were kept)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunDirError(
            f"{path}: not writable ({exc.strerror}); fix the permissions or "
            "choose another --run-dir"
        )
    return RunDirError(f"{path}: {exc.strerror or exc}")


def stored_config(run_dir: Path, flag: str = "--run-dir") -> ExperimentConfig | None:
    """The config a run directory was created with, or None for a new directory.

    Args:
        run_dir: the run directory.
        flag: the command-line flag that named ``run_dir`` (``--run-dir`` for train, ``--run``
            for evaluate and predict), for the hint when the stored config is unusable.

    Raises:
        RunDirError: ``config.yaml`` exists but does not parse or validate; one line with the
            first problem and how to get going again.
    """
    path = run_dir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        return build_config(read_yaml(path), source=str(path))
    except ConfigError as exc:
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        earlier = sorted(run_dir.glob("config.before-*.yaml"))  # kept by a forced change
        kept = f" (its previous version is kept as {earlier[-1].name})" if earlier else ""
        raise RunDirError(
            f"{path} is not a readable segnet config: {exc.problems[0]}{more}; repair "
            f"it{kept} or point {flag} at another run directory"
        ) from None


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Dotted paths whose values differ, for the refusal message."""
    diffs: list[str] = []

    def walk(a: object, b: object, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")

    walk(config_to_dict(old), config_to_dict(new), "")
    return diffs


def check_run_dir(run_dir: Path, config: ExperimentConfig, force: bool = False) -> bool:
    """Checks, without writing anything, that ``run_dir`` can hold this experiment.

    Returns:
        True when the directory already holds this experiment (the run resumes).

    Raises:
        RunDirError: the directory is not writable, is a file, or holds a different config
            and ``force`` is False.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; choose another path")
    probe = run_dir if run_dir.exists() else _nearest_existing_parent(run_dir)
    if not probe.is_dir():  # a parent is a file: no permission change would help
        raise RunDirError(
            f"--run-dir {run_dir}: {probe} is a file, not a directory; choose another path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"{probe}: not writable; fix the permissions or choose another --run-dir")
    old = stored_config(run_dir)
    if old is None:
        return False
    diffs = config_differences(old, config)
    if diffs and not force:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise RunDirError(
            f"{run_dir / CONFIG_NAME} holds a different experiment ({shown}); "
            "use another --run-dir, or --force to continue this run with the "
            "new config"
        )
    return True


def _nearest_existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def initialise_run_dir(run_dir: Path, config: ExperimentConfig) -> None:
    """Creates the directory and stores the resolved config (keeping any older one)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / CONFIG_NAME
        text = config_to_yaml(config)
        if path.exists() and path.read_text(encoding="utf-8") != text:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            os.replace(path, run_dir / f"config.before-{stamp}.yaml")
        atomic_write_text(path, text)
    except OSError as exc:
        raise explain_os_error(exc, run_dir) from None
