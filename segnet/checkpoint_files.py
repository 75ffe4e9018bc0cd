"""What a checkpoint file holds and how to find and check one, for training and inference alike.

The trainer saves and restores whole checkpoints (``segnet.training.checkpoints``); inference
restores only the model from them (``segnet.inference.loading``). Both must spell the model's
place in the checkpoint's object graph the same way: :func:`model_objects` is that spelling,
so neither side can rename it without the other following. The same goes for the averaged
weights of a run with ``train.ema_decay``: training saves them with :func:`average_objects`,
and inference restores them into the model by the same name (``model_objects(averaged=True)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

AVERAGE = "ema"  # the averaged trainable weights, in the order of model.trainable_variables


def model_objects(model: keras.Model, *, averaged: bool = False) -> dict[str, Any]:
    """The model's entries of a ``tf.train.Checkpoint``.

    Keras 3 layers do not expose their SeedGenerator states to tf.train tracking, so the
    model's non-trainable variables (seed states, BatchNorm moving statistics) are listed
    explicitly next to the model; variables reachable twice are stored once. A model built from
    the same config lists them in the same order.

    Args:
        model: the model.
        averaged: name the model's trainable variables as the weight averages that
            :func:`average_objects` saved, so that restoring puts the averages into the model
            (inference of a run with ``train.ema_decay``); the live weights stay unread.
    """
    state = {"model_state": list(model.non_trainable_variables)}
    if averaged:
        return {**average_objects(model.trainable_variables), **state}
    return {"model": model, **state}


def average_objects(variables: Sequence[Any]) -> dict[str, Any]:
    """The checkpoint entry of the weight averages, one per trainable variable, in order."""
    return {AVERAGE: list(variables)}


def checkpoint_candidates(directory: Path) -> list[str]:
    """Checkpoint prefixes of ``directory``, newest first.

    The state file's list is used when it is readable; otherwise the ``ckpt-<n>.index`` files,
    by step.
    """
    try:
        state = tf.train.get_checkpoint_state(str(directory))
    except (tf.errors.OpError, ValueError):
        state = None
    if state is not None and state.all_model_checkpoint_paths:
        return list(reversed(state.all_model_checkpoint_paths))
    numbered = []
    for index_file in directory.glob("ckpt-*.index"):
        match = re.fullmatch(r"ckpt-(\d+)\.index", index_file.name)
        if match:
            numbered.append((int(match.group(1)), str(directory / f"ckpt-{match.group(1)}")))
    return [path for _, path in sorted(numbered, reverse=True)]


def verify_checkpoint(path: str) -> str | None:
    """Reads every tensor of a checkpoint (which checks its CRC32C); None when all are intact.

    Returns:
        One line naming the problem, or None.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as exc:
        # Any failure means damage, whatever its type: a truncated data file surfaces as
        # IndexError, bad bytes as DataLossError, a missing file as NotFoundError.
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def first_line(exc: BaseException) -> str:
    # TensorFlow op errors start with the "{{function_node ...}}" that raised them: noise here.
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", str(exc).strip())
    lines = text.splitlines()
    return lines[0][:200] if lines else type(exc).__name__
