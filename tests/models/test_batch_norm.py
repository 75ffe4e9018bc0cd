"""FusedBatchNormalization against Keras's own BatchNormalization, which it must equal."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import without_relu

from segnet.models.blocks import FusedBatchNormalization
from segnet.precision import precision_policy


def twins(shape: tuple[int, ...], policy: str = "float32"):
    """A fused layer and Keras's, built alike, with the same non-trivial weights."""
    with precision_policy(policy):
        fused, reference = FusedBatchNormalization(), keras.layers.BatchNormalization()
    rng = np.random.default_rng(0)
    for layer in (fused, reference):
        layer.build(shape)
    channels = shape[-1]
    weights = [rng.uniform(0.5, 2, channels), rng.normal(size=channels),
               rng.normal(size=channels), rng.uniform(0.5, 2, channels)]  # fmt: skip
    for layer in (fused, reference):
        layer.set_weights([w.astype(np.float32) for w in weights])
    return fused, reference


@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 4), (3, 9, 8, 4)])  # 3D and 2D
def test_training_matches_keras_outputs_statistics_and_gradients(shape):
    fused, reference = twins(shape)
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, size=shape), tf.float32)
    upstream = tf.constant(np.random.default_rng(2).normal(size=shape), tf.float32)
    results = []
    for layer in (fused, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        results.append((y, grads, [w.numpy() for w in layer.non_trainable_weights]))
    (y, grads, moving), (y_ref, grads_ref, moving_ref) = results
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    for m, m_ref in zip(moving, moving_ref, strict=True):  # moving mean and (biased) variance
        np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-6)


def test_inference_matches_keras_with_the_moving_statistics():
    fused, reference = twins((2, 5, 6, 7, 3))
    x = tf.random.stateless_normal((2, 5, 6, 7, 3), seed=(3, 4))
    np.testing.assert_allclose(fused(x), reference(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_in_and_out_with_float32_weights():
    fused, reference = twins((2, 6, 7, 5, 4), "mixed_bfloat16")
    x = tf.random.stateless_normal((2, 6, 7, 5, 4), seed=(5, 6))
    y = fused(tf.cast(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16 and fused.moving_mean.dtype == "float32"
    expected = reference(tf.cast(x, tf.bfloat16), training=True)
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(expected, tf.float32), atol=0.05)


def test_a_synchronised_layer_uses_keras_code(monkeypatch):
    fused, _ = twins((2, 4, 4, 4, 2))
    fused.synchronized = True
    calls = []
    monkeypatch.setattr(tf.raw_ops, "FusedBatchNormV3", lambda **kw: calls.append(kw))
    fused(tf.ones((2, 4, 4, 4, 2)), training=True)
    assert calls == []


def test_checkpoints_of_keras_batch_norm_restore_into_the_fused_layer(tmp_path, monkeypatch):
    from segnet.checkpoint_files import model_objects
    from segnet.config import build_config
    from segnet.models import blocks
    from segnet.models.registry import build_model

    config = build_config({"model": {"segnet": {"depth": 2, "filters": 4}}})  # norm: batch
    with monkeypatch.context() as patch:  # a model as segnet built it before the fused layer
        patch.setattr(blocks, "FUSES_RELU", ())
        patch.setattr(
            blocks, "FusedBatchNormalization", without_relu(keras.layers.BatchNormalization)
        )
        old = build_model(config)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in old.layers)
    for variable in old.non_trainable_weights:  # moving statistics worth restoring
        variable.assign(tf.random.uniform(variable.shape, 0.5, 2.0))
    path = tf.train.Checkpoint(**model_objects(old)).save(str(tmp_path / "ckpt"))
    new = build_model(config)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in new.layers)
    tf.train.Checkpoint(**model_objects(new)).restore(path).assert_existing_objects_matched()
    for mine, theirs in zip(new.weights, old.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    x = tf.random.stateless_normal((1, 8, 8, 8, 1), seed=(7, 8))
    np.testing.assert_allclose(new(x), old(x), rtol=1e-4, atol=1e-4)
