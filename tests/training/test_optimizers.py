"""Tests for segnet.training.optimizers: schedule values by hand, serialisation, clipping."""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import printed_values, run_python

from segnet.config import build_config
from segnet.training.optimizers import (
    SGD,
    WarmupDecaySchedule,
    build_optimizer,
    build_schedule,
    clip_by_global_norm,
)


@pytest.mark.parametrize(
    ("kwargs", "step", "expected"),
    [
        # poly, nnU-Net: peak * (1 - s / T) ** 0.9
        ({"decay": "poly"}, 0, 0.01),
        ({"decay": "poly"}, 50, 0.01 * 0.5**0.9),
        ({"decay": "poly"}, 99, 0.01 * 0.01**0.9),
        ({"decay": "poly"}, 100, 0.0),
        ({"decay": "poly"}, 150, 0.0),  # past the end: stays at 0
        # cosine after 20 warm-up steps: peak * s / 20, then over the remaining 80 steps
        ({"decay": "cosine", "warmup_steps": 20}, 0, 0.0),
        ({"decay": "cosine", "warmup_steps": 20}, 5, 0.0025),
        ({"decay": "cosine", "warmup_steps": 20}, 20, 0.01),
        ({"decay": "cosine", "warmup_steps": 20}, 60, 0.005),
        ({"decay": "cosine", "warmup_steps": 20}, 100, 0.0),
        ({"decay": "constant", "warmup_steps": 4}, 1, 0.0025),
        ({"decay": "constant", "warmup_steps": 4}, 4, 0.01),
        ({"decay": "constant", "warmup_steps": 4}, 1000, 0.01),
    ],
)
def test_schedule_values_by_hand(kwargs: dict, step: int, expected: float) -> None:
    schedule = WarmupDecaySchedule(0.01, total_steps=100, **kwargs)
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-9, rel=1e-5)


def test_schedule_round_trips_through_keras_serialization() -> None:
    schedule = WarmupDecaySchedule(0.3, total_steps=77, warmup_steps=7, decay="cosine")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, WarmupDecaySchedule)
    assert restored.get_config() == schedule.get_config()
    for step in (0, 3, 7, 40, 77):
        assert float(restored(step)) == float(schedule(step))


def test_unknown_decay_is_refused() -> None:
    with pytest.raises(ValueError, match="poly, cosine or constant"):
        WarmupDecaySchedule(0.1, 10, decay="linear")  # type: ignore[arg-type]


def test_build_schedule_spans_the_whole_run() -> None:
    config = build_config({"train": {"epochs": 3, "steps_per_epoch": 7}})
    schedule = build_schedule(config)
    assert schedule.total_steps == 21
    assert float(schedule(21)) == 0.0


@pytest.mark.parametrize(
    ("optimizer", "precision", "inner_type", "scaled"),
    [
        ({"name": "sgd"}, "float32", keras.optimizers.SGD, False),
        ({"name": "adamw", "schedule": "cosine"}, "float32", keras.optimizers.AdamW, False),
        ({"name": "sgd"}, "mixed_float16", keras.optimizers.SGD, True),
        ({"name": "adamw"}, "mixed_bfloat16", keras.optimizers.AdamW, False),
    ],
)
def test_build_optimizer(optimizer: dict, precision: str, inner_type: type, scaled: bool) -> None:
    config = build_config({"optimizer": optimizer, "runtime": {"precision": precision}})
    built = build_optimizer(config)
    assert isinstance(built, keras.optimizers.LossScaleOptimizer) == scaled
    inner = built.inner_optimizer if scaled else built
    assert isinstance(inner, inner_type)
    assert isinstance(inner._learning_rate, WarmupDecaySchedule)
    assert inner.global_clipnorm is None and inner.clipnorm is None  # the train step clips
    if inner_type is keras.optimizers.SGD:
        assert inner.nesterov and inner.momentum == pytest.approx(0.99)


