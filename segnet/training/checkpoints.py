"""Checkpoints that resume exactly and survive a crash in the middle of a save.

A checkpoint holds everything the next step depends on: the model (weights, normalisation
statistics and the dropout seed generators' states), the optimizer (slots, iteration count and
the float16 loss scale), the weight averages when ``train.ema_decay`` is on, the step, the
number of finished epochs, and the best validation score so far. The data pipeline is a pure
function of ``train.seed`` and the step, so the step is its position. No other random state
needs saving: the global seeds are set from ``train.seed`` at every start, and during training
randomness comes only from those two sources.

Layout, in ``<run_dir>/checkpoints``::

    checkpoint                 the state file: the kept checkpoints, newest last
    ckpt-<step>.index/.data-*  the latest ``checkpoint.keep`` checkpoints
    best/ckpt-<step>.*         the best by mean foreground validation Dice

Crash safety: ``tf.train.CheckpointManager`` writes a checkpoint's data files first and then
replaces the state file atomically, so a crash mid-save leaves the state file naming only
complete checkpoints. Each save is read back (every tensor, which checks its CRC). On resume
the newest checkpoint that reads back intact is restored; an unreadable one is reported in one
line and the previous one is used.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from segnet.checkpoint_files import (
    average_objects,
    checkpoint_candidates,
    first_line,
    model_objects,
    verify_checkpoint,
)
from segnet.errors import RunDirError
from segnet.run_dir import BEST_DIR, explain_os_error
from segnet.training.ema import WeightAverage

log = logging.getLogger("segnet")
NO_SCORE = -1.0  # best_score before any validation
# Where a LossScaleOptimizer (mixed_float16) keeps the wrapped optimizer's state.
LOSS_SCALE_PREFIX = "optimizer/inner_optimizer/"


@dataclass
class TrainState:
    """The loop's counters, as variables so that they live in the checkpoint.

    Attributes:
        step: optimizer steps done; also the data pipeline's position.
        epochs_done: epochs whose end-of-epoch work (validation, save) is finished.
        best_score: the best mean foreground validation Dice so far (``NO_SCORE``: none yet).
    """

    step: tf.Variable
    epochs_done: tf.Variable
    best_score: tf.Variable

    @classmethod
    def create(cls) -> TrainState:
        # Plain (non-distributed) variables: created outside the strategy scope on purpose, so
        # every worker holds the same host-side counters.
        return cls(
            step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
            epochs_done=tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done"),
            best_score=tf.Variable(NO_SCORE, dtype=tf.float64, trainable=False, name="best"),
        )


def build_checkpoint(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    state: TrainState,
    average: WeightAverage | None = None,
) -> tf.train.Checkpoint:
    """The object graph that is saved. The optimizer must be built (its slots exist).

    Without ``average`` (``train.ema_decay`` off) it holds exactly what it held before weight
    averaging existed, so older runs resume.
    """
    averages = average_objects(average.averages) if average is not None else {}
    return tf.train.Checkpoint(
        **model_objects(model),
        **averages,
        optimizer=optimizer,
        step=state.step,
        epochs_done=state.epochs_done,
        best_score=state.best_score,
    )


class Checkpoints:
    """Saving, verifying and restoring the latest and the best checkpoints.

    Args:
        checkpoint: from :func:`build_checkpoint`.
        read_dir: the run's checkpoint directory, where resuming looks.
        write_dir: where this worker saves: ``read_dir`` on the chief, a temporary directory
            on the other workers of a multi-worker run.
        keep: the number of latest checkpoints kept.
    """

    def __init__(
        self, checkpoint: tf.train.Checkpoint, read_dir: Path, write_dir: Path, keep: int
    ) -> None:
        self.checkpoint = checkpoint
        self.read_dir = read_dir
        self.write_dir = write_dir
        self.latest = _manager(checkpoint, write_dir, keep)
        self.best = _manager(checkpoint, write_dir / BEST_DIR, 1)

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint of ``read_dir``; None when there is none.

        Raises:
            RunDirError: checkpoints exist but none of them can be read.
        """
        candidates = checkpoint_candidates(self.read_dir)
        for index, path in enumerate(candidates):
            problem = verify_checkpoint(path)
            if problem is None:
                self._restore(path)
                return path
            fallback = candidates[index + 1] if index + 1 < len(candidates) else None
            then = f"falling back to {Path(fallback).name}" if fallback else "none left"
            log.warning("checkpoint %s is unreadable (%s); %s", Path(path).name, problem, then)
        if candidates:
            raise RunDirError(
                f"{self.read_dir}: no checkpoint can be read; move the directory away to "
                "start training from scratch"
            )
        return None

    def _restore(self, path: str) -> None:
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as exc:
            # InvalidArgumentError: a variable of another dtype sits at the same place in the
            # object graph, e.g. a loss-scaled optimizer's step counter where momentum was.
            raise RunDirError(
                f"{path} does not fit this model ({first_line(exc)}); the model config "
                "changed since it was saved: use another --run-dir"
            ) from None

    def save(self, step: int) -> str:
        """Saves and verifies a checkpoint of the current state as ``ckpt-<step>``."""
        return _save(self.latest, step)

    def save_best(self, step: int) -> str:
        """Replaces the best checkpoint with the current state."""
        return _save(self.best, step)


