"""segnet's GroupNormalization (the fused kernel for instance norm) against Keras's own."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import without_relu

from segnet.models.blocks import GroupNormalization
from segnet.precision import precision_policy


def twins(shape: tuple[int, ...], groups: int | None = None, policy: str = "float32"):
    """The fused layer and Keras's, built alike, with the same non-trivial gamma and beta."""
    groups = groups or shape[-1]
    with precision_policy(policy):
        fused = GroupNormalization(groups=groups)
        reference = keras.layers.GroupNormalization(groups=groups)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 2, shape[-1]), rng.normal(size=shape[-1])]
    for layer in (fused, reference):
        layer.build(shape)
        layer.set_weights([w.astype(np.float32) for w in weights])
    return fused, reference


def outputs_and_gradients(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * upstream)
    return layer(x), tape.gradient(loss, [x, *layer.trainable_weights])


@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 4), (3, 9, 8, 4), (1, 3, 5, 4, 2)])  # 3D, 2D
def test_matches_keras_outputs_and_gradients(shape):
    fused, reference = twins(shape)
    rng = np.random.default_rng(1)
    # Each sample and channel with its own offset and spread, as instance norm must remove.
    x = tf.constant(rng.normal(rng.normal(0, 5, (shape[0], *[1] * (len(shape) - 2), shape[-1])),
                               rng.uniform(0.5, 4, (shape[0], *[1] * (len(shape) - 2), shape[-1])),
                               size=shape), tf.float32)  # fmt: skip
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    y, grads = outputs_and_gradients(fused, x, upstream)
    y_ref, grads_ref = outputs_and_gradients(reference, x, upstream)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_statistics_are_per_sample_not_per_batch():
    fused, _ = twins((2, 4, 4, 4, 3))
    fused.set_weights([np.ones(3, np.float32), np.zeros(3, np.float32)])
    x = tf.random.stateless_normal((1, 4, 4, 4, 3), seed=(1, 2))
    shifted = tf.concat([x[:1], 100.0 + 10.0 * x[:1]], axis=0)  # sample 0, then far away
    y = fused(shifted).numpy()
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1.0, rtol=1e-2)  # var / (var + eps)
    np.testing.assert_allclose(y[0], y[1], rtol=1e-3, atol=1e-3)  # the same sample, rescaled


def test_any_batch_size_in_a_graph_with_an_unknown_batch():
    fused, reference = twins((2, 5, 6, 4, 3))

    @tf.function(input_signature=[tf.TensorSpec((None, 5, 6, 4, 3), tf.float32)])
    def apply(x):
        return fused(x)

    for batch in (1, 3):
        x = tf.random.stateless_normal((batch, 5, 6, 4, 3), seed=(batch, 7))
        np.testing.assert_allclose(apply(x), reference(x), rtol=1e-4, atol=1e-4)


def test_bfloat16_in_and_out_with_float32_weights():
    fused, reference = twins((2, 6, 7, 5, 4), policy="mixed_bfloat16")
    x = tf.cast(tf.random.stateless_normal((2, 6, 7, 5, 4), seed=(5, 6)), tf.bfloat16)
    y = fused(x)
    assert y.dtype == tf.bfloat16 and fused.gamma.dtype == "float32"
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(reference(x), tf.float32), atol=0.05)


