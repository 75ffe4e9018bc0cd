"""A trained model back from its run directory: config, fingerprint and checkpoint weights.

A checkpoint is named on the command line by ``--checkpoint``:

* ``best``: the best checkpoint by validation Dice, ``checkpoints/best/ckpt-<step>``;
* ``latest``: the newest of ``checkpoints/ckpt-<step>``;
* ``all`` (evaluation only): every kept checkpoint, oldest first, then ``best``;
* a path: a checkpoint prefix (``runs/x/checkpoints/ckpt-120``, or its ``.index`` file), a
  folder of checkpoints (its newest), or an exported ``.keras`` model. Relative paths are tried
  from the current directory, then from the run directory.

Weights are restored into a model built from the run's stored ``config.yaml`` under the
process's Keras dtype policy (float32 unless the caller set another): the stored variables are
float32 whatever ``runtime.precision`` trained them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from segnet.checkpoint_files import (
    checkpoint_candidates,
    first_line,
    model_objects,
    verify_checkpoint,
)
from segnet.config import ExperimentConfig, build_config, config_to_dict
from segnet.data.preprocessing import DatasetFingerprint
from segnet.errors import ConfigError, RunDirError, UserError
from segnet.models.registry import build_model
from segnet.run_dir import CONFIG_NAME, RunLayout, stored_config

log = logging.getLogger("segnet")
# What may change between training and inference: how the sliding window runs and where the
# held-out data lives. Everything else shaped the weights or their preprocessing.
OVERRIDABLE = (
    "evaluation.",
    "data.root",
    "data.split.",
    "data.cache_dir",
    "data.skip_bad_cases",
)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to load.

    Attributes:
        name: what results are filed under (``best``, ``latest``, ``ckpt-120``, ``model``).
        path: a tf.train checkpoint prefix, or a ``.keras`` file.
    """

    name: str
    path: str

    @property
    def is_keras_file(self) -> bool:
        return self.path.endswith(".keras")


def train_command(run_dir: Path) -> str:
    return f"python scripts/train.py --config CONFIG.yaml --run-dir {run_dir}"


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment stored in ``run_dir``, with evaluation-time ``key=value`` overrides.

    Overrides pass through the same strict checks as training's; only keys under
    ``OVERRIDABLE`` are accepted, since the rest describe what the weights were trained on.

    Raises:
        RunDirError: the directory is missing or is not a run directory.
        ConfigError: an override is malformed, unknown, invalid or not allowed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"--run {run_dir}: run directory not found; check the path, or train one first "
            f"with: {train_command(run_dir)}"
        )
    config = stored_config(run_dir, flag="--run")
    if config is None:
        raise RunDirError(
            f"--run {run_dir}: not a segnet run directory (no {CONFIG_NAME}); point --run at "
            "the folder train.py wrote (runs/<name> by default)"
        )
    if not overrides:
        return config
    refused = [text for text in overrides if not text.strip().startswith(OVERRIDABLE)]
    if refused:
        keys = ", ".join(text.partition("=")[0] for text in refused)
        raise ConfigError(
            [
                f"--set {keys}: cannot change after training (the model was trained with the "
                f"stored value); allowed: {', '.join(k + '*' if k.endswith('.') else k for k in OVERRIDABLE)}"
            ]
        )
    return build_config(config_to_dict(config), list(overrides), source="--set")


def load_fingerprint(run_dir: Path, config: ExperimentConfig) -> DatasetFingerprint | None:
    """The training set's fingerprint stored with the run; None if absent and not needed.

    Raises:
        RunDirError: it is needed (resampling to the median spacing, CT normalisation) but
            missing or unreadable.
    """
    path = RunLayout(Path(run_dir)).fingerprint
    pre = config.preprocessing
    needed = pre.uses_ct or (pre.resample and pre.target_spacing is None)
    try:
        return DatasetFingerprint.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        if needed:
            raise RunDirError(
                f"{path}: not found, and preprocessing needs it (the training set's median "
                "spacing / intensity statistics); train the run again to write it"
            ) from None
        return None
    except (OSError, ValueError, UserError) as exc:
        raise RunDirError(
            f"{path}: unreadable fingerprint ({exc}); train again to rewrite it"
        ) from None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def resolve_checkpoints(run_dir: Path, spec: str, allow_all: bool = False) -> list[CheckpointRef]:
    """The checkpoints ``spec`` names (see the module docstring), checked to exist.

    Raises:
        RunDirError: nothing matches; the message says what exists and how to get one.
    """
    run_dir = Path(run_dir)
    directory = RunLayout(run_dir).checkpoints
    if spec == "all":
        if not allow_all:
            raise RunDirError("--checkpoint all is for evaluation; pick best, latest or a path")
        return _all_checkpoints(run_dir)
    if spec == "best":
        return [CheckpointRef("best", _best(run_dir))]
    if spec == "latest":
        return [CheckpointRef("latest", _newest(directory, run_dir))]
    return [_from_path(run_dir, spec)]


