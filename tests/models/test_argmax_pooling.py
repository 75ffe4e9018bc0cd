"""Tests for exact N-D max pooling with argmax and unpooling (segnet/models/argmax_pooling.py).

References: ``tf.nn.max_pool_with_argmax`` (2D), ``keras.layers.MaxPooling3D`` /
``tf.nn.max_pool3d`` (3D), ``tf.scatter_nd`` unpooling with correctly decoded indices, and a
numpy window reduction (``np.argmax`` is documented to return the first maximum).
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from segnet.models.argmax_pooling import (
    MaxPoolingWithArgmax,
    MaxUnpoolingWithArgmax,
    _lowest_finite,
    max_pool_with_argmax,
    max_unpool,
    normalize_pool_size,
)

JIT = pytest.mark.parametrize("jit", [True, False], ids=["xla", "plain"])
EVEN_2D = [(2, 8, 10, 3), (1, 16, 6, 2), (3, 4, 4, 1)]
ODD_2D = [(2, 7, 7, 3), (2, 9, 6, 2), (1, 33, 31, 2)]


def _random(shape: tuple[int, ...], seed: int = 0, dtype: str = "float32") -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


def _tf_flat_index(
    argmax: Any, input_shape: Sequence[int], pool_size: int | Sequence[int] = 2
) -> Any:
    """Reference decoding: window-local argmax to TensorFlow's flat index over the input.

    The flat index is row-major over ``(batch, *spatial, channels)``, e.g. in 2D
    ``((b * H + y) * W + x) * C + c``, as ``tf.nn.max_pool_with_argmax(...,
    include_batch_in_index=True)`` on the unpadded input.

    Args:
        argmax: int ``(batch, *pooled_spatial, channels)`` from ``max_pool_with_argmax``.
        input_shape: the static pre-pool shape ``(batch, *spatial, channels)``.
        pool_size: the pool size used.

    Returns:
        int64 tensor shaped like ``argmax``.
    """
    spatial_dims = len(input_shape) - 2
    pool_size = normalize_pool_size(pool_size, spatial_dims)
    local = ops.cast(argmax, "int64")
    shape = ops.shape(argmax)
    flat = ops.reshape(ops.arange(shape[0], dtype="int64"), [-1] + [1] * (spatial_dims + 1))
    stride = math.prod(pool_size)
    for axis, p in enumerate(pool_size):
        stride //= p
        offset = (local // stride) % p
        window = ops.reshape(
            ops.arange(shape[axis + 1], dtype="int64"), [-1] + [1] * (spatial_dims - axis)
        )
        flat = flat * input_shape[axis + 1] + window * p + offset
    return flat * input_shape[-1] + ops.arange(shape[-1], dtype="int64")


def _numpy_windows(x: np.ndarray, pool: tuple[int, ...], pad_value: float) -> np.ndarray:
    """Pads the end of each spatial axis, returns ``(b, *pooled, c, window)`` (row-major window)."""
    nd = len(pool)
    counts = [-(-n // p) for n, p in zip(x.shape[1:-1], pool)]
    pads = [(0, 0)] + [(0, k * p - n) for k, p, n in zip(counts, pool, x.shape[1:-1])] + [(0, 0)]
    padded = np.pad(x.astype(np.float64), pads, constant_values=pad_value)
    split = [x.shape[0]] + [d for kp in zip(counts, pool) for d in kp] + [x.shape[-1]]
    perm = [0, *range(1, 2 * nd, 2), 2 * nd + 1, *range(2, 2 * nd + 1, 2)]
    return padded.reshape(split).transpose(perm).reshape(x.shape[0], *counts, x.shape[-1], -1)


def _scatter_unpool(
    pooled: tf.Tensor, flat: tf.Tensor, shape: tuple[int, ...], grid: tuple[int, int]
) -> tf.Tensor:
    """Unpools 2D with tf.scatter_nd, decoding TF's flat indices assuming a (rows, cols) grid.

    ``grid`` = the true (H, W) is the correct decoding; ``(2 * pooled_h, 2 * pooled_w)`` is the
    widely copied one. The map is built on ``grid`` and cropped to ``shape``.
    """
    b, _, _, c = shape
    rows, cols = grid
    flat = tf.cast(flat, tf.int64)
    channel, rest = flat % c, flat // c
    x, rest = rest % cols, rest // cols
    y, batch = rest % rows, rest // rows
    coords = tf.stack([batch, y, x, channel], axis=-1)
    grid_map = tf.scatter_nd(coords, pooled, (b, rows, cols, c))
    return grid_map[:, : shape[1], : shape[2], :]


# --- 2D against tf.nn.max_pool_with_argmax ---------------------------------------------------


@JIT
@pytest.mark.parametrize("shape", EVEN_2D)
def test_2d_values_and_indices_equal_tf_on_even_sizes(shape, jit):
    x = _random(shape)
    pooled, argmax = max_pool_with_argmax(x, 2, jit_compile=jit)
    tf_pooled, tf_flat = tf.nn.max_pool_with_argmax(x, 2, 2, "SAME", include_batch_in_index=True)
    np.testing.assert_array_equal(pooled, tf_pooled)
    np.testing.assert_array_equal(_tf_flat_index(argmax, shape, 2), tf_flat)


@pytest.mark.parametrize("shape", ODD_2D)
def test_2d_pooled_values_equal_tf_on_odd_sizes(shape):
    x = _random(shape)
    pooled, _ = max_pool_with_argmax(x)
    np.testing.assert_array_equal(pooled, tf.nn.max_pool2d(x, 2, 2, "SAME"))


@JIT
@pytest.mark.parametrize("shape", ODD_2D + EVEN_2D[:1])
def test_2d_unpool_equals_scatter_nd_with_correct_decoding(shape, jit):
    x = _random(shape, seed=1)
    pooled, argmax = max_pool_with_argmax(x, jit_compile=jit)
    tf_pooled, tf_flat = tf.nn.max_pool_with_argmax(x, 2, 2, "SAME", include_batch_in_index=True)
    expected = _scatter_unpool(tf_pooled, tf_flat, shape, grid=shape[1:3])
    np.testing.assert_array_equal(max_unpool(pooled, argmax, 2, x, jit_compile=jit), expected)


@pytest.mark.parametrize(
    ("shape", "naive_is_wrong"), [((1, 7, 7, 2), True), ((1, 6, 9, 2), True), ((1, 9, 6, 2), False)]
)
def test_naive_decoding_with_twice_pooled_width_tilts_on_odd_width(shape, naive_is_wrong):
    # Documents the defect this module avoids: TF's SAME indices count the unpadded width.
    x = _random(shape, seed=2)
    tf_pooled, tf_flat = tf.nn.max_pool_with_argmax(x, 2, 2, "SAME", include_batch_in_index=True)
    correct = _scatter_unpool(tf_pooled, tf_flat, shape, grid=shape[1:3])
    naive_grid = (2 * tf_pooled.shape[1], 2 * tf_pooled.shape[2])
    naive = _scatter_unpool(tf_pooled, tf_flat, shape, grid=naive_grid)
    assert (not np.array_equal(naive, correct)) == naive_is_wrong


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 9, 3), (1, 5, 5, 1)])
@pytest.mark.parametrize("data", ["all_equal", "small_integers"])
def test_2d_ties_pick_the_same_position_as_tf(shape, data):
    rng = np.random.default_rng(3)
    values = np.ones(shape) if data == "all_equal" else rng.integers(0, 2, size=shape)
    x = tf.constant(values, tf.float32)
    pooled, argmax = max_pool_with_argmax(x)
    tf_pooled, tf_flat = tf.nn.max_pool_with_argmax(x, 2, 2, "SAME", include_batch_in_index=True)
    expected = _scatter_unpool(tf_pooled, tf_flat, shape, grid=shape[1:3])
    np.testing.assert_array_equal(max_unpool(pooled, argmax, 2, x), expected)
    if shape[1] % 2 == 0 and shape[2] % 2 == 0:
        np.testing.assert_array_equal(_tf_flat_index(argmax, shape, 2), tf_flat)


def test_indices_are_window_local_integers():
    # A float32 flat index is exact only to 2**24; a window-local int never grows with the volume.
    x = _random((1, 9, 8, 7, 2))
    _, argmax = max_pool_with_argmax(x, (2, 3, 2))
    assert argmax.dtype == tf.uint8
    _, symbolic = MaxPoolingWithArgmax((2, 3, 2))(keras.Input((9, 8, 7, 2)))
    assert symbolic.dtype == "uint8" and symbolic.shape == (None, 5, 3, 4, 2)
    assert argmax.shape == (1, 5, 3, 4, 2)
    assert int(tf.reduce_min(argmax)) >= 0 and int(tf.reduce_max(argmax)) < 2 * 3 * 2


# --- 3D against MaxPooling3D / max_pool3d ----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "pool"),
    [
        ((1, 16, 16, 16, 2), 2),
        ((2, 17, 18, 19, 3), 2),
        ((1, 1, 3, 5, 1), 2),
        ((1, 5, 1, 2, 2), 2),
        ((1, 9, 7, 5, 2), (2, 2, 1)),
        ((1, 6, 9, 3, 1), 3),
    ],
)
def test_3d_pooled_values_equal_maxpooling3d_same(shape, pool):
    x = _random(shape)
    pooled, _ = max_pool_with_argmax(x, pool)
    expected = keras.layers.MaxPooling3D(pool_size=pool, padding="same")(x)
    np.testing.assert_array_equal(pooled, expected)


def test_3d_gradients_equal_max_pool3d_gradients():
    x, h = _random((1, 17, 18, 19, 2), seed=4), _random((1, 9, 9, 10, 2), seed=5)
    g = _random(x.shape, seed=6)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        pooled, argmax = max_pool_with_argmax(x)
        round_trip = tf.reduce_sum(max_unpool(pooled, argmax, 2, x) * g)
        pooled_loss = tf.reduce_sum(pooled * h)
        tf_pooled = tf.nn.max_pool3d(x, 2, 2, "SAME")
    # Pooling: upstream h lands on the argmax of each window.
    np.testing.assert_array_equal(
        tape.gradient(pooled_loss, x), tape.gradient(tf_pooled, x, output_gradients=h)
    )
    # Pool then unpool passes g through at the argmax positions (TF's unit-upstream gradient mask).
    mask = tape.gradient(tf_pooled, x)
    np.testing.assert_array_equal(tape.gradient(round_trip, x), g * mask)


def test_unpool_gradient_gathers_upstream_at_argmax():
    values = _random((1, 2, 2, 2, 1))
    argmax = tf.constant([7, 0, 3, 5, 1, 6, 2, 4], tf.uint8, shape=(1, 2, 2, 2, 1))
    upstream = tf.reshape(tf.range(64, dtype=tf.float32), (1, 4, 4, 4, 1))
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = max_unpool(values, argmax)
    gathered = tape.gradient(out, values, output_gradients=upstream)
    # Window (i, j, k) covers upstream[2i:2i+2, 2j:2j+2, 2k:2k+2]; local index l = 4dz + 2dy + dx.
    expected = [
        upstream[0, 2 * i + (local // 4), 2 * j + (local // 2) % 2, 2 * k + local % 2, 0]
        for (i, j, k), local in zip(np.ndindex(2, 2, 2), [7, 0, 3, 5, 1, 6, 2, 4])
    ]
    np.testing.assert_array_equal(tf.reshape(gathered, [-1]), expected)


def test_hand_computed_2x2x3_example():
    # Depth 2, height 2, width 3: the second width window is half padding. Window-local index
    # = (dz * 2 + dy) * 2 + dx. First window holds 7 twice (local 2 and 7): the first wins.
    x = tf.constant(
        [[[1, 5, 2], [7, 3, 0]], [[4, 6, -1], [2, 7, -3]]], tf.float32, shape=(1, 2, 2, 3, 1)
    )
    pooled, argmax = max_pool_with_argmax(x)
    np.testing.assert_array_equal(tf.reshape(pooled, [-1]), [7.0, 2.0])
    np.testing.assert_array_equal(tf.reshape(argmax, [-1]), [2, 0])
    expected = [[[0, 0, 2], [7, 0, 0]], [[0, 0, 0], [0, 0, 0]]]
    np.testing.assert_array_equal(max_unpool(pooled, argmax, 2, x)[0, ..., 0], expected)


# --- dtypes, padding value, XLA --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@JIT
def test_low_precision_dtypes_pool_exactly(dtype, jit):
    x = _random((2, 7, 6, 5, 3), dtype=dtype)
    pooled, argmax = max_pool_with_argmax(x, jit_compile=jit)
    unpooled = max_unpool(pooled, argmax, 2, x, jit_compile=jit)
    assert pooled.dtype == dtype and unpooled.dtype == dtype
    expected = tf.nn.max_pool3d(tf.cast(x, tf.float32), 2, 2, "SAME")
    np.testing.assert_array_equal(tf.cast(pooled, tf.float32), expected)
    kept = tf.cast(unpooled, tf.float32) != 0
    np.testing.assert_array_equal(
        tf.boolean_mask(x, kept), tf.boolean_mask(tf.cast(unpooled, dtype), kept)
    )


@pytest.mark.parametrize(
    ("dtype", "lowest"),
    [("float32", -3.4028234664e38), ("bfloat16", -3.3895313892e38), ("float16", -65504.0)],
)
def test_padding_value_is_the_lowest_finite_value_of_the_dtype(dtype, lowest):
    # White-box: with this module's select-based unpooling a -inf pad would not show as nan, so
    # the rule (finite padding, of the compute dtype) is checked on the helper the kernel uses.
    assert _lowest_finite(dtype) == pytest.approx(lowest, rel=1e-9)
    assert bool(tf.math.is_finite(tf.constant(_lowest_finite(dtype), dtype)))


@pytest.mark.parametrize(
    ("policy", "value"),
    [("mixed_float16", -65000.0), ("mixed_bfloat16", -3.0e38), ("float32", -3.0e38)],
)
def test_padding_with_lowest_finite_value_gives_no_inf_or_nan(policy, value):
    # The layer computes in the policy's dtype, so the padding must be that dtype's lowest.
    x = tf.fill((1, 5, 7, 3, 2), value)
    pool = MaxPoolingWithArgmax(dtype=policy)
    unpool = MaxUnpoolingWithArgmax(dtype=policy)
    pooled, argmax = pool(x)
    unpooled = unpool([pooled, argmax, x])
    assert unpooled.shape == x.shape
    assert bool(tf.reduce_all(tf.math.is_finite(tf.cast(unpooled, tf.float32))))
    assert bool(
        tf.reduce_all(
            tf.cast(pooled, tf.float32) == tf.cast(tf.cast(value, pooled.dtype), tf.float32)
        )
    )
    assert int(tf.math.count_nonzero(unpooled)) == math.prod(pooled.shape)


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 7, 6, 5, 2)])
def test_whole_step_under_xla_equals_eager(shape):
    x, g = _random(shape, seed=7), _random(shape, seed=8)

    def step(x, jit):
        with tf.GradientTape() as tape:
            tape.watch(x)
            pooled, argmax = max_pool_with_argmax(x, jit_compile=jit)
            out = max_unpool(pooled * 2.0, argmax, 2, x, jit_compile=jit)
        return out, tape.gradient(out, x, output_gradients=g)

    eager = step(x, jit=False)
    compiled = tf.function(step, jit_compile=True)(x, True)
    for expected, got in zip(eager, compiled):
        np.testing.assert_array_equal(got, expected)


# --- Keras functional use and serialization --------------------------------------------------


def _tiny_model(input_shape: tuple) -> keras.Model:
    inputs = keras.Input(input_shape)
    pooled, argmax = MaxPoolingWithArgmax(pool_size=2)(inputs)
    features = keras.layers.Conv3D(input_shape[-1], 3, padding="same")(pooled)
    unpooled = MaxUnpoolingWithArgmax(pool_size=2)([features, argmax, inputs])
    outputs = keras.layers.Conv3D(4, 1)(unpooled)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    ("input_shape", "run_shape"),
    [((17, 18, 19, 2), (2, 17, 18, 19, 2)), ((None, None, None, 1), (2, 9, 6, 5, 1))],
)
def test_functional_model_with_symbolic_sizes(input_shape, run_shape):
    model = _tiny_model(input_shape)
    assert model.output_shape == (None, *input_shape[:-1], 4)
    assert model(_random(run_shape)).shape == (*run_shape[:-1], 4)
    x = _random(run_shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None and bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)
    predicted = tf.function(model)(x)  # Traced graph with the batch unknown.
    np.testing.assert_allclose(predicted, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_class", [MaxPoolingWithArgmax, MaxUnpoolingWithArgmax])
def test_get_config_round_trip(layer_class):
    layer = layer_class(pool_size=(2, 3, 1), jit_compile=False, name="p")
    config = layer.get_config()
    assert config["pool_size"] == (2, 3, 1) and config["jit_compile"] is False
    assert layer_class.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is layer_class and restored.get_config() == config


def test_saved_model_reloads_without_custom_objects(tmp_path):
    model = _tiny_model((17, 18, 19, 2))
    x = _random((1, 17, 18, 19, 2))
    model.save(tmp_path / "tiny.keras")
    reloaded = keras.saving.load_model(tmp_path / "tiny.keras")
    np.testing.assert_array_equal(reloaded(x), model(x))


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        max_pool_with_argmax(tf.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="3 positive ints"):
        max_pool_with_argmax(tf.zeros((1, 4, 4, 4, 2)), (2, 2))
    with pytest.raises(ValueError, match="at most 256"):
        max_pool_with_argmax(tf.zeros((1, 7, 7, 7, 1)), 7)
    with pytest.raises(ValueError, match=r"\[values, argmax, reference\]"):
        MaxUnpoolingWithArgmax()([tf.zeros((1, 2, 2, 1))])


# --- property-based --------------------------------------------------------------------------


@st.composite
def _integer_volumes(draw):
    nd = draw(st.sampled_from([2, 3]))
    spatial = draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd))
    pool = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    shape = (draw(st.integers(1, 2)), *spatial, draw(st.integers(1, 2)))
    seed = draw(st.integers(0, 2**16))
    # Values 1..3 force ties and keep every maximum non-zero, so it shows in the unpooled map.
    values = np.random.default_rng(seed).integers(1, 4, size=shape).astype(np.float32)
    return values, pool


@settings(max_examples=25, deadline=None)
@given(_integer_volumes(), st.booleans())
def test_property_one_maximum_per_window(volume, jit):
    values, pool = volume
    x = tf.constant(values)
    pooled, argmax = max_pool_with_argmax(x, pool, jit_compile=jit)
    windows = _numpy_windows(values, pool, -np.inf)
    np.testing.assert_array_equal(pooled, windows.max(-1))
    np.testing.assert_array_equal(argmax, windows.argmax(-1))  # np.argmax: first maximum.
    unpooled = max_unpool(pooled, argmax, pool, x, jit_compile=jit).numpy()
    assert unpooled.shape == values.shape
    unpooled_windows = _numpy_windows(unpooled, pool, 0.0)
    np.testing.assert_array_equal(np.count_nonzero(unpooled_windows, axis=-1), 1)
    np.testing.assert_array_equal(unpooled_windows.argmax(-1), windows.argmax(-1))
    np.testing.assert_array_equal(unpooled_windows.sum(-1), windows.max(-1))