def _manager(
    checkpoint: tf.train.Checkpoint, directory: Path, keep: int
) -> tf.train.CheckpointManager:
    # An unparsable state file is ignored by TensorFlow (with a warning) and rewritten by the
    # next save; checkpoint_candidates then finds the checkpoints from their files.
    return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=keep)


def _save(manager: tf.train.CheckpointManager, step: int) -> str:
    directory = Path(manager.directory)
    try:
        path = manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as exc:
        _remove_partial(directory, step)
        raise _save_error(exc, directory) from None
    problem = verify_checkpoint(path)
    if problem is not None:
        raise RunDirError(
            f"{path}: the checkpoint just written does not read back ({problem}); check the "
            "disk, or choose another --run-dir"
        )
    return path


def _save_error(exc: OSError | tf.errors.OpError, directory: Path) -> Exception:
    text = str(exc)
    if isinstance(exc, OSError):
        return explain_os_error(exc, directory)
    if "No space left" in text or "ENOSPC" in text:
        return explain_os_error(OSError(errno.ENOSPC, "No space left on device"), directory)
    if "Permission denied" in text or "Read-only file system" in text:
        return explain_os_error(OSError(errno.EACCES, first_line(exc)), directory)
    return exc


def _remove_partial(directory: Path, step: int) -> None:
    """Deletes what a failed save of ``ckpt-<step>`` left, giving the user the space back.

    TensorFlow writes shards into ``ckpt-<step>_temp/`` and then merges them into
    ``ckpt-<step>.index`` and ``.data-*``; a full disk can stop it at either stage. The merged
    files go only when they do not read back, so an intact earlier save of the same step stays.
    """
    for leftover in directory.glob(f"ckpt-{step}_temp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if verify_checkpoint(str(directory / f"ckpt-{step}")) is not None:
        for part in directory.glob(f"ckpt-{step}.*"):  # .index and .data-*-of-*
            part.unlink(missing_ok=True)


def checkpoint_has_loss_scale(directory: Path) -> bool | None:
    """Whether the newest listable checkpoint of ``directory`` holds a float16 loss scale.

    A run trained in ``mixed_float16`` saves a ``LossScaleOptimizer``: its momentum and step
    counter sit under ``optimizer/inner_optimizer`` beside the dynamic scale, where a float32 or
    bfloat16 run keeps them under ``optimizer`` itself. The two cannot restore into each
    other, so the precision a run resumes in must keep to its checkpoint's side.

    Returns:
        None when ``directory`` holds no checkpoint whose index can be read.
    """
    for path in checkpoint_candidates(directory):
        try:
            names = [name for name, _ in tf.train.list_variables(path)]
        except (tf.errors.OpError, ValueError):
            continue  # restoring reports and skips unreadable checkpoints
        return any(name.startswith(LOSS_SCALE_PREFIX) for name in names)
    return None
