"""The convolution that reads the image computes in float32 under mixed precision (blocks.py:
oneDNN's bfloat16 kernels for one input channel are slow); every other layer keeps the policy."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.config import build_config
from segnet.models import blocks
from segnet.models.registry import build_model
from segnet.precision import precision_policy


def unet(num_channels: int, policy: str) -> keras.Model:
    config = build_config(
        {
            "data": {"num_classes": 3, "num_channels": num_channels, "patch_size": [16, 16, 16]},
            "model": {"name": "unet3d", "unet3d": {"depth": 2, "filters": 8}},
        }
    )
    keras.utils.set_random_seed(0)
    with precision_policy(policy):
        return build_model(config)


def convolutions(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv3D)]


@pytest.mark.parametrize(("channels", "first"), [(1, "float32"), (3, "float32"), (4, "bfloat16")])
def test_only_a_convolution_of_few_channels_leaves_bfloat16(channels: int, first: str):
    model = unet(channels, "mixed_bfloat16")
    convs = [layer for layer in convolutions(model) if not layer.name.startswith("head")]
    assert convs[0].input.shape[-1] == channels
    assert convs[0].compute_dtype == first
    assert {layer.compute_dtype for layer in convs[1:]} == {"bfloat16"}
    assert all(w.dtype == "float32" for w in model.weights)  # so checkpoints are unchanged


def test_in_float32_every_layer_is_float32_as_before():
    model = unet(1, "float32")
    assert {layer.compute_dtype for layer in convolutions(model)} == {"float32"}


def test_the_first_convolution_matches_tensorflows_float32_convolution():
    """Its output is TensorFlow's float32 convolution of the padded image (which the pad
    layer has rounded to bfloat16), not a bfloat16 one: the image's detail reaches the net."""
    model = unet(1, "mixed_bfloat16")
    first = convolutions(model)[0]
    image = tf.random.stateless_normal((2, 16, 16, 16, 1), seed=(3, 4))
    probe = keras.Model(model.inputs, first.output)
    padded = tf.cast(tf.cast(image, tf.bfloat16), tf.float32)
    expected = tf.nn.conv3d(padded, first.kernel, [1] * 5, "SAME")
    if first.use_bias:
        expected += first.bias
    got = probe(image)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    # A bfloat16 convolution would be off by its rounding: the check can tell the two apart.
    rounded = tf.nn.conv3d(
        tf.cast(padded, tf.bfloat16), tf.cast(first.kernel, tf.bfloat16), [1] * 5, "SAME"
    )
    assert np.abs(tf.cast(rounded, tf.float32).numpy() - expected.numpy()).max() > 1e-3


def test_a_mixed_and_a_float32_model_share_a_checkpoint(tmp_path):
    mixed, exact = unet(1, "mixed_bfloat16"), unet(1, "float32")
    mixed.set_weights([w + 0.5 for w in mixed.get_weights()])
    path = tf.train.Checkpoint(model=mixed).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=exact).read(path).assert_existing_objects_matched()
    for a, b in zip(mixed.weights, exact.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_gradient_reaches_the_float32_convolution():
    model = unet(1, "mixed_bfloat16")
    image = tf.random.stateless_normal((1, 16, 16, 16, 1), seed=(5, 6))
    with tf.GradientTape() as tape:
        outputs = model(image, training=True)
        loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in tf.nest.flatten(outputs)])
    kernel = convolutions(model)[0].kernel
    gradient = tape.gradient(loss, kernel)
    assert gradient.dtype == tf.float32
    assert float(tf.reduce_max(tf.abs(gradient))) > 0


def test_segnet_2d_keeps_the_policy_in_its_first_convolution():
    config = build_config(
        {
            "data": {"num_classes": 3, "num_channels": 1, "patch_size": [1, 16, 16]},
            "model": {"name": "segnet", "segnet": {"spatial_dims": 2, "depth": 2, "filters": 8}},
        }
    )
    with precision_policy("mixed_bfloat16"):
        model = build_model(config)
    first = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert first.input.shape[-1] == 1 <= blocks.FLOAT32_MAX_INPUT_CHANNELS
    assert first.compute_dtype == "bfloat16"
