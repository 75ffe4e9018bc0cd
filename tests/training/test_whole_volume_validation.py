"""Tests for segnet.training.held_out: whole-volume Dice of held-out cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from segnet.config import build_config
from segnet.data.case import PreprocessedCase
from segnet.training.held_out import present_class_dice, validate

NUM_CLASSES = 3


def _case(tmp_path: Path, name: str, label: np.ndarray) -> PreprocessedCase:
    """A case whose image is its label as a float channel, so an oracle can read it back."""
    image_path, label_path = tmp_path / f"{name}_image.npy", tmp_path / f"{name}_label.npy"
    np.save(image_path, label[..., np.newaxis].astype(np.float32))
    np.save(label_path, label.astype(np.uint8))
    return PreprocessedCase(name, image_path, label_path, None, label.shape)


def _labels(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    for value in (1, 2):
        corner = rng.integers(0, np.array(shape) - 4)
        size = rng.integers(2, 5, size=3)
        label[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = value
    return label


def _config(tmp_path: Path, model: str) -> object:
    return build_config(
        {
            "data": {"root": str(tmp_path), "num_classes": NUM_CLASSES, "patch_size": [8, 8, 8]},
            "model": {"name": model, "unet3d": {"depth": 3}, "segnet": {"spatial_dims": 2}},
            "evaluation": {"mirror_axes": [0, 1, 2], "overlap": 0.5, "batch_size": 2},
        }
    )


def _oracle(batch: tf.Tensor) -> tf.Tensor:
    """Logits that put the image's value (the label) on top, for 2D and 3D windows alike."""
    return 10.0 * tf.one_hot(tf.cast(tf.round(batch[..., 0]), tf.int32), NUM_CLASSES)


def _always(label: int) -> Callable[[tf.Tensor], tf.Tensor]:
    def predict(batch: tf.Tensor) -> tf.Tensor:
        return 10.0 * tf.one_hot(tf.fill(tf.shape(batch)[:-1], label), NUM_CLASSES)

    return predict


_always_class_1 = _always(1)


@pytest.mark.parametrize(("model", "spatial_dims"), [("unet3d", 3), ("segnet", 2)])
def test_an_oracle_scores_one_on_volumes_larger_and_smaller_than_the_window(
    tmp_path, model, spatial_dims
):
    cases = [
        _case(tmp_path, "a", _labels(0, (13, 11, 9))),  # larger than 8^3 along two axes
        _case(tmp_path, "b", _labels(1, (6, 7, 5))),  # smaller than the window: padded
    ]
    result = validate(_oracle, cases, _config(tmp_path, model), spatial_dims)
    assert result.per_case == {"a": {1: 1.0, 2: 1.0}, "b": {1: 1.0, 2: 1.0}}
    assert result.mean == 1.0
    _, label, prediction = result.example
    np.testing.assert_array_equal(label, prediction)


def test_dice_of_a_constant_prediction_matches_the_hand_count(tmp_path):
    label = _labels(2, (12, 10, 9))
    result = validate(_always_class_1, [_case(tmp_path, "c", label)], _config(tmp_path, "unet3d"))
    ones = int((label == 1).sum())
    # Every voxel is predicted 1: Dice = 2|L1| / (|L1| + all voxels); class 2 is never found.
    assert result.per_class[1] == pytest.approx(2 * ones / (ones + label.size))
    assert result.per_class[2] == 0.0
    assert result.mean == pytest.approx((result.per_class[1] + 0.0) / 2)
    assert result.excluded_empty == 0  # class 2 is in the label: a miss counts


def test_a_class_in_neither_mask_is_left_out_of_the_score(tmp_path):
    both = _labels(2, (12, 10, 9))
    only_1 = np.where(both == 2, 0, both).astype(np.uint8)  # class 2 nowhere in this case
    cases = [_case(tmp_path, "c", both), _case(tmp_path, "e", only_1)]
    result = validate(_always_class_1, cases, _config(tmp_path, "unet3d"))
    dice_c = 2 * int((both == 1).sum()) / (int((both == 1).sum()) + both.size)
    dice_e = 2 * int((only_1 == 1).sum()) / (int((only_1 == 1).sum()) + only_1.size)
    assert result.per_case == {
        "c": pytest.approx({1: dice_c, 2: 0.0}),
        "e": pytest.approx({1: dice_e}),
    }
    assert result.per_class[1] == pytest.approx((dice_c + dice_e) / 2)
    assert result.per_class[2] == 0.0  # case c only; with case e's Dice 1 it would be 0.5
    assert result.mean == pytest.approx(((dice_c + dice_e) / 2 + 0.0) / 2)
    assert result.excluded_empty == 1
    assert result.as_row()["val_excluded_empty"] == 1


def test_nothing_to_count_scores_zero_not_one(tmp_path):
    """Background everywhere, predicted as background: no class exists, so nothing is won."""
    background = np.zeros((9, 8, 7), np.uint8)
    cases = [_case(tmp_path, "f", background), _case(tmp_path, "g", background)]
    result = validate(_always(0), cases, _config(tmp_path, "unet3d"))
    assert (result.per_class, result.mean, result.excluded_empty) == ({}, 0.0, 4)
    assert result.as_row() == {"val_dice": 0.0, "val_excluded_empty": 4}


def test_present_class_dice_by_hand():
    label = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    prediction = np.array([[1, 0, 0, 0], [0, 0, 0, 3]])
    # class 1: tp 1, fp 0, fn 1 -> 2/3; class 2 in neither: left out; class 3: fp only -> 0.
    assert present_class_dice(prediction, label, [1, 2, 3]) == pytest.approx({1: 2 / 3, 3: 0.0})


def test_validation_does_not_mirror(tmp_path):
    """Mirroring is evaluation's: traced once per flip, it would call predict_fn 8 times."""
    calls = []

    def counting_oracle(batch: tf.Tensor) -> tf.Tensor:
        calls.append(batch.shape)
        return _oracle(batch)

    validate(
        counting_oracle, [_case(tmp_path, "d", _labels(3, (9, 9, 9)))], _config(tmp_path, "unet3d")
    )
    assert len(calls) == 1