def test_other_group_counts_use_keras_code(monkeypatch):
    fused, reference = twins((2, 4, 4, 4, 6), groups=2)
    calls = []
    monkeypatch.setattr(tf.raw_ops, "FusedBatchNormV3", lambda **kw: calls.append(kw))
    x = tf.random.stateless_normal((2, 4, 4, 4, 6), seed=(8, 9))
    np.testing.assert_allclose(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    assert calls == []


def test_models_saved_with_keras_group_norm_restore_into_the_fused_layer(tmp_path, monkeypatch):
    from segnet.checkpoint_files import model_objects
    from segnet.config import build_config
    from segnet.models import blocks
    from segnet.models.registry import build_model

    config = build_config({"model": {"name": "unet3d", "unet3d": {"depth": 2, "filters": 4}}})
    assert config.model.unet3d.norm == "instance"
    with monkeypatch.context() as patch:  # a model as segnet built it before the fused layer
        patch.setattr(blocks, "FUSES_RELU", ())
        patch.setattr(blocks, "GroupNormalization", without_relu(keras.layers.GroupNormalization))
        old = build_model(config)
    assert not any(isinstance(layer, GroupNormalization) for layer in old.layers)
    for variable in old.trainable_weights:
        variable.assign(tf.random.uniform(variable.shape, 0.5, 2.0))
    path = tf.train.Checkpoint(**model_objects(old)).save(str(tmp_path / "ckpt"))
    new = build_model(config)
    assert any(isinstance(layer, GroupNormalization) for layer in new.layers)
    tf.train.Checkpoint(**model_objects(new)).restore(path).assert_existing_objects_matched()
    x = tf.random.stateless_normal((2, 16, 16, 16, 1), seed=(7, 8))
    np.testing.assert_allclose(new(x), old(x), rtol=1e-3, atol=1e-3)

    old.save(tmp_path / "old.keras")  # and a .keras file of the old layer loads as it was
    reloaded = keras.saving.load_model(tmp_path / "old.keras", compile=False)
    np.testing.assert_allclose(reloaded(x), old(x), rtol=1e-5, atol=1e-5)
    new.save(tmp_path / "new.keras")
    reloaded = keras.saving.load_model(tmp_path / "new.keras", compile=False)
    assert any(isinstance(layer, GroupNormalization) for layer in reloaded.layers)
    np.testing.assert_allclose(reloaded(x), new(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_kind", ["batch", "instance"])
def test_the_fused_relu_is_relu_of_the_normalised_output(layer_kind):
    from segnet.models.blocks import FusedBatchNormalization

    shape = (2, 5, 6, 4, 3)
    x = tf.random.stateless_normal(shape, seed=(9, 10))
    upstream = tf.random.stateless_normal(shape, seed=(11, 12))
    results = []
    for relu in (False, True):
        if layer_kind == "batch":
            layer = FusedBatchNormalization(relu=relu)
        else:
            layer = GroupNormalization(groups=shape[-1], relu=relu)
        layer.build(shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            if not relu:
                y = tf.nn.relu(y)
            loss = tf.reduce_sum(y * upstream)
        results.append((y, tape.gradient(loss, [x, *layer.trainable_weights])))
        assert layer.get_config()["relu"] is relu
    (y, grads), (y_fused, grads_fused) = results
    assert float(tf.reduce_min(y_fused)) == 0.0 and float(tf.reduce_max(y_fused)) > 0
    np.testing.assert_allclose(y_fused, y, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads_fused, grads, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["segnet", "unet3d"])
def test_runs_saved_with_a_separate_relu_layer_restore_into_the_fused_one(
    tmp_path, monkeypatch, model_name
):
    from segnet.checkpoint_files import model_objects
    from segnet.config import build_config
    from segnet.models import blocks
    from segnet.models.registry import build_model

    settings = {"depth": 2, "filters": 4, "norm": "instance", "activation": "relu"}
    config = build_config({"model": {"name": model_name, model_name: settings}})
    with monkeypatch.context() as patch:  # the model as segnet built it before the fusion
        patch.setattr(blocks, "FUSES_RELU", ())
        old = build_model(config)
    new = build_model(config)
    assert [layer.name for layer in new.layers] == [layer.name for layer in old.layers]
    assert any(isinstance(layer, keras.layers.ReLU) for layer in old.layers)
    assert not any(isinstance(layer, keras.layers.ReLU) for layer in new.layers)
    for variable in old.trainable_weights:
        variable.assign(tf.random.stateless_uniform(variable.shape, (1, 2), 0.5, 2.0))
    path = tf.train.Checkpoint(**model_objects(old)).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(**model_objects(new)).restore(path).assert_existing_objects_matched()
    x = tf.random.stateless_normal((2, 16, 16, 16, 1), seed=(7, 8))
    np.testing.assert_allclose(new(x), old(x), rtol=1e-4, atol=1e-4)
    old.save(tmp_path / "old.keras")  # an export of the old structure loads into the new one
    reloaded = keras.saving.load_model(tmp_path / "old.keras", compile=False)
    np.testing.assert_allclose(reloaded(x), old(x), rtol=1e-4, atol=1e-4)
