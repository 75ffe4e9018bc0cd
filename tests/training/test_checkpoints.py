"""Tests for segnet.training.checkpoints: what a checkpoint holds, fallback, full disks."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import errno
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import gen_io_ops

from segnet.checkpoint_files import AVERAGE
from segnet.errors import RunDirError
from segnet.training.checkpoints import (
    Checkpoints,
    TrainState,
    build_checkpoint,
    checkpoint_candidates,
    checkpoint_has_loss_scale,
    verify_checkpoint,
)
from segnet.training.ema import WeightAverage


def _model(seed: int) -> keras.Model:
    """Conv, BatchNorm (moving statistics) and Dropout (a seed generator state)."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((5, 6, 7, 1))
    x = keras.layers.Conv3D(3, 3, padding="same")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(image, keras.layers.Conv3D(2, 1)(x))


def _objects(seed: int, loss_scale: bool = False):
    model = _model(seed)
    optimizer: keras.optimizers.Optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    state = TrainState.create()
    return model, optimizer, state


def _train_once(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    x = tf.random.stateless_normal((2, 5, 6, 7, 1), seed=(1, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x, training=True) ** 2)
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)


def _values(model, optimizer, state) -> list[np.ndarray]:
    return [np.asarray(v) for v in [*model.variables, *optimizer.variables]] + [
        np.asarray(v) for v in (state.step, state.epochs_done, state.best_score)
    ]


def _checkpoints(directory: Path, objects, keep: int = 3) -> Checkpoints:
    return Checkpoints(build_checkpoint(*objects), directory, directory, keep)


@pytest.mark.parametrize("loss_scale", [False, True])
def test_restore_brings_back_every_variable(tmp_path: Path, loss_scale: bool) -> None:
    saved = _objects(0, loss_scale)
    _train_once(*saved[:2])
    if loss_scale:
        saved[1].dynamic_scale.assign(1024.0)
    saved[2].step.assign(7)
    saved[2].epochs_done.assign(2)
    saved[2].best_score.assign(0.625)
    _checkpoints(tmp_path, saved).save(7)

    fresh = _objects(1, loss_scale)  # different weights, slots and seed states
    assert not all(np.array_equal(a, b) for a, b in zip(_values(*saved), _values(*fresh)))
    assert _checkpoints(tmp_path, fresh).restore() == str(tmp_path / "ckpt-7")
    for a, b in zip(_values(*saved), _values(*fresh)):
        np.testing.assert_array_equal(a, b)


def test_weight_averages_are_saved_and_restored_only_when_on(tmp_path: Path) -> None:
    plain = _objects(0)
    _checkpoints(tmp_path / "off", plain).save(1)
    saved = _objects(0)
    average = WeightAverage(saved[0], 0.9)
    for shadow in average.averages:
        shadow.assign_add(tf.ones_like(shadow))
    Checkpoints(build_checkpoint(*saved, average), tmp_path, tmp_path, 3).save(1)

    def names(path: Path) -> set[str]:
        return {name for name, _ in tf.train.list_variables(str(path / "ckpt-1"))}

    # Off, a checkpoint holds what it held before averaging existed; on, one entry more per
    # trainable variable.
    added = {f"{AVERAGE}/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(len(average.averages))}
    assert names(tmp_path) - names(tmp_path / "off") == added
    assert names(tmp_path / "off") <= names(tmp_path)

    fresh = _objects(1)
    fresh_average = WeightAverage(fresh[0], 0.9)
    Checkpoints(build_checkpoint(*fresh, fresh_average), tmp_path, tmp_path, 3).restore()
    for a, b in zip(average.averages, fresh_average.averages):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_dropout_seed_state_is_in_the_checkpoint(tmp_path: Path) -> None:
    saved = _objects(0)
    seeds = [v for v in saved[0].non_trainable_variables if "seed" in v.path]
    assert seeds, "the test model must have a seed generator"
    seeds[0].assign([123, 456])
    _checkpoints(tmp_path, saved).save(1)
    fresh = _objects(1)
    _checkpoints(tmp_path, fresh).restore()
    fresh_seeds = [v for v in fresh[0].non_trainable_variables if "seed" in v.path]
    np.testing.assert_array_equal(np.asarray(fresh_seeds[0]), [123, 456])


def test_nothing_to_restore_in_an_empty_directory(tmp_path: Path) -> None:
    assert _checkpoints(tmp_path / "none", _objects(0)).restore() is None


def test_keeps_the_latest_and_the_best_apart(tmp_path: Path) -> None:
    checkpoints = _checkpoints(tmp_path, _objects(0), keep=2)
    checkpoints.save_best(1)
    for step in (1, 2, 3, 4):
        checkpoints.save(step)
    assert checkpoint_candidates(tmp_path) == [str(tmp_path / "ckpt-4"), str(tmp_path / "ckpt-3")]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.index")) == ["ckpt-3.index", "ckpt-4.index"]
    assert checkpoint_candidates(tmp_path / "best") == [str(tmp_path / "best" / "ckpt-1")]


def _truncate(prefix: str) -> None:
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip_bytes(prefix: str) -> None:
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 16):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


def _delete_index(prefix: str) -> None:
    Path(f"{prefix}.index").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _delete_index])
