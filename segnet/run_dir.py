"""The run directory: a self-describing folder holding one experiment.

:class:`RunLayout` names every path in it, for every module that reads or writes a run::

    runs/NAME/
      .segnet-run            the marker, written first
      config.yaml            the resolved experiment (defaults filled in)
      fingerprint.json       dataset statistics that inference must reuse
      split.json             which cases trained, validated (chose best), were held out, skipped
      checkpoints/           tf.train checkpoints (latest K) and checkpoints/best/
      logs/                  TensorBoard event files (with the tensorboard package installed)
      metrics.csv            one row per epoch
      progress.png           loss, learning rate, validation Dice, step rate, redrawn per epoch
      train.log              the text log
      events.jsonl           the run's milestones, one JSON object per line (training.events)
      export/model.keras     the final Keras model
      export/saved_model/    the final TensorFlow SavedModel (loads without segnet)
      evaluation/<ckpt>/     metrics.json, per_case.csv, predictions, montages

Running again on the same directory resumes; a different config is refused unless forced,
so a resumed run can never silently change its experiment.

Ownership: the first file segnet writes into a run directory is the marker ``.segnet-run``.
A folder that is not empty and has no marker belongs to somebody else and is refused (a run
made before the marker existed is recognised by its readable ``config.yaml`` and adopted). One
training process at a time holds a run directory (:func:`hold_run_dir`); the lock dies with
its process, so a SIGKILLed run never leaves its directory locked.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from segnet.config import (
    ExperimentConfig,
    build_config,
    config_to_dict,
    config_to_yaml,
    read_yaml,
)
from segnet.errors import ConfigError, RunDirError, shortened
from segnet.files import TEMPORARY_PREFIX, FolderLock, atomic_write_text, describe_write_error

CONFIG_NAME = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
FINGERPRINT_NAME = "fingerprint.json"
SPLIT_NAME = "split.json"  # the case ids that trained, validated, were held out or skipped
BEST_DIR = "best"  # checkpoints/best: the best checkpoint by validation Dice
MARKER_NAME = ".segnet-run"  # written first: what makes a folder recognisably a segnet run
# A marker that a kill interrupted mid-write (files.atomic_output's temporary name).
_PARTIAL_MARKER = re.compile(
    rf"{re.escape(TEMPORARY_PREFIX)}\d+-[0-9a-f]+-{re.escape(MARKER_NAME)}"
)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory: the only place that spells their names.

    Attributes:
        root: the run directory.
    """

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def fingerprint(self) -> Path:
        return self.root / FINGERPRINT_NAME

    @property
    def split(self) -> Path:
        return self.root / SPLIT_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def best_checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR / BEST_DIR

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def progress_png(self) -> Path:
        return self.root / "progress.png"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def exported_keras(self) -> Path:
        return self.root / "export" / "model.keras"

    @property
    def saved_model(self) -> Path:
        return self.root / "export" / "saved_model"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def config_backup(self, stamp: str) -> Path:
        """Where a forced change keeps the config it replaces."""
        return self.root / f"config.before-{stamp}.yaml"

    def config_backups(self) -> list[Path]:
        """The kept earlier configs, oldest first."""
        return sorted(self.root.glob("config.before-*.yaml"))


@dataclass(frozen=True)
class CrossValidationLayout:
    """The paths of a cross-validation's parent folder (``segnet.cross_validation``).

    Attributes:
        root: the parent folder; each fold is an ordinary run directory inside it.
    """

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / ".segnet-cross-validation"

    @property
    def summary(self) -> Path:
        return self.root / "cross_validation.json"

    @property
    def postprocessing(self) -> Path:
        """Which classes keep only their largest component, chosen on the out-of-fold Dice."""
        return self.root / "postprocessing.json"

    def fold(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / config.name


def explain_os_error(exc: OSError, path: Path) -> RunDirError:
    """A failed write into a run directory, in the project's one phrasing."""
    kept = " (existing checkpoints were kept)" if exc.errno == errno.ENOSPC else ""
    return RunDirError(describe_write_error(exc, path, "another --run-dir") + kept)


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
    layout = RunLayout(run_dir)
    path = layout.config
    if not path.exists():
        return None
    try:
        return build_config(read_yaml(path), source=str(path))
    except ConfigError as exc:
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        earlier = layout.config_backups()  # kept by a forced change
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

    Training longer is the same experiment: a config that only raises ``train.epochs`` resumes
    without ``--force`` (the learning-rate schedule is then laid over the new length, see
    ``segnet.training.optimizers``); shortening it is a different experiment.

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
    check_ownership(run_dir)
    old = stored_config(run_dir)
    if old is None:
        return False
    diffs = config_differences(old, config)
    if config.train.epochs > old.train.epochs:  # continuing a run for longer
        diffs = [d for d in diffs if not d.startswith("train.epochs:")]
    if diffs and not force:
        shown = shortened(diffs, 5, "; ")
        raise RunDirError(
            f"{RunLayout(run_dir).config} holds a different experiment ({shown}); "
            "use another --run-dir, or --force to continue this run with the "
            "new config"
        )
    return True


def check_ownership(run_dir: Path) -> None:
    """Refuses a folder that is not empty and not a segnet run, before anything is written.

    Raises:
        RunDirError: ``run_dir`` holds files but neither the marker nor a run's config.
    """
    layout = RunLayout(run_dir)
    if not run_dir.is_dir() or layout.marker.is_file():
        return
    if layout.config.is_file():
        return  # a run from before the marker: stored_config() checks that it is one
    foreign = sorted(p.name for p in run_dir.iterdir() if not _PARTIAL_MARKER.fullmatch(p.name))
    if foreign:
        shown = shortened(foreign, 3)
        raise RunDirError(
            f"--run-dir {run_dir}: not a segnet run directory (no {MARKER_NAME}) and not empty "
            f"({shown}); segnet never writes into a folder it did not create: choose a new "
            "or empty folder"
        )


def hold_run_dir(run_dir: Path) -> FolderLock:
    """The lock one training process holds on ``run_dir`` (use as ``with``); creates it.

    Raises:
        FolderBusyError: another process is training in it.
    """
    return FolderLock(
        run_dir,
        busy=f"--run-dir {run_dir}: another training process (pid {{pid}}) is using this run "
        "directory; wait for it to finish or stop it (it saves and resumes), or choose another "
        "--run-dir",
    )


def _nearest_existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def initialise_run_dir(run_dir: Path, config: ExperimentConfig) -> None:
    """Creates the directory, marks it as a run, and stores the resolved config (keeping any
    older one)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(run_dir)
        if not layout.marker.is_file():
            atomic_write_text(layout.marker, _marker_text())
        path = layout.config
        text = config_to_yaml(config)
        if path.exists() and path.read_text(encoding="utf-8") != text:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            os.replace(path, layout.config_backup(stamp))
        atomic_write_text(path, text)
    except OSError as exc:
        raise explain_os_error(exc, run_dir) from None


def _marker_text() -> str:
    from segnet import __version__

    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    note = "this folder is a segnet run directory: config, checkpoints, logs and results"
    return json.dumps({"segnet": __version__, "created": created, "note": note}, indent=1) + "\n"
