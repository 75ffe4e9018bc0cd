"""Tests for segnet.inference.sliding_window: window geometry, blending and exact equivalence.

The key check: a per-voxel linear map of the channels is translation- and flip-equivariant and
sees no context, so sliding-window inference with it must equal one pass over the whole volume
for every weighting, overlap, batch size, mirroring and accumulator.
"""

from __future__ import annotations

import segnet  # noqa: F401  (first: sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)

# isort: split
import itertools
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from segnet.inference import sliding_window as sw
from segnet.inference.sliding_window import (
    MIN_IMPORTANCE,
    importance_map,
    probabilities_to_labels,
    sliding_window_inference,
    window_positions,
    window_starts,
)

NUM_CLASSES = 3
CHANNELS = 2
_KERNEL = np.array([[1.5, -0.7, 0.2], [-0.4, 0.9, 1.1]], np.float32)  # (channels, classes)
_BIAS = np.array([0.1, -0.3, 0.2], np.float32)


def _volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*shape, CHANNELS)).astype(np.float32)


def _linear(x: tf.Tensor) -> tf.Tensor:
    """Per-voxel logits = channels @ kernel + bias (a 1x1x1 convolution), any rank."""
    return tf.einsum("...c,ck->...k", x, _KERNEL) + _BIAS


def _assert_close(actual: np.ndarray, desired: np.ndarray, atol: float = 1e-6) -> None:
    # float32 sums over up to (1 / (1 - overlap))**3 windows: a few ulp of relative error.
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=atol)


def _direct(volume: np.ndarray) -> np.ndarray:
    return tf.nn.softmax(_linear(volume), axis=-1).numpy()


def _with_ramp(x: tf.Tensor) -> tf.Tensor:
    """_linear plus a ramp along each window axis: depends on where a voxel sits in the window."""
    ramps = [
        tf.reshape(
            tf.linspace(-1.0, 1.0, x.shape[axis]), [-1 if a == axis else 1 for a in range(5)]
        )
        for axis in (1, 2, 3)
    ]
    return _linear(x) + (ramps[0] - ramps[1] * ramps[2]) * np.array([1.0, 0.0, -1.0], np.float32)


def _reference(volume: np.ndarray, window, overlap: float, weighting: str) -> np.ndarray:
    """Brute-force float64 blending, one window at a time (no padding needed: volume >= window)."""
    importance = importance_map(window, weighting).astype(np.float64)
    total = np.zeros((*volume.shape[:3], NUM_CLASSES))
    weight = np.zeros(volume.shape[:3])
    for d, h, w in window_positions(volume.shape[:3], window, overlap):
        region = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
        probabilities = tf.nn.softmax(_with_ramp(volume[region][None]), axis=-1).numpy()[0]
        total[region] += probabilities * importance[..., None]
        weight[region] += importance
    return total / weight[..., None]


@pytest.fixture(params=["host", "device"])
def accumulate_on_cpu(request, monkeypatch) -> bool:
    """Both accumulators; the device one is used on CPU-only machines only when forced."""
    monkeypatch.setattr(sw, "_accelerator_present", lambda: True)
    return request.param == "host"


# --- Window geometry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, window, overlap, expected",
    [
        (17, 8, 0.5, [0, 3, 6, 9]),
        (18, 8, 0.5, [0, 3, 7, 10]),
        (19, 8, 0.5, [0, 4, 7, 11]),
        (16, 8, 0.0, [0, 8]),
        (17, 8, 0.0, [0, 4, 9]),
        (8, 8, 0.5, [0]),
        (5, 8, 0.5, [0]),
        (4, 1, 0.5, [0, 1, 2, 3]),  # a 1-voxel window (2D slices) steps one voxel, not 0.5
    ],
)
def test_window_starts_known_values(size, window, overlap, expected):
    assert window_starts(size, window, overlap) == expected


@pytest.mark.parametrize(
    "size, window, overlap",
    [(17, 8, 0.5), (19, 8, 0.75), (33, 7, 0.3), (155, 64, 0.5), (240, 128, 0.5), (50, 1, 0.9)],
)
def test_window_starts_cover_axis_and_keep_overlap(size, window, overlap):
    starts = window_starts(size, window, overlap)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + window] = True
    steps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] + window == size
    assert covered.all()
    # Evenly spaced to whole voxels, and on average no longer than the overlap allows.
    assert steps.min() >= 1 and steps.max() - steps.min() <= 1
    assert steps.mean() <= max(window * (1 - overlap), 1)


