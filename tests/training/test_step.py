"""Tests for segnet.training.step: confusion counts, one update, clipping, float16 loss scaling."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import printed_values, run_python

from segnet.config import build_config
from segnet.losses import build_loss
from segnet.training.ema import WeightAverage
from segnet.training.optimizers import build_optimizer
from segnet.training.step import confusion_counts, make_train_step

NUM_CLASSES = 3


def test_confusion_counts_by_hand() -> None:
    labels = np.array([[0, 1, 1, 2]])
    logits = np.eye(3, dtype=np.float32)[[[0, 1, 2, 2]]]  # predicts 0, 1, 2, 2
    counts = confusion_counts(labels, logits, 3).numpy()
    np.testing.assert_array_equal(counts, [[1, 0, 0], [1, 0, 1], [1, 1, 0]])


def _model(dtype_policy: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((7, 8, 9, 1))
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu", dtype=dtype_policy)(image)
    return keras.Model(image, keras.layers.Conv3D(NUM_CLASSES, 1, dtype="float32")(x))


def _batch() -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(2, 7, 8, 9, 1)).astype(np.float32))
    labels = tf.constant(rng.integers(0, NUM_CLASSES, (2, 7, 8, 9)).astype(np.int32))
    return images, labels


def _step(
    model: keras.Model,
    *overrides: str,
    jit_compile: bool = False,
    jit_compile_loss: bool = True,
    average: WeightAverage | None = None,
):
    config = build_config(
        {"data": {"num_classes": NUM_CLASSES}, "optimizer": {"weight_decay": 0.0}},
        list(overrides),
    )
    optimizer = build_optimizer(config)
    optimizer.build(model.trainable_variables)
    step = make_train_step(
        model,
        optimizer,
        build_loss(config),
        tf.distribute.get_strategy(),
        num_classes=NUM_CLASSES,
        clip_norm=config.optimizer.clip_norm,
        jit_compile=jit_compile,
        jit_compile_loss=jit_compile_loss,
        average=average,
    )
    return step, optimizer


@pytest.mark.parametrize(
    ("policy", "jit_compile"), [(None, False), (None, True), ("mixed_bfloat16", False)]
)
def test_one_step_updates_weights_and_reports_counts(policy: str | None, jit_compile: bool) -> None:
    model = _model(policy)
    before = [np.asarray(v) for v in model.trainable_variables]
    step, optimizer = _step(model, jit_compile=jit_compile)
    images, labels = _batch()
    out = step((images, labels), tf.constant(0.0))
    assert np.isfinite(float(out.loss)) and float(out.grad_norm) > 0
    assert not bool(out.stop)
    counts = out.counts.numpy()
    truth = np.bincount(labels.numpy().ravel(), minlength=NUM_CLASSES)
    np.testing.assert_array_equal(counts[:, 0] + counts[:, 2], truth)  # tp + fn = reference
    assert counts[:, :2].sum() == labels.numpy().size  # every voxel predicted once
    assert int(optimizer.iterations) == 1
    assert all(
        not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.trainable_variables)
    )


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16"])
def test_the_xla_compiled_loss_steps_like_the_plain_one(policy: str | None) -> None:
    results = []
    for jit_compile_loss in (False, True):
        model = _model(policy)  # the same seed: the same initial weights
        step, _ = _step(model, "loss.name=dice_ce", jit_compile_loss=jit_compile_loss)
        out = step(_batch(), tf.constant(0.0))
        results.append((out, [np.asarray(v) for v in model.trainable_variables]))
    (plain, plain_weights), (compiled, compiled_weights) = results
    np.testing.assert_allclose(float(compiled.loss), float(plain.loss), rtol=1e-5)
    np.testing.assert_allclose(float(compiled.grad_norm), float(plain.grad_norm), rtol=1e-4)
    np.testing.assert_array_equal(compiled.counts, plain.counts)
    for a, b in zip(compiled_weights, plain_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", [None, "mixed_bfloat16", "mixed_float16"])
def test_weight_averages_follow_the_warmed_up_decay_by_hand(policy: str | None) -> None:
    model = _model(policy)
    decay = 0.2  # the first step warms up: min(0.2, 2/11); the next ones use 0.2
    average = WeightAverage(model, decay)
    expected = [np.asarray(v, np.float64) for v in model.trainable_variables]
    precision = [f"runtime.precision={policy}"] if policy else []
    step, _ = _step(model, "optimizer.learning_rate=0.5", *precision, average=average)
    for t in (1, 2, 3):
        step(_batch(), tf.constant(0.0))
        d = min(decay, (1 + t) / (10 + t))
        weights = [np.asarray(v, np.float64) for v in model.trainable_variables]
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    for shadow, want, weight in zip(average.averages, expected, model.trainable_variables):
        assert shadow.dtype == tf.float32  # also under mixed_bfloat16
        assert not np.allclose(shadow.numpy(), np.asarray(weight))
        np.testing.assert_allclose(shadow.numpy(), want, rtol=1e-6, atol=1e-7)


def test_weight_averages_swap_in_and_the_live_weights_come_back_bit_for_bit() -> None:
    model = _model()
    average = WeightAverage(model, 0.5)
    step, _ = _step(model, average=average)
    for _ in range(2):
        step(_batch(), tf.constant(0.0))
    live = [np.asarray(v) for v in model.trainable_variables]
    with average.swapped_in():
        for weight, shadow in zip(model.trainable_variables, average.averages):
            np.testing.assert_array_equal(np.asarray(weight), shadow.numpy())
    for weight, before in zip(model.trainable_variables, live):
        np.testing.assert_array_equal(np.asarray(weight), before)


def test_stop_flag_passes_through() -> None:
    step, _ = _step(_model())
    assert bool(step(_batch(), tf.constant(1.0)).stop)


def test_clipping_bounds_the_first_nesterov_update() -> None:
    # First SGD step with Nesterov momentum m moves the weights by (1 + m) * lr * g, so a
    # gradient clipped to norm c moves them by exactly (1 + m) * lr * c.
    model = _model()
    before = [np.asarray(v) for v in model.trainable_variables]
    clip, lr, momentum = 1e-3, 0.1, 0.9
    step, _ = _step(
        model,
        f"optimizer.clip_norm={clip}",
        f"optimizer.learning_rate={lr}",
        f"optimizer.momentum={momentum}",
        "optimizer.schedule=constant",
    )
    out = step(_batch(), tf.constant(0.0))
    assert float(out.grad_norm) > clip
    moved = np.sqrt(
        sum(np.sum((np.asarray(v) - b) ** 2) for v, b in zip(model.trainable_variables, before))
    )
    assert moved == pytest.approx((1 + momentum) * lr * clip, rel=1e-4)


def test_float16_step_scales_the_loss() -> None:
    model = _model(dtype_policy="mixed_float16")
    step, optimizer = _step(model, "runtime.precision=mixed_float16")
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(optimizer.dynamic_scale)
    out = step(_batch(), tf.constant(0.0))
    assert out.loss.dtype == tf.float32 and np.isfinite(float(out.loss))
    # the reported norm is of the unscaled gradient: the same as without a loss scale
    reference = _step(_model(), "optimizer.clip_norm=null")[0](_batch(), tf.constant(0.0))
    assert float(out.grad_norm) == pytest.approx(float(reference.grad_norm), rel=1e-2)
    assert int(optimizer.iterations) == 1 and float(optimizer.dynamic_scale) == scale


# The step divides the already all-reduced gradients by the replica count because Keras 3's
# optimizer.apply() sums them over replicas once more (in _backend_update_step, an internal).
# This child pins both halves in seconds on two logical CPUs: Keras's sum, and our step over
# two replicas equal to one device on the same global batch (and the weight averages right on
# each device). The day Keras stops summing, the first assertion fails and points here (and at
# step.py).
_TWO_REPLICAS = """
import segnet
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from segnet.config import build_config
from segnet.losses import build_loss
from segnet.training.ema import WeightAverage
from segnet.training.optimizers import build_optimizer
from segnet.training.step import make_train_step

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with mirrored.scope():  # Keras's apply() under two replicas, each handing over gradient 1
    v = tf.Variable(0.0)
    sgd = keras.optimizers.SGD(learning_rate=1.0)
    sgd.build([v])
