"""segnet's convolution layers against Keras's: the same layers, their bias added another way."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.models.blocks import Conv2DTranspose, Conv3D, Conv3DTranspose
from segnet.precision import precision_policy


def twins(ours_class, keras_class, shape, policy="float32", **settings):
    with precision_policy(policy):
        ours, theirs = ours_class(**settings), keras_class(**settings)
    for layer in (ours, theirs):
        layer.build(shape)
    theirs.set_weights(
        [np.random.default_rng(i).normal(size=w.shape).astype(np.float32)
         for i, w in enumerate(ours.get_weights())]
    )  # fmt: skip
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def outputs_and_gradients(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return y, tape.gradient(loss, [x, *layer.trainable_weights])


@pytest.mark.parametrize(
    ("ours_class", "keras_class", "shape", "strides"),
    [
        (Conv3DTranspose, keras.layers.Conv3DTranspose, (2, 3, 4, 5, 6), 2),
        (Conv3DTranspose, keras.layers.Conv3DTranspose, (1, 3, 4, 5, 2), (1, 2, 2)),
        (Conv2DTranspose, keras.layers.Conv2DTranspose, (2, 5, 4, 3), 2),
    ],
)
def test_matches_keras_outputs_and_gradients(ours_class, keras_class, shape, strides):
    settings = {"filters": 4, "kernel_size": strides, "strides": strides}
    ours, theirs = twins(ours_class, keras_class, shape, **settings)
    x = tf.random.stateless_normal(shape, seed=(1, 2))
    out_shape = theirs.compute_output_shape(shape)
    upstream = tf.random.stateless_normal(out_shape, seed=(3, 4))
    y, grads = outputs_and_gradients(ours, x, upstream)
    y_ref, grads_ref = outputs_and_gradients(theirs, x, upstream)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("ours_class", "settings", "out_shape"),
    [
        (Conv3DTranspose, {"filters": 8, "kernel_size": 2, "strides": 2}, (2, 32, 64, 64, 8)),
        (Conv3D, {"filters": 8, "kernel_size": 3, "padding": "same"}, (2, 16, 32, 32, 8)),
    ],
)
def test_bfloat16_bias_gradient_is_the_sum_rounded_once(ours_class, settings, out_shape):
    # The bias gradient sums the upstream gradient over every voxel. TensorFlow's BiasAddGrad
    # (behind Keras's layers) sums in bfloat16 and returned under 1% of this sum; ours may
    # only differ from it by rounding the float32 total to bfloat16 (a relative 2^-8).
    shape = (2, 16, 32, 32, 8)
    with precision_policy("mixed_bfloat16"):
        layer = ours_class(**settings)
    layer.build(shape)
    x = tf.random.stateless_normal(shape, seed=(5, 6))
    upstream = tf.random.stateless_uniform(out_shape, seed=(7, 8), minval=0.5, maxval=1.5)
    upstream = tf.cast(tf.cast(upstream, tf.bfloat16), tf.float32)  # exactly representable
    exact = tf.reduce_sum(tf.cast(upstream, tf.float64), axis=[0, 1, 2, 3]).numpy()
    y, grads = outputs_and_gradients(layer, x, upstream)
    assert y.dtype == tf.bfloat16
    np.testing.assert_allclose(grads[-1].numpy(), exact, rtol=2**-8)


def test_float32_convolutions_keep_keras_fused_bias(monkeypatch):
    layer = Conv3D(2, 3, padding="same")
    layer.build((1, 4, 4, 4, 1))
    calls = []
    monkeypatch.setattr(tf, "add", lambda *a, **k: calls.append(a))
    layer(tf.ones((1, 4, 4, 4, 1)))
    assert calls == []


def test_without_bias_it_is_keras_code():
    ours, theirs = twins(Conv3DTranspose, keras.layers.Conv3DTranspose, (1, 2, 2, 2, 3),
                         filters=2, kernel_size=2, strides=2, use_bias=False)  # fmt: skip
    x = tf.random.stateless_normal((1, 2, 2, 2, 3), seed=(9, 10))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert ours.get_config() == theirs.get_config() | {"name": ours.name}
