"""A trained model back from its run directory: config, fingerprint and checkpoint weights.

A checkpoint is named on the command line by ``--checkpoint``:

* ``best``: the best checkpoint by validation Dice, ``checkpoints/best/ckpt-<step>``;
* ``latest``: the newest of ``checkpoints/ckpt-<step>``;
* ``all`` (evaluation only): every kept checkpoint, oldest first, then ``best``;
* a path: a checkpoint prefix (``runs/x/checkpoints/ckpt-120``, or its ``.index`` file), a
  folder of checkpoints (its newest), or an exported ``.keras`` model. Relative paths are tried
  from the current directory, then from the run directory.

Several runs (``--run A B``, or a folder holding run directories) form an ensemble:
:func:`load_runs` loads them and refuses runs that disagree on what shapes the model's input
and output (:func:`check_ensemble`).

Weights are restored into a model built from the run's stored ``config.yaml`` in the Keras
dtype policy asked for (``evaluation.precision`` resolved by the caller; float32 by default):
the stored variables are float32 whatever ``runtime.precision`` trained them, so any run
predicts in either precision. A run trained with ``train.ema_decay``
gives its averaged weights, the ones its validation scored and its export holds.
"""

from __future__ import annotations

import json
import logging
import os
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
from segnet.precision import precision_policy
from segnet.run_dir import (
    CONFIG_NAME,
    FINGERPRINT_NAME,
    CrossValidationLayout,
    RunLayout,
    stored_config,
)

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


@dataclass(frozen=True)
class Run:
    """A trained run, ready to load checkpoints from.

    Attributes:
        directory: the run directory.
        config: its stored experiment, with the evaluation-time overrides applied.
        fingerprint: its training set's fingerprint (None when absent and not needed).
    """

    directory: Path
    config: ExperimentConfig
    fingerprint: DatasetFingerprint | None


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
            f"--run {run_dir}: not a segnet run directory (no {CONFIG_NAME}) nor a folder of "
            "them; point --run at the folder train.py wrote (runs/<name> by default)"
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
# Several runs: an ensemble
# ---------------------------------------------------------------------------------------------
def load_runs(paths: Path | Sequence[Path], overrides: Sequence[str] = ()) -> list[Run]:
    """The runs ``--run`` names (see :func:`expand_runs`), each with ``overrides`` applied.

    Args:
        paths: one run directory, or several (an ensemble, or folders of runs).
        overrides: ``key=value`` changes allowed after training, applied to every run.

    Raises:
        RunDirError: a path is not a run, a run is named twice, or the runs disagree.
        ConfigError: an override is malformed or not allowed.
    """
    runs = []
    for path in expand_runs([paths] if isinstance(paths, str | os.PathLike) else paths):
        config = load_run_config(path, overrides)
        runs.append(Run(path, config, load_fingerprint(path, config)))
    check_ensemble(runs)
    return runs


def chosen_postprocessing(paths: Path | Sequence[Path]) -> tuple[tuple[int, ...], Path] | None:
    """The classes whose largest component alone is kept, as a cross-validation chose them on
    its out-of-fold predictions, when ``--run`` names that cross-validation's parent folder.

    Returns:
        ``(classes, postprocessing.json)``, or None when no parent with a choice is named.

    Raises:
        RunDirError: the file cannot be read, or two parents chose differently.
    """
    found = {}
    for path in [paths] if isinstance(paths, str | os.PathLike) else paths:
        record = CrossValidationLayout(Path(path)).postprocessing
        if _is_run(Path(path)) or not record.is_file():
            continue
        try:
            classes = tuple(int(c) for c in json.loads(record.read_text("utf-8"))[_LARGEST])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(
                f"{record}: unreadable ({exc!r}); run the cross-validation command again to "
                "rewrite it"
            ) from None
        found[record] = classes
    if len(set(found.values())) > 1:
        raise RunDirError(
            f"--run: the cross-validations chose different post-processing ({found}); ensemble "
            "the runs of one cross-validation, or name the runs themselves"
        )
    return next(((classes, record) for record, classes in found.items()), None)


_LARGEST = "keep_largest_component"


def expand_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories, in the order given; a folder that is not a run itself but holds runs
    (each with a ``.segnet-run`` marker or a ``config.yaml``, as the folds of a
    cross-validation) stands for every run directly inside it, in name order.

    Paths that are neither are kept, so :func:`load_run_config` says what is wrong with them.

    Raises:
        RunDirError: the same run is named twice (an ensemble counts each run once).
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        runs += ([] if _is_run(path) else _runs_inside(path)) or [path]
    seen: dict[Path, Path] = {}
    for run in runs:
        earlier = seen.setdefault(run.resolve(), run)
        if earlier is not run:
            raise RunDirError(
                f"--run {run}: the same run as {earlier}, given twice; name each run once"
            )
    return runs


def _is_run(path: Path) -> bool:
    layout = RunLayout(path)
    return layout.marker.is_file() or layout.config.is_file()