mirrored.run(tf.function(lambda: sgd.apply([tf.constant(1.0)], [v])))
print("keras_apply_moves", float(v.numpy()))

config = build_config({"data": {"num_classes": 3}, "optimizer": {"weight_decay": 0.0}},
                      ["optimizer.schedule=constant", "optimizer.momentum=0.0"])
rng = np.random.default_rng(0)
images = rng.normal(size=(2, 7, 8, 9, 1)).astype(np.float32)
labels = rng.integers(0, 3, (2, 7, 8, 9)).astype(np.int32)

def one_step(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        x = keras.Input((7, 8, 9, 1))
        model = keras.Model(x, keras.layers.Conv3D(3, 3, padding="same")(x))
        optimizer = build_optimizer(config)
        optimizer.build(model.trainable_variables)
        average = WeightAverage(model, 0.5)
    initial = [np.asarray(w) for w in model.get_weights()]
    step = make_train_step(model, optimizer, build_loss(config), strategy, num_classes=3,
                           clip_norm=None, average=average)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    step(next(iter(strategy.experimental_distribute_dataset(data))), tf.constant(0.0))
    weights = [np.asarray(w) for w in model.get_weights()]
    d = 2 / 11  # the first update's warmed-up decay
    wanted = [d * w0 + (1 - d) * w1 for w0, w1 in zip(initial, weights)]
    # every device's copy of each average, against the formula
    copies = [getattr(a, "values", (a,)) for a in average.averages]
    print("ema_error", max(float(np.max(np.abs(c.numpy() - w)))
                           for cs, w in zip(copies, wanted) for c in cs))
    return weights

one = one_step(tf.distribute.get_strategy())
two = one_step(mirrored)
print("max_diff", max(float(np.max(np.abs(a - b))) for a, b in zip(one, two)))
"""


def test_two_replicas_step_like_one_device_and_keras_still_sums() -> None:
    found = printed_values(run_python(_TWO_REPLICAS))
    # SGD with rate 1 moved v by the sum of the two replicas' gradients (-2), not their mean.
    assert float(found["keras_apply_moves"]) == -2.0, "Keras changed: revisit step.py's division"
    assert float(found["max_diff"]) < 1e-6
    assert float(found["ema_error"]) < 1e-6  # weight averages: on both devices, after the update