@pytest.mark.parametrize("shape, window", [((17, 18, 19), (8, 8, 8)), ((17, 18, 19), (5, 18, 7))])
def test_window_positions_cover_volume_and_end_at_edges(shape, window):
    positions = window_positions(shape, window, 0.5)
    hits = np.zeros(shape, int)
    for d, h, w in positions:
        hits[d : d + window[0], h : h + window[1], w : w + window[2]] += 1
    assert hits.min() >= 1
    for axis in range(3):
        assert max(p[axis] for p in positions) + window[axis] == shape[axis]


# --- Importance map -----------------------------------------------------------------------


@pytest.mark.parametrize("window", [(8, 8, 8), (7, 9, 10), (1, 8, 6)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.5, 0.02])
def test_gaussian_map_is_symmetric_positive_and_peaks_in_centre(window, sigma_scale):
    weights = importance_map(window, "gaussian", sigma_scale)
    centre = tuple(slice((w - 1) // 2, w // 2 + 1) for w in window)
    assert weights.shape == window and weights.dtype == np.float32
    for axis in range(3):
        np.testing.assert_array_equal(weights, np.flip(weights, axis))
    assert weights.max() == 1.0 and (weights[centre] == 1.0).all()
    assert weights.min() >= MIN_IMPORTANCE
    # Falls off monotonically from the centre along each axis (the half from centre to edge).
    for axis, w in enumerate(window):
        through_centre: list[int | slice] = [size // 2 for size in window]
        through_centre[axis] = slice(None)
        assert (np.diff(weights[tuple(through_centre)][w // 2 :]) <= 0).all()


def test_gaussian_map_floors_underflowing_tails():
    weights = importance_map((32, 32, 32), "gaussian", sigma_scale=0.01)
    assert weights[0, 0, 0] == np.float32(MIN_IMPORTANCE)


def test_constant_map_is_ones():
    np.testing.assert_array_equal(importance_map((3, 4, 5), "constant"), np.ones((3, 4, 5)))


# --- Equivalence with a whole-volume pass -------------------------------------------------


@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_equivariant_model_matches_whole_volume(weighting, overlap):
    volume = _volume((17, 18, 19))
    result = sliding_window_inference(
        volume, _linear, (8, 8, 8), num_classes=NUM_CLASSES, overlap=overlap, weighting=weighting
    )
    assert result.shape == (17, 18, 19, NUM_CLASSES) and result.dtype == np.float32
    _assert_close(result, _direct(volume))


@pytest.mark.parametrize(
    "shape, window",
    [
        ((5, 18, 3), (8, 8, 8)),  # smaller than the window along two axes: padded, cropped back
        ((8, 8, 8), (8, 8, 8)),
        ((4, 4, 4), (8, 8, 8)),
        ((17, 18, 19), (16, 5, 19)),
    ],
)
def test_shapes_and_padding_match_whole_volume(shape, window, accumulate_on_cpu):
    volume = _volume(shape)
    result = sliding_window_inference(
        volume, _linear, window, num_classes=NUM_CLASSES, accumulate_on_cpu=accumulate_on_cpu
    )
    _assert_close(result, _direct(volume))


def test_short_axes_are_zero_padded_half_on_each_side():
    volume = _volume((5, 8, 3))
    padded = np.pad(volume, [(1, 2), (0, 0), (2, 3), (0, 0)])  # to the (8, 8, 8) window
    expected = tf.nn.softmax(_with_ramp(padded[None]), axis=-1).numpy()[0, 1:6, :, 2:5]
    result = sliding_window_inference(volume, _with_ramp, (8, 8, 8), num_classes=NUM_CLASSES)
    _assert_close(result, expected)


@pytest.mark.parametrize("mirror_axes", [(0,), (1, 2), (0, 1, 2)])
def test_mirroring_an_equivariant_model_changes_nothing(mirror_axes):
    volume = _volume((17, 18, 19))
    result = sliding_window_inference(
        volume, _linear, (8, 8, 8), num_classes=NUM_CLASSES, mirror_axes=mirror_axes, batch_size=8
    )
    _assert_close(result, _direct(volume))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mirroring_averages_predictions_flipped_back(axis):
    shape = (6, 7, 5)  # one window covering the volume, so the blend is that window alone

    def ramp(x):  # class 0's logit = the voxel's index along `axis` inside the window
        index = tf.reshape(
            tf.range(shape[axis], dtype=tf.float32), [-1 if a == axis + 1 else 1 for a in range(5)]
        )
        return tf.concat(
            [
                tf.broadcast_to(index, tf.concat([tf.shape(x)[:4], [1]], 0)),
                tf.zeros(tf.concat([tf.shape(x)[:4], [1]], 0)),
            ],
            -1,
        )

    index = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
    plain = 1 / (1 + np.exp(-index))  # softmax([i, 0])[0]
    mirrored = (plain + 1 / (1 + np.exp(-(shape[axis] - 1 - index)))) / 2
    kwargs = dict(num_classes=2, batch_size=1)
    unmirrored = sliding_window_inference(_volume(shape), ramp, shape, **kwargs)
    result = sliding_window_inference(_volume(shape), ramp, shape, mirror_axes=(axis,), **kwargs)
    _assert_close(unmirrored[..., 0], np.broadcast_to(plain, shape))
    _assert_close(result[..., 0], np.broadcast_to(mirrored, shape))


# --- Blending of a position-dependent model -----------------------------------------------


@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.7])
def test_blending_matches_brute_force_reference(weighting, overlap):
    volume = _volume((17, 18, 19), seed=1)
    result = sliding_window_inference(
        volume, _with_ramp, (8, 9, 7), num_classes=NUM_CLASSES, overlap=overlap, weighting=weighting
    )
    _assert_close(result, _reference(volume, (8, 9, 7), overlap, weighting))


def test_gaussian_and_constant_weighting_differ_for_a_position_dependent_model():
    volume = _volume((17, 18, 19))
    kwargs = dict(num_classes=NUM_CLASSES, overlap=0.5)
    gaussian = sliding_window_inference(
        volume, _with_ramp, (8, 8, 8), weighting="gaussian", **kwargs
    )
    constant = sliding_window_inference(
        volume, _with_ramp, (8, 8, 8), weighting="constant", **kwargs
    )
    assert np.abs(gaussian - constant).max() > 1e-3


@pytest.mark.parametrize("batch_size", [2, 3, 7, 64])
def test_batch_size_and_accumulator_do_not_change_the_result(batch_size, accumulate_on_cpu):
    volume = _volume((17, 18, 19), seed=2)
    kwargs = dict(num_classes=NUM_CLASSES, mirror_axes=(1,))
    baseline = sliding_window_inference(
        volume, _with_ramp, (8, 8, 8), batch_size=1, accumulate_on_cpu=True, **kwargs
    )
    result = sliding_window_inference(
        volume,
        _with_ramp,
        (8, 8, 8),
        batch_size=batch_size,
        accumulate_on_cpu=accumulate_on_cpu,
        **kwargs,
    )
    _assert_close(result, baseline)


@pytest.mark.parametrize(
    "accelerator, accumulate_on_cpu, expected",
    [(True, False, "_DeviceAccumulator"), (True, True, "_HostAccumulator"),
     (False, False, "_HostAccumulator"), (False, True, "_HostAccumulator")],
)  # fmt: skip
def test_accumulator_choice(monkeypatch, accelerator, accumulate_on_cpu, expected):
    used = []
    for name in ("_DeviceAccumulator", "_HostAccumulator"):
        original = getattr(sw, name)
        monkeypatch.setattr(
            sw, name, lambda *a, name=name, original=original: used.append(name) or original(*a)
        )
    monkeypatch.setattr(sw, "_accelerator_present", lambda: accelerator)
    sliding_window_inference(
        _volume((9, 9, 9)), _linear, (8, 8, 8), num_classes=NUM_CLASSES,
        accumulate_on_cpu=accumulate_on_cpu,
    )  # fmt: skip
    assert used == [expected]


def test_probabilities_sum_to_one():
    result = sliding_window_inference(_volume((17, 18, 19)), _with_ramp, (8, 8, 8), num_classes=3)
    np.testing.assert_allclose(result.sum(-1), 1.0, atol=1e-5)


# --- Models, tracing, 2D ------------------------------------------------------------------


def test_keras_model_matches_its_whole_volume_output():
    inputs = keras.Input((None, None, None, CHANNELS))
    model = keras.Model(inputs, keras.layers.Conv3D(NUM_CLASSES, 1)(inputs))
    volume = _volume((17, 18, 19))
    result = sliding_window_inference(volume, model, (8, 8, 8), num_classes=NUM_CLASSES)
    expected = tf.nn.softmax(model(volume[None]), axis=-1).numpy()[0]
    _assert_close(result, expected, atol=1e-5)


def test_model_is_traced_once_across_batches_and_volumes():
    traces = []

    def counted(x):
        traces.append(x.shape)  # Python side effects run only while tracing
        return _linear(x)

    kwargs = dict(num_classes=NUM_CLASSES, batch_size=3)
    sliding_window_inference(_volume((17, 18, 19)), counted, (8, 8, 8), **kwargs)  # 64 windows
    sliding_window_inference(_volume((10, 12, 9)), counted, (8, 8, 8), **kwargs)
    assert traces == [(None, 8, 8, 8, CHANNELS)]  # the last, partial batch included


def test_the_model_runs_only_real_windows():
    rows = tf.Variable(0)

    def counted(x):
        rows.assign_add(tf.shape(x)[0])
        return _linear(x)

    small = _volume((5, 6, 7))  # one window, padded: one row, not a batch of 4
    result = sliding_window_inference(
        small, counted, (8, 8, 8), num_classes=NUM_CLASSES, batch_size=4
    )
    assert int(rows.numpy()) == 1
    _assert_close(result, _direct(small))
    rows.assign(0)
    sliding_window_inference(
        _volume((17, 8, 8)), counted, (8, 8, 8), num_classes=NUM_CLASSES, overlap=0.5, batch_size=3
    )  # 4 windows: batches of 3 and 1
    assert int(rows.numpy()) == 4


def test_2d_model_sees_slices_and_matches_whole_volume():
    seen = []

    def slice_model(x):
        seen.append(tuple(x.shape))
        return _linear(x)

    volume = _volume((7, 18, 19))
    result = sliding_window_inference(
        volume, slice_model, (1, 8, 8), num_classes=NUM_CLASSES, spatial_dims=2, batch_size=6,
        mirror_axes=(0, 1, 2),  # axis 0 is ignored: a slice has no depth to flip
    )  # fmt: skip
    _assert_close(result, _direct(volume))
    assert seen == [(None, 8, 8, CHANNELS)] * 4  # traced once, four flips (axes 1 and 2 only)


def test_progress_reports_every_batch():
    calls = []
    sliding_window_inference(
        _volume((17, 18, 19)),
        _linear,
        (8, 8, 8),
        num_classes=NUM_CLASSES,
        batch_size=5,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = len(window_positions((17, 18, 19), (8, 8, 8), 0.5))
    assert calls == [(min(done, total), total) for done in range(5, total + 5, 5)]


# --- Errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "volume_shape, window, kwargs, match",
    [
        ((17, 18, 19), (8, 8, 8), {}, "channels"),
        ((17, 18, 19, 2), (8, 8), {}, "window must be 3"),
        ((17, 18, 19, 2), (8, 8, 8), {"overlap": 1.0}, "overlap"),
        ((17, 18, 19, 2), (8, 8, 8), {"weighting": "gauss"}, "weighting"),
        ((17, 18, 19, 2), (8, 8, 8), {"batch_size": 0}, "batch_size"),
        ((17, 18, 19, 2), (8, 8, 8), {"mirror_axes": (3,)}, "mirror_axes"),
        ((17, 18, 19, 2), (8, 8, 8), {"sigma_scale": 0.0}, "sigma_scale"),
        ((17, 18, 19, 2), (8, 8, 8), {"num_classes": 1}, "num_classes"),
        ((17, 18, 19, 2), (2, 8, 8), {"spatial_dims": 2}, r"use window \(1, 8, 8\)"),
    ],
)
def test_bad_arguments_are_named(volume_shape, window, kwargs, match):
    kwargs = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(np.zeros(volume_shape, np.float32), _linear, window, **kwargs)


@pytest.mark.parametrize(
    "predict_fn, match",
    [
        (lambda x: _linear(x)[..., :2], "num_classes"),
        (lambda x: _linear(x)[:, ::2], "spatial size"),
        (lambda x: [_linear(x), _linear(x)], "2 outputs"),
    ],
)
def test_wrong_model_outputs_are_explained(predict_fn, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(_volume((9, 9, 9)), predict_fn, (8, 8, 8), num_classes=NUM_CLASSES)


def test_probabilities_to_labels_takes_argmax_with_ties_to_lower_class():
    probabilities = np.array([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]], np.float32)
    labels = probabilities_to_labels(probabilities)
    np.testing.assert_array_equal(labels, [1, 0, 2])
    assert labels.dtype == np.uint8


def test_compiled_forward_cache_is_bounded():
    for i in range(sw._CACHE_SIZE + 3):
        sliding_window_inference(
            _volume((4, 4, 4)), lambda x, i=i: _linear(x) * (1 + i), (4, 4, 4), num_classes=3
        )
    assert len(sw._forward_cache) == sw._CACHE_SIZE


# --- Scale --------------------------------------------------------------------------------


@pytest.mark.slow  # about 4 s on 2 cores: 18 windows of 128^3 and a 240x240x155x3 accumulator
def test_brats_sized_volume_finishes_quickly():
    volume = _volume((240, 240, 155))
    start = time.perf_counter()
    result = sliding_window_inference(volume, _linear, (128, 128, 128), num_classes=NUM_CLASSES)
    elapsed = time.perf_counter() - start
    assert result.shape == (240, 240, 155, NUM_CLASSES)
    _assert_close(result[::7, ::7, ::7], _direct(volume[::7, ::7, ::7]))
    assert elapsed < 60, f"{elapsed:.1f} s for 240x240x155"


# --- Ensembles --------------------------------------------------------------------------------


def _damped_ramp(x: tf.Tensor) -> tf.Tensor:
    """Another position-dependent model, disagreeing with _with_ramp on most voxels."""
    return 0.5 - 0.7 * _with_ramp(x[..., ::-1])


def _mean_softmax_by_hand(volume: np.ndarray, models, mirror_axes: tuple[int, ...]) -> np.ndarray:
    """The mean over models and mirrorings of the softmax of one pass over the whole volume."""
    probabilities = []
    for model in models:
        for r in range(len(mirror_axes) + 1):
            for subset in itertools.combinations(mirror_axes, r):
                axes = [a + 1 for a in subset]
                logits = model(tf.constant(np.flip(volume[None], axes)))
                probabilities.append(np.flip(tf.nn.softmax(logits).numpy(), axes)[0])
    return np.mean(probabilities, axis=0)


@pytest.mark.parametrize("mirror_axes", [(), (0, 2)])
def test_an_ensemble_gives_the_mean_of_its_models_softmax(mirror_axes):
    shape = (6, 7, 5)  # one window covering the volume, so the blend is that window alone
    volume = _volume(shape, seed=3)
    models = [_with_ramp, _damped_ramp]
    result = sliding_window_inference(
        volume, models, shape, num_classes=NUM_CLASSES, mirror_axes=mirror_axes
    )
    _assert_close(result, _mean_softmax_by_hand(volume, models, mirror_axes))
    single = _mean_softmax_by_hand(volume, models[:1], mirror_axes)
    assert np.abs(result - single).max() > 0.05  # the second model does count


def test_an_ensemble_blends_in_probability_space(accumulate_on_cpu):
    volume = _volume((17, 18, 19), seed=4)
    kwargs = dict(num_classes=NUM_CLASSES, overlap=0.5, mirror_axes=(1,), batch_size=3)
    kwargs["accumulate_on_cpu"] = accumulate_on_cpu
    first = sliding_window_inference(volume, _with_ramp, (8, 9, 7), **kwargs)
    second = sliding_window_inference(volume, _damped_ramp, (8, 9, 7), **kwargs)
    ensemble = sliding_window_inference(volume, (_with_ramp, _damped_ramp), (8, 9, 7), **kwargs)
    _assert_close(ensemble, (first + second) / 2)


def test_an_ensemble_of_one_model_twice_is_that_model_bit_for_bit():
    volume = _volume((17, 18, 19), seed=5)
    kwargs = dict(num_classes=NUM_CLASSES, overlap=0.5, mirror_axes=(0, 1, 2), batch_size=2)
    single = sliding_window_inference(volume, _with_ramp, (8, 9, 7), **kwargs)
    twice = sliding_window_inference(volume, [_with_ramp, _with_ramp], (8, 9, 7), **kwargs)
    np.testing.assert_array_equal(twice, single)
