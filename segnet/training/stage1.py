"""Stage-wise cascade training: stage 1 of a ``train_stage: low`` run starts a later run.

nnU-Net trains its cascade stage by stage: the low-resolution network first, then the
full-resolution one guided by the frozen first. ``model.unet3d_cascade.stage1_from`` names the
first run's directory; when a run starts from scratch its stage 1 takes that run's latest
weights (a resumed run already has them in its own checkpoint). Whatever stage 1 saw in
training must be what it sees here, so the two runs must agree on everything that shapes its
input and output: the low stage's architecture, the downsampling, the channels, the classes
and the preprocessing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from segnet.config import ExperimentConfig, config_to_dict
from segnet.errors import UserError
from segnet.inference import loading
from segnet.run_dir import CONFIG_NAME, RunLayout, stored_config

log = logging.getLogger(__name__)
KEY = "model.unet3d_cascade.stage1_from"
STAGE1 = "stage1"  # the nested U-Net's layer name in UNet3DCascade


def load_stage1_weights(model: keras.Model, config: ExperimentConfig) -> str | None:
    """Copies stage 1's weights from the run ``stage1_from`` names into ``model``.

    Args:
        model: a ``UNet3DCascade`` built from ``config`` (under the distribution scope).
        config: the experiment being trained.

    Returns:
        The checkpoint the weights came from; None when the config names no run.

    Raises:
        UserError: the run is missing, has no checkpoint, or was trained on something the
            current stage 1 cannot take over; the message names the key and the mismatch.
    """
    if config.model.name != "unet3d_cascade":
        return None
    source = config.model.unet3d_cascade.stage1_from
    if source is None:
        return None
    run_dir = Path(source).expanduser()
    low_config = _low_run_config(run_dir)
    _check_compatible(low_config, config, run_dir)
    try:
        (ref,) = loading.resolve_checkpoints(run_dir, "latest")
        low_model = loading.load_model(low_config, ref)
    except UserError as exc:
        raise UserError(f"{KEY}: {exc}") from None
    model.get_layer(STAGE1).set_weights(low_model.get_layer(STAGE1).get_weights())
    return ref.path


def _low_run_config(run_dir: Path) -> ExperimentConfig:
    if not run_dir.is_dir():
        raise UserError(
            f"{KEY}: {run_dir} is not a directory; point it at the run directory of a "
            "train_stage 'low' run (runs/<name> by default)"
        )
    try:
        low_config = stored_config(run_dir, flag="model.unet3d_cascade.stage1_from")
    except UserError as exc:
        raise UserError(f"{KEY}: {exc}") from None
    if low_config is None:
        raise UserError(
            f"{KEY}: {run_dir} is not a segnet run directory (no {CONFIG_NAME}); point it at "
            "the folder train.py wrote for the train_stage 'low' run"
        )
    return low_config


def _check_compatible(low: ExperimentConfig, config: ExperimentConfig, run_dir: Path) -> None:
    where = f"{KEY}: {RunLayout(run_dir).config}"
    if low.model.name != "unet3d_cascade" or low.model.unet3d_cascade.train_stage != "low":
        stage = low.model.unet3d_cascade.train_stage if low.model.name == "unet3d_cascade" else ""
        trained = f"{low.model.name} {stage}".strip()
        raise UserError(
            f"{where} trained a {trained} model; stage 1 comes from a unet3d_cascade run with "
            "train_stage 'low'"
        )
    ours, theirs = config_to_dict(config), config_to_dict(low)
    differences = [
        f"{path} is {_get(theirs, path)!r} there but {_get(ours, path)!r} here"
        for path in (
            "model.unet3d_cascade.low",
            "model.unet3d_cascade.downsample",
            "data.num_channels",
            "data.num_classes",
            "preprocessing",
        )
        if _get(theirs, path) != _get(ours, path)
    ]
    if differences:
        raise UserError(
            f"{where} does not match this run: {'; '.join(differences)}; make these settings "
            "equal, or train a new stage 1"
        )


def _get(tree: dict, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree[part]
    return tree