def _runs_inside(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
    except OSError:  # not a folder, or unreadable: load_run_config names the problem
        return []


def check_ensemble(runs: Sequence[Run]) -> None:
    """Refuses runs whose models would not take the same input or give the same output.

    The ensemble preprocesses each scan once, with the first run's settings, and averages the
    models' softmaxes voxel by voxel: so channels, classes, the model's spatial dims, the
    ``preprocessing`` section and what preprocessing reads from ``fingerprint.json`` must agree.

    Raises:
        RunDirError: naming every key that differs, with its value in the first run and in
            the first run that differs.
    """
    first = _ensemble_keys(runs[0])
    problems: dict[str, str] = {}  # one line per key, naming the first run that differs
    for run in runs[1:]:
        keys = _ensemble_keys(run)
        for key, value in first.items():
            if keys.get(key) != value and key not in problems:
                problems[key] = (
                    f"{key} is {value!r} in {runs[0].directory} but {keys.get(key)!r} in "
                    f"{run.directory}"
                )
    if problems:
        raise RunDirError(
            f"--run: these runs cannot form an ensemble, which needs the same input and output "
            f"for every model: {'; '.join(problems.values())}; ensemble runs trained on the "
            "same kind of data with the same preprocessing"
        )


def _ensemble_keys(run: Run) -> dict[str, object]:
    """What shapes a run's model input and output, by the name the user knows it under."""
    config = run.config
    pre = config.preprocessing
    keys: dict[str, object] = {
        "data.num_channels": config.data.num_channels,
        "data.num_classes": config.data.num_classes,
        "the model's spatial dims": config.spatial_dims,
    }
    keys |= {f"preprocessing.{k}": v for k, v in config_to_dict(config)["preprocessing"].items()}
    if run.fingerprint is not None:  # load_fingerprint insists on it where these matter
        if pre.resample and pre.target_spacing is None:
            keys[f"{FINGERPRINT_NAME} spacing"] = run.fingerprint.spacing
        if pre.normalization == "ct":
            keys[f"{FINGERPRINT_NAME} intensity"] = run.fingerprint.intensity
    return keys


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
def load_model(
    config: ExperimentConfig, ref: CheckpointRef, policy: str = "float32"
) -> keras.Model:
    """The model of ``config`` with the weights of ``ref``, computing in the dtype ``policy``.

    Raises:
        RunDirError: the checkpoint cannot be read or does not fit the model in the config.
    """
    if ref.is_keras_file:
        model = _load_keras_file(config, ref.path)
        return model if policy == "float32" else _rebuilt(config, model, policy, ref.path)
    damage = verify_checkpoint(ref.path)  # a truncated data file would fail deep in restore
    if damage is not None:
        raise RunDirError(
            f"{ref.path}: the checkpoint is damaged ({damage}); pass another one with "
            "--checkpoint (latest, best, or a path under checkpoints/), or resume training to "
            "write a new one"
        )
    with precision_policy(policy):
        model = build_model(config)
    averaged = config.train.averages_weights
    checkpoint = tf.train.Checkpoint(**model_objects(model, averaged=averaged))
    try:
        checkpoint.restore(ref.path).expect_partial().assert_existing_objects_matched()
    except tf.errors.OpError as exc:
        raise RunDirError(f"{ref.path}: cannot read the checkpoint ({first_line(exc)})") from None
    except (AssertionError, ValueError) as exc:  # ValueError: a variable of another shape
        raise RunDirError(
            f"{ref.path}: the checkpoint does not fit the model in the run's {CONFIG_NAME} "
            f"({first_line(exc)}); was the config edited after training?"
        ) from None
    log.info("loaded %s%s", ref.path, " (averaged weights, train.ema_decay)" if averaged else "")
    return model


# A .keras file keys each layer's weights by its class name: ``layers/batch_normalization_3``.
# segnet's batch norm became a class of its own (FusedBatchNormalization, 2026-11-30), so
# models exported before then name Keras's class and would no longer load; same layers, same
# order, so renaming the keys is exact.
RENAMED_LAYER_KEYS = {"batch_normalization": "fused_batch_normalization"}


def _load_with_renamed_layer_keys(path: str) -> keras.Model | None:
    """The model of an older ``.keras`` file, loaded from a copy with today's weight keys.

    None when the file holds none of the renamed keys, already has today's, is not a readable
    ``.keras`` archive, or does not load even so. The file itself is never changed.
    """
    import io
    import re
    import tempfile
    import zipfile

    import h5py

    try:
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        weights = io.BytesIO(members["model.weights.h5"])
        with h5py.File(weights, "r+") as h5:
            layers = h5.get("layers")
            keys = list(layers.keys()) if layers is not None else []
            renames = [
                (key, new + key[len(old) :])
                for key in keys
                for old, new in RENAMED_LAYER_KEYS.items()
                if re.fullmatch(rf"{old}(_\d+)?", key)
            ]
            if not renames or any(new in keys for _, new in renames):
                return None
            for key, new in renames:
                layers.move(key, new)
        members["model.weights.h5"] = weights.getvalue()
        with tempfile.TemporaryDirectory(prefix="segnet-keras-") as scratch:
            copy = Path(scratch) / Path(path).name
            with zipfile.ZipFile(copy, "w") as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
            model = keras.saving.load_model(copy, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile):
        return None
    log.info("loaded %s, exported before segnet's batch-norm layer had its own name", path)
    return model


def _rebuilt(config: ExperimentConfig, model: keras.Model, policy: str, path: str) -> keras.Model:
    """``model``'s weights in the config's model built under ``policy`` (an export is float32)."""
    with precision_policy(policy):
        rebuilt = build_model(config)
    try:
        rebuilt.set_weights(model.get_weights())
    except ValueError as exc:
        raise RunDirError(
            f"{path}: the Keras model does not match the run's {CONFIG_NAME} "
            f"({first_line(exc)}); predict with --set evaluation.precision=float32"
        ) from None
    return rebuilt


def _load_keras_file(config: ExperimentConfig, path: str) -> keras.Model:
    import segnet.models  # noqa: F401  (registers segnet's layers for deserialisation)

    try:
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as exc:
        model = _load_with_renamed_layer_keys(path)
        if model is None:
            raise RunDirError(f"{path}: cannot load the Keras model ({first_line(exc)})") from None
    classes = model.outputs[0].shape[-1]
    if classes != config.data.num_classes:
        raise RunDirError(
            f"{path}: the model predicts {classes} classes but the run's config has "
            f"data.num_classes {config.data.num_classes}; is it from another run?"
        )
    return model