def _no_checkpoint(run_dir: Path) -> RunDirError:
    return RunDirError(
        f"no checkpoint in {RunLayout(run_dir).checkpoints}: train first with: "
        f"{train_command(run_dir)}"
    )


def _newest(directory: Path, run_dir: Path) -> str:
    candidates = checkpoint_candidates(directory) if directory.is_dir() else []
    if not candidates:
        raise _no_checkpoint(run_dir)
    return candidates[0]


def _best(run_dir: Path) -> str:
    best_dir = RunLayout(run_dir).best_checkpoints
    candidates = checkpoint_candidates(best_dir) if best_dir.is_dir() else []
    if candidates:
        return candidates[0]
    _newest(RunLayout(run_dir).checkpoints, run_dir)  # no checkpoint at all: say so instead
    raise RunDirError(
        f"no best checkpoint in {best_dir} (kept only when validation runs: train.val_every > 0 "
        "and checkpoint.keep_best: true); use --checkpoint latest"
    )


def _all_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    directory = RunLayout(run_dir).checkpoints
    latest = list(reversed(checkpoint_candidates(directory))) if directory.is_dir() else []
    refs = [CheckpointRef(Path(p).name, p) for p in latest]
    best_dir = RunLayout(run_dir).best_checkpoints
    best = checkpoint_candidates(best_dir) if best_dir.is_dir() else []
    if best:
        refs.append(CheckpointRef("best", best[0]))
    if not refs:
        raise _no_checkpoint(run_dir)
    return refs


def _from_path(run_dir: Path, spec: str) -> CheckpointRef:
    for base in (Path.cwd(), run_dir):
        path = base / Path(spec).expanduser()
        if path.suffix == ".keras" and path.is_file():
            return CheckpointRef(path.stem, str(path))
        prefix = path.with_suffix("") if path.suffix == ".index" else path
        if Path(f"{prefix}.index").is_file():
            return CheckpointRef(prefix.name, str(prefix))
        if path.is_dir() and checkpoint_candidates(path):
            newest = checkpoint_candidates(path)[0]
            return CheckpointRef(Path(newest).name, newest)
    raise RunDirError(
        f"--checkpoint {spec}: no checkpoint there; pass best, latest, a checkpoint prefix such "
        f"as {RunLayout(run_dir).checkpoints / 'ckpt-100'} (the part before .index), a folder of "
        "checkpoints, or an exported .keras file"
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def load_model(config: ExperimentConfig, ref: CheckpointRef) -> keras.Model:
    """The model of ``config`` with the weights of ``ref``.

    Raises:
        RunDirError: the checkpoint cannot be read or does not fit the model in the config.
    """
    if ref.is_keras_file:
        return _load_keras_file(config, ref.path)
    damage = verify_checkpoint(ref.path)  # a truncated data file would fail deep in restore
    if damage is not None:
        raise RunDirError(
            f"{ref.path}: the checkpoint is damaged ({damage}); pass another one with "
            "--checkpoint (latest, best, or a path under checkpoints/), or resume training to "
            "write a new one"
        )
    model = build_model(config)
    checkpoint = tf.train.Checkpoint(**model_objects(model))
    try:
        checkpoint.restore(ref.path).expect_partial().assert_existing_objects_matched()
    except tf.errors.OpError as exc:
        raise RunDirError(f"{ref.path}: cannot read the checkpoint ({first_line(exc)})") from None
    except (AssertionError, ValueError) as exc:  # ValueError: a variable of another shape
        raise RunDirError(
            f"{ref.path}: the checkpoint does not fit the model in the run's {CONFIG_NAME} "
            f"({first_line(exc)}); was the config edited after training?"
        ) from None
    log.info("loaded %s", ref.path)
    return model


def _load_keras_file(config: ExperimentConfig, path: str) -> keras.Model:
    import segnet.models  # noqa: F401  (registers segnet's layers for deserialisation)

    try:
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as exc:
        raise RunDirError(f"{path}: cannot load the Keras model ({first_line(exc)})") from None
    classes = model.outputs[0].shape[-1]
    if classes != config.data.num_classes:
        raise RunDirError(
            f"{path}: the model predicts {classes} classes but the run's config has "
            f"data.num_classes {config.data.num_classes}; is it from another run?"
        )
    return model