@pytest.mark.parametrize(
    ("grads", "clip", "scale", "expected", "norm"),
    [
        ([[3.0], [4.0]], 1.0, 1.0, [[0.6], [0.8]], 5.0),
        ([[3.0], [4.0]], 10.0, 1.0, [[3.0], [4.0]], 5.0),  # below the limit: unchanged
        ([[3.0], [4.0]], None, 1.0, [[3.0], [4.0]], 5.0),
        # Gradients of a loss scaled by 10: the limit applies to the unscaled norm (5).
        ([[30.0], [40.0]], 1.0, 10.0, [[6.0], [8.0]], 5.0),
    ],
)
def test_clip_by_global_norm(
    grads: list, clip: float | None, scale: float, expected: list, norm: float
) -> None:
    clipped, measured = clip_by_global_norm([tf.constant(g) for g in grads], clip, scale)
    for got, want in zip(clipped, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert float(measured) == pytest.approx(norm)


def test_clip_keeps_none_gradients() -> None:
    clipped, _ = clip_by_global_norm([tf.constant([3.0, 4.0]), None], 1.0)
    assert clipped[1] is None


def _momentum_updates(optimizer: keras.optimizers.Optimizer, grads: list) -> np.ndarray:
    weights = tf.Variable([1.0, -2.0, 0.5])
    optimizer.build([weights])
    for grad in grads:
        optimizer.apply([tf.constant(grad)], [weights])
    return weights.numpy()


@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_momentum_sgd_updates_like_keras_and_by_hand(nesterov: bool) -> None:
    grads = [[0.5, -1.0, 2.0], [0.25, 3.0, -1.0], [-1.5, 0.5, 0.0]]
    lr, mu = 0.1, 0.9
    ours = _momentum_updates(SGD(lr, momentum=mu, nesterov=nesterov), grads)
    keras_sgd = _momentum_updates(keras.optimizers.SGD(lr, momentum=mu, nesterov=nesterov), grads)
    w, m = np.array([1.0, -2.0, 0.5]), np.zeros(3)
    for g in np.asarray(grads):  # Keras's definition, written out
        m = mu * m - lr * g
        w = w + (mu * m - lr * g if nesterov else m)
    np.testing.assert_allclose(ours, w, rtol=1e-6)
    np.testing.assert_allclose(keras_sgd, w, rtol=1e-6)


def test_sgd_without_momentum_takes_keras_path() -> None:
    np.testing.assert_allclose(
        _momentum_updates(SGD(0.5, momentum=0.0), [[1.0, 1.0, 1.0]]), [0.5, -2.5, 0.0]
    )


def test_build_optimizer_gives_the_fused_sgd_and_it_serialises() -> None:
    built = build_optimizer(build_config({"optimizer": {"name": "sgd"}}))
    assert type(built) is SGD
    again = keras.optimizers.deserialize(keras.optimizers.serialize(built))
    assert type(again) is SGD and again.get_config() == built.get_config()


# Under a mirrored strategy the update runs once per device inside extended.update(), where
# the fused kernel must find each device's copy of the weights and of the momentum.
_MIRRORED_MOMENTUM = """
import segnet
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from segnet.training.optimizers import SGD

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = []
for make in (SGD, keras.optimizers.SGD):
    with mirrored.scope():
        v = tf.Variable([1.0, -2.0])
        sgd = make(learning_rate=0.1, momentum=0.9, nesterov=True)
        sgd.build([v])
    update = tf.function(lambda: sgd.apply([tf.constant([0.5, -1.0])], [v]))
    for _ in range(3):
        mirrored.run(update)
    results.append([c.numpy() for c in v.values])
ours, reference = results
print("devices", len(ours))
print("max_diff", max(float(np.max(np.abs(a - b))) for a, b in zip(ours, reference)))
print("moved", float(np.max(np.abs(ours[0] - np.array([1.0, -2.0])))))
print("copies_differ", float(np.max(np.abs(ours[0] - ours[1]))))
"""


def test_fused_momentum_sgd_updates_every_mirrored_copy_like_keras() -> None:
    found = printed_values(run_python(_MIRRORED_MOMENTUM))
    assert int(found["devices"]) == 2
    assert float(found["moved"]) > 0.1
    assert float(found["max_diff"]) < 1e-6
    assert float(found["copies_differ"]) == 0.0
