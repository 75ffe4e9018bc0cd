"""Tests for segnet.losses: hand-computed values, Keras' cross-entropy, deep supervision, dtypes."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.config import build_config
from segnet.errors import ConfigError
from segnet.losses import build_loss, deep_supervision_weights

# Two voxels, two classes. Voxel a: logits (0, ln 3) -> p = (1/4, 3/4), label 1.
# Voxel b: logits (0, 0) -> p = (1/2, 1/2), label 0.
TWO_VOXEL_LOGITS = np.array([[0.0, math.log(3.0)], [0.0, 0.0]], np.float32).reshape(1, 1, 1, 2, 2)
TWO_VOXEL_LABELS = np.array([1, 0], np.int32).reshape(1, 1, 1, 2)
CE = -(math.log(0.75) + math.log(0.5)) / 2
# Class 1: sum(p t) = 3/4, sum(p) = 5/4, sum(t) = 1 -> Dice 1.5 / 2.25 = 2/3.
# Class 0: sum(p t) = 1/2, sum(p) = 3/4, sum(t) = 1 -> Dice 1 / 1.75 = 4/7.
DICE_FG = 2 / 3
DICE_BG = 4 / 7


def _config(num_classes: int = 2, **loss: object):
    return build_config({"data": {"num_classes": num_classes}, "loss": {"smooth": 0.0, **loss}})


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ({"name": "ce"}, CE),
        ({"name": "dice"}, 1 - DICE_FG),
        ({"name": "dice", "include_background_in_dice": True}, 1 - (DICE_FG + DICE_BG) / 2),
        ({"name": "dice_ce"}, 1 - DICE_FG + CE),
        ({"name": "dice_ce", "dice_weight": 0.5, "ce_weight": 2.0}, 0.5 * (1 - DICE_FG) + 2 * CE),
        # Weighted: voxel a (class 1) counts 3 times, voxel b once, divided by 3 + 1.
        (
            {"name": "ce", "class_weights": [1.0, 3.0]},
            (-3 * math.log(0.75) - math.log(0.5)) / 4,
        ),
    ],
)
def test_two_voxel_example_matches_hand_computation(loss: dict, expected: float) -> None:
    value = build_loss(_config(**loss))(TWO_VOXEL_LABELS, TWO_VOXEL_LOGITS)
    assert float(value) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 9, 10), (1, 17, 18, 19)])
def test_cross_entropy_matches_keras(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, shape).astype(np.int32)
    logits = rng.normal(0, 3, (*shape, 3)).astype(np.float32)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    ours = build_loss(_config(3, name="ce"))(labels, logits)
    np.testing.assert_allclose(float(ours), float(reference), rtol=1e-5)


def test_class_weighted_cross_entropy_matches_keras_weighted_mean() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2, 5, 6, 7)).astype(np.int32)
    logits = rng.normal(0, 2, (2, 5, 6, 7, 3)).astype(np.float32)
    weights = np.array([0.2, 1.0, 5.0], np.float32)
    voxel_weights = weights[labels]
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")(
        labels, logits, sample_weight=voxel_weights
    )
    ours = build_loss(_config(3, name="ce", class_weights=weights.tolist()))(labels, logits)
    np.testing.assert_allclose(float(ours), float(summed) / voxel_weights.sum(), rtol=1e-5)


# --- Deep supervision ---------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _block_average(one_hot: np.ndarray, factor: int) -> np.ndarray:
    """Averages (b, d, h, w, k) over factor^3 blocks, edge blocks over their voxels inside."""
    b, *spatial, k = one_hot.shape
    out_shape = [-(-n // factor) for n in spatial]
    out = np.zeros((b, *out_shape, k))
    for index in np.ndindex(*out_shape):
        block = tuple(slice(i * factor, (i + 1) * factor) for i in index)
        out[(slice(None), *index)] = one_hot[(slice(None), *block)].mean(axis=(1, 2, 3))
    return out


def _numpy_dice_ce(targets: np.ndarray, logits: np.ndarray) -> float:
    p = _softmax(logits.astype(np.float64))
    axes = (1, 2, 3)
    dice = 2 * (p * targets).sum(axes) / (p.sum(axes) + targets.sum(axes))
    ce = -(targets * np.log(p)).sum(-1).mean()
    return 1 - dice[:, 1:].mean() + ce


@pytest.mark.parametrize(
    ("scales", "supervised", "weights", "expected_weights"),
    [
        ((1, 2), (0, 1), None, (2 / 3, 1 / 3)),  # halve per output, normalised
        ((1, 2, 4), (0, 1, 2), (4.0, 2.0, 2.0), (0.5, 0.25, 0.25)),
        ((1, 2), (1,), None, (0.0, 1.0)),  # loss_at: low: only the coarse output
    ],
)
def test_deep_supervision_weights_coarse_outputs_against_averaged_labels(
    scales: tuple[int, ...],
    supervised: tuple[int, ...],
    weights: tuple[float, ...] | None,
    expected_weights: tuple[float, ...],
) -> None:
    rng = np.random.default_rng(2)
    shape = (2, 9, 10, 11)  # odd sizes: coarse outputs are ceil(size / scale)
    labels = rng.integers(0, 3, shape).astype(np.int32)
    one_hot = np.eye(3)[labels]
    outputs = [
        rng.normal(0, 1, (2, *(-(-n // s) for n in shape[1:]), 3)).astype(np.float32)
        for s in scales
    ]
    model = SimpleNamespace(output_scales=scales, supervised_outputs=supervised)
    config = _config(3, name="dice_ce", deep_supervision_weights=weights)
    value = build_loss(config, model)(labels, outputs)
    expected = sum(
        w * _numpy_dice_ce(_block_average(one_hot, s), out)
        for w, s, out in zip(expected_weights, scales, outputs)
        if w
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_unsupervised_output_does_not_enter_the_loss() -> None:
    labels = np.zeros((1, 4, 4, 4), np.int32)
    garbage = np.full((1, 4, 4, 4, 2), np.nan, np.float32)
    low = np.zeros((1, 2, 2, 2, 2), np.float32)
    model = SimpleNamespace(output_scales=(1, 2), supervised_outputs=(1,))
    assert np.isfinite(float(build_loss(_config(), model)(labels, [garbage, low])))


def test_a_model_without_the_contract_is_refused_not_trained_on_its_first_output() -> None:
    image = keras.Input((None, None, None, 1))
    full = keras.layers.Conv3D(2, 1)(image)
    low = keras.layers.Conv3D(2, 1)(keras.layers.AveragePooling3D(2)(image))
    with pytest.raises(AttributeError, match="output_scales"):
        build_loss(_config(), keras.Model(image, [full, low]))


@pytest.mark.parametrize(("heads", "weights"), [(2, (1.0,)), (3, (1.0, 1.0)), (2, (0.0, 0.0))])
def test_mismatched_deep_supervision_weights_name_the_key(heads: int, weights: tuple) -> None:
    config = _config(deep_supervision_weights=list(weights))
    with pytest.raises(ConfigError, match=r"loss\.deep_supervision_weights"):
        deep_supervision_weights(config.loss, heads)


# --- Precision and graph mode -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_logits_give_a_float32_loss(dtype: str) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, (2, 7, 8, 9)).astype(np.int32)
    logits = tf.cast(rng.normal(0, 2, (2, 7, 8, 9, 3)).astype(np.float32), dtype)
    loss = build_loss(_config(3))
    value = loss(labels, logits)
    assert value.dtype == tf.float32
    reference = loss(labels, tf.cast(logits, tf.float32))
    np.testing.assert_allclose(float(value), float(reference), rtol=1e-6)


def test_loss_is_the_same_inside_tf_function() -> None:
    rng = np.random.default_rng(4)
    labels = tf.constant(rng.integers(0, 4, (2, 5, 6, 7)).astype(np.int32))
    logits = tf.constant(rng.normal(0, 1, (2, 5, 6, 7, 4)).astype(np.float32))
    loss = build_loss(_config(4, class_weights=[1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(
        float(tf.function(loss)(labels, logits)), float(loss(labels, logits)), rtol=1e-6
    )


def test_perfect_prediction_has_near_zero_dice_loss() -> None:
    labels = np.random.default_rng(5).integers(0, 3, (2, 6, 7, 8)).astype(np.int32)
    logits = (np.eye(3)[labels] * 40.0).astype(np.float32)
    assert float(build_loss(_config(3, name="dice"))(labels, logits)) < 1e-6