def test_corrupt_newest_falls_back_to_the_previous_one(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    objects = _objects(0)
    checkpoints = _checkpoints(tmp_path, objects)
    objects[2].step.assign(1)
    checkpoints.save(1)
    objects[2].step.assign(2)
    newest = checkpoints.save(2)
    assert verify_checkpoint(newest) is None
    damage(newest)
    assert verify_checkpoint(newest) is not None

    fresh = _objects(1)
    with caplog.at_level(logging.WARNING, logger="segnet"):
        restored = _checkpoints(tmp_path, fresh).restore()
    assert restored == str(tmp_path / "ckpt-1")
    assert int(fresh[2].step) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ckpt-2" in warnings[0] and "ckpt-1" in warnings[0]
    assert "\n" not in warnings[0]


def test_every_checkpoint_unreadable_is_a_run_dir_error(tmp_path: Path) -> None:
    checkpoints = _checkpoints(tmp_path, _objects(0))
    _truncate(checkpoints.save(1))
    with pytest.raises(RunDirError, match="no checkpoint can be read"):
        _checkpoints(tmp_path, _objects(1)).restore()


def test_unparsable_state_file_finds_checkpoints_by_their_files(tmp_path: Path) -> None:
    checkpoints = _checkpoints(tmp_path, _objects(0))
    for step in (3, 12):
        checkpoints.save(step)
    (tmp_path / "checkpoint").write_text("\x00garbage {{{", encoding="latin-1")
    assert checkpoint_candidates(tmp_path) == [str(tmp_path / "ckpt-12"), str(tmp_path / "ckpt-3")]


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_in_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while TensorFlow merges the shards: data in place, half an index."""
    real = gen_io_ops.merge_v2_checkpoints

    def merge(prefixes: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
        real(prefixes, destination, *args, **kwargs)
        index = Path(f"{destination.numpy().decode()}.index")
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
        raise tf.errors.ResourceExhaustedError(None, None, f"{index}; No space left on device")

    monkeypatch.setattr(gen_io_ops, "merge_v2_checkpoints", merge)


def _no_space_in_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the shards are written: ckpt-<step>_temp/ is left behind."""

    def save(self: tf.train.CheckpointManager, checkpoint_number: int) -> str:
        (Path(self.directory) / f"ckpt-{checkpoint_number}_temp").mkdir()
        _no_space()
        return ""

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)


@pytest.mark.parametrize("fault", [_no_space_in_merge, _no_space_in_shards])
def test_full_disk_keeps_previous_checkpoints_and_removes_the_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault
) -> None:
    checkpoints = _checkpoints(tmp_path, _objects(0))
    checkpoints.save(1)
    fault(monkeypatch)
    with pytest.raises(RunDirError, match="no space left on the device") as caught:
        checkpoints.save(2)
    assert "\n" not in str(caught.value) and "kept" in str(caught.value)
    assert checkpoint_candidates(tmp_path) == [str(tmp_path / "ckpt-1")]
    assert verify_checkpoint(str(tmp_path / "ckpt-1")) is None
    assert not list(tmp_path.glob("ckpt-2*"))


def test_checkpoint_of_another_architecture_is_a_run_dir_error(tmp_path: Path) -> None:
    _checkpoints(tmp_path, _objects(0)).save(1)
    keras.utils.set_random_seed(0)
    image = keras.Input((5, 6, 7, 1))
    other = keras.Model(image, keras.layers.Conv3D(2, 1)(keras.layers.Conv3D(5, 3)(image)))
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(other.trainable_variables)
    with pytest.raises(RunDirError, match="does not fit this model"):
        _checkpoints(tmp_path, (other, optimizer, TrainState.create())).restore()


@pytest.mark.parametrize("loss_scale", [False, True])
def test_loss_scale_is_read_off_the_newest_listable_checkpoint(
    tmp_path: Path, loss_scale: bool
) -> None:
    assert checkpoint_has_loss_scale(tmp_path / "none") is None
    checkpoints = _checkpoints(tmp_path, _objects(0, loss_scale))
    checkpoints.save(1)
    checkpoints.save(2)
    assert checkpoint_has_loss_scale(tmp_path) is loss_scale
    _delete_index(str(tmp_path / "ckpt-2"))  # the older one still tells
    assert checkpoint_has_loss_scale(tmp_path) is loss_scale
    _delete_index(str(tmp_path / "ckpt-1"))
    assert checkpoint_has_loss_scale(tmp_path) is None


@pytest.mark.parametrize("saved_scaled", [False, True])
def test_a_checkpoint_from_the_other_side_of_the_float16_line_does_not_restore(
    tmp_path: Path, saved_scaled: bool
) -> None:
    # Why the trainer picks the resume precision from the checkpoint: the optimizer layouts
    # of mixed_float16 and of float32/bfloat16 do not restore into each other.
    _checkpoints(tmp_path, _objects(0, saved_scaled)).save(1)
    with pytest.raises(RunDirError, match="does not fit this model") as error:
        _checkpoints(tmp_path, _objects(0, not saved_scaled)).restore()
    assert "optimizer" in str(error.value)  # names what did not fit
    assert "function_node" not in str(error.value)  # without TensorFlow's op prefix
