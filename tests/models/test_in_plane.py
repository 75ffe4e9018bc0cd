"""In-plane 3D convolutions (kernels flat along one axis) whose gradients run as 2D kernels,
against TensorFlow's own ``conv3d`` and its gradients."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.config import build_config
from segnet.models import blocks, in_plane
from segnet.models.registry import build_model
from segnet.precision import precision_policy


@contextlib.contextmanager
def in_plane_path(enabled: bool):
    saved = in_plane.ENABLED
    in_plane.ENABLED = enabled
    try:
        yield
    finally:
        in_plane.ENABLED = saved


@pytest.mark.parametrize(
    ("kernel", "strides", "dilation", "padding", "data_format", "expected"),
    [
        ((3, 3, 1), (1, 1, 1), (1, 1, 1), "same", "channels_last", 2),
        ((1, 3, 3), (1, 1, 1), (1, 1, 1), "same", "channels_last", 0),
        ((3, 1, 3), (1, 1, 1), (1, 1, 1), "valid", "channels_last", 1),
        ((1, 5, 5), (1, 1, 1), (1, 1, 1), "same", "channels_last", 0),
        ((3, 3, 3), (1, 1, 1), (1, 1, 1), "same", "channels_last", None),
        ((1, 1, 1), (1, 1, 1), (1, 1, 1), "same", "channels_last", None),
        ((1, 1, 3), (1, 1, 1), (1, 1, 1), "same", "channels_last", None),
        ((3, 3, 1), (2, 2, 1), (1, 1, 1), "same", "channels_last", None),
        ((3, 3, 1), (1, 1, 1), (2, 2, 1), "same", "channels_last", None),
        ((3, 3, 1), (1, 1, 1), (1, 1, 1), "same", "channels_first", None),
    ],
)
def test_which_convolutions_take_the_2d_gradients(
    kernel, strides, dilation, padding, data_format, expected
):
    assert in_plane.flat_axis(kernel, strides, dilation, padding, data_format) == expected
    with in_plane_path(False):
        assert in_plane.flat_axis(kernel, strides, dilation, padding, data_format) is None
    # float32's 3D backward kernels are as fast: only bfloat16 takes the 2D ones.
    assert in_plane.flat_axis(kernel, strides, dilation, padding, data_format, "float32") is None


def outputs_and_gradients(x, kernel, convolve):
    upstream = None
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = convolve(x, kernel)
        # A fixed, uneven upstream gradient: every output voxel weighs differently.
        upstream = tf.cos(tf.reshape(tf.range(tf.size(y), dtype=tf.float32), y.shape))
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    dx, dw = tape.gradient(loss, [x, kernel])
    return y, dx, dw


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_float32_matches_tensorflows_conv3d_and_its_gradients(axis: int, padding: str):
    shape = [2, 7, 6, 5, 3]  # odd sizes, unequal axes, so a wrong fold or transpose shows
    kernel_shape = [3, 3, 3, 3, 4]
    kernel_shape[axis] = 1
    x = tf.random.stateless_normal(shape, seed=(1, axis))
    kernel = tf.random.stateless_normal(kernel_shape, seed=(2, axis))
    ours = outputs_and_gradients(x, kernel, lambda a, w: in_plane.conv3d(a, w, axis, padding))
    theirs = outputs_and_gradients(
        x, kernel, lambda a, w: tf.nn.conv3d(a, w, [1] * 5, padding.upper())
    )
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-4)


def test_bfloat16_stays_within_bfloat16_rounding_of_float32():
    x = tf.random.stateless_normal([2, 12, 10, 4, 8], seed=(3, 4))
    kernel = tf.random.stateless_normal([3, 3, 1, 8, 8], seed=(5, 6))
    exact = outputs_and_gradients(x, kernel, lambda a, w: in_plane.conv3d(a, w, 2, "same"))
    rounded = outputs_and_gradients(
        tf.cast(x, tf.bfloat16),
        tf.cast(kernel, tf.bfloat16),
        lambda a, w: in_plane.conv3d(a, w, 2, "same"),
    )
    for fast, reference in zip(rounded, exact, strict=True):
        assert fast.dtype == tf.bfloat16
        error = np.abs(tf.cast(fast, tf.float32).numpy() - reference.numpy())
        assert error.max() < 0.03 * np.abs(reference.numpy()).max()


def test_a_layer_on_shapes_unknown_until_run_time():
    with precision_policy("mixed_bfloat16"):
        layer = blocks.Conv3D(4, (1, 3, 3), padding="same", use_bias=False)
    layer.build((None, None, None, None, 2))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None, 2])])
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)
        return tape.gradient(loss, [x, layer.kernel])

    for shape in ([1, 3, 8, 5, 2], [2, 5, 6, 9, 2]):
        x = tf.random.stateless_normal(shape, seed=(7, shape[0]))
        dx, dw = gradient(x)
        with in_plane_path(False):  # Keras's own path, eager
            reference_dx, reference_dw = gradient.python_function(x)
        for mine, reference in ((dx, reference_dx), (dw, reference_dw)):
            scale = np.abs(reference.numpy()).max()
            np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=0.02 * scale)


def planned_unet(policy: str) -> keras.Model:
    config = build_config(
        {
            "data": {"num_classes": 3, "patch_size": [16, 16, 4]},
            "model": {
                "name": "unet3d",
                "unet3d": {
                    "depth": 2,
                    "filters": 8,
                    "pool_sizes": [[2, 2, 1], [2, 2, 2]],
                    "kernel_sizes": [[3, 3, 1], [3, 3, 1], [3, 3, 3]],
                },
            },
        }
    )
    keras.utils.set_random_seed(0)
    with precision_policy(policy):
        return build_model(config)


def test_a_planned_unet_trains_the_same_through_either_path():
    """The anisotropic U-Net the planner writes for ACDC, in miniature, in bfloat16: the loss
    gradient of every weight is the same through the 2D gradients as through TensorFlow's 3D
    ones, to bfloat16 rounding."""
    model = planned_unet("mixed_bfloat16")
    image = tf.random.stateless_normal([2, 16, 16, 4, 1], seed=(8, 9))

    def weight_gradients():
        with tf.GradientTape() as tape:
            outputs = model(image, training=False)  # fixed batch-norm statistics
            loss = tf.reduce_sum(tf.square(outputs))
        return tape.gradient(loss, model.trainable_weights)

    with in_plane_path(True):
        ours = weight_gradients()
    with in_plane_path(False):
        theirs = weight_gradients()
    in_plane_kernels = [
        layer.kernel for layer in model.layers
        if isinstance(layer, keras.layers.Conv3D) and layer.kernel_size == (3, 3, 1)
    ]  # fmt: skip
    assert len(in_plane_kernels) >= 4
    for mine, reference in zip(ours, theirs, strict=True):
        scale = np.abs(reference.numpy()).max()
        assert scale > 0
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=0.02 * scale)
