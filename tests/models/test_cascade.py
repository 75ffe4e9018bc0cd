"""The two-stage cascade (segnet/models/unet3d_cascade.py): wiring, stages and freezing."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.models.blocks import LinearUpsampling
from segnet.models.unet3d_cascade import UNet3DCascade

STAGE = {"depth": 2, "filters": 4}


def cascade(train_stage: str = "joint", downsample: int = 2) -> UNet3DCascade:
    return UNet3DCascade(2, 3, downsample, low=STAGE, high=STAGE, train_stage=train_stage)


def _random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("downsample", [2, 4])
def test_stage_one_sees_the_averaged_input_and_guides_stage_two(downsample: int) -> None:
    model = cascade(downsample=downsample)
    x = _random((1, 16, 16, 16, 2))
    full, low = model(x)
    coarse = keras.layers.AveragePooling3D(downsample)(x)
    np.testing.assert_allclose(low, model.get_layer("stage1")(coarse), atol=1e-5)
    assert model.get_layer("stage2").input_shape[-1] == 2 + 3  # image + class probabilities
    assert tuple(full.shape) == (1, 16, 16, 16, 3)


def test_low_stage_outputs_its_own_upsampled_logits_without_stage_two() -> None:
    model = cascade("low")
    full, low = model(_random((1, 16, 16, 16, 2)))
    np.testing.assert_allclose(full, LinearUpsampling(2)(low), atol=1e-5)
    assert "stage2" not in [layer.name for layer in model.layers]
    assert model.supervised_outputs == (1,)


@pytest.mark.parametrize(("train_stage", "stage1_trains"), [("joint", True), ("high", False)])
def test_train_stage_decides_which_weights_change(train_stage: str, stage1_trains: bool) -> None:
    model = cascade(train_stage)
    stage1, stage2 = model.get_layer("stage1"), model.get_layer("stage2")
    before = [w.numpy().copy() for w in (*stage1.weights, *stage2.weights)]
    x, labels = _random((1, 16, 16, 16, 2)), np.ones((1, 16, 16, 16), "int32")
    with tf.GradientTape() as tape:
        logits = model(x, training=True)[0]
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    variables = model.trainable_variables
    keras.optimizers.SGD(0.1).apply(tape.gradient(loss, variables), variables)
    changed = [
        not np.array_equal(b, w.numpy()) for b, w in zip(before, (*stage1.weights, *stage2.weights))
    ]
    assert any(changed[: len(stage1.weights)]) == stage1_trains
    assert any(changed[len(stage1.weights) :])


def test_stage_one_weights_carry_over_from_a_low_run_to_a_high_run() -> None:
    low, high = cascade("low"), cascade("high")
    high.get_layer("stage1").set_weights(low.get_layer("stage1").get_weights())
    x = _random((1, 16, 16, 16, 2))
    np.testing.assert_allclose(high(x)[1], low(x)[1], atol=1e-6)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"low": {"deep_supervision": True}}, "low.deep_supervision"),
        ({"high": {"input_downsample": 2}}, "high.input_downsample"),
        ({"train_stage": "both"}, "train_stage"),
        ({"downsample": 3}, "downsample"),
    ],
)
def test_inconsistent_arguments_are_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet3DCascade(1, 2, **arguments)
