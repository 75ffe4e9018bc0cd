"""Sliding-window inference: softmax probabilities for a whole volume from a windowed model.

A model trained on patches predicts a volume one window at a time. Along every axis the windows
overlap by ``overlap`` of their size, the first starts at 0 and the last ends exactly at the
volume's edge (nnU-Net's ``compute_steps_for_sliding_window``). Each window's softmax is
multiplied by an importance map (a Gaussian centred on the window, because voxels near a
window's border saw the least context), summed into an accumulator, and divided by the summed
importance at the end. Where one window covers a voxel the result is that window's softmax; where
several do, it is their importance-weighted mean.

Speed: the forward pass (model, mirroring, softmax, weighting) is one ``tf.function`` with the
input signature ``(None, *window, channels)``. It is cached per (predict_fns, window,
channels, classes, mirror axes, spatial dims), so evaluating many cases of any size
traces the model once; a volume's last batch holds only its real windows, run under the same
trace (zero-filled rows would cost a one-window volume ``batch_size`` forward passes). The cache
keeps the last few predict_fns (and so their models) alive; pass the same callable for every
case.

Memory: the input (padded only when smaller than the window), an accumulator of
(depth, height, width, classes) float32 on the host or the accelerator, a (depth, height, width)
float32 importance sum on the host, and one batch of windows at a time. A 512x512x400 CT with
3 classes needs about 1.3 GB for the accumulator (twice that briefly when it leaves a device).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig

Window = tuple[int, int, int]
Position = tuple[int, int, int]
PredictFn = Callable[[tf.Tensor], tf.Tensor]
Progress = Callable[[int, int], None]
Weighting = Literal["gaussian", "constant"]

WEIGHTINGS = ("gaussian", "constant")
# The Gaussian's tails underflow to 0 for small sigma_scale; a floor keeps every voxel's weight
# sum positive, so voxels that only a window's border covers still get that window's softmax.
MIN_IMPORTANCE = 1e-6
# Compiled forward passes kept alive (a cascade evaluates two models, a sweep a few more).
_CACHE_SIZE = 4


# ---------------------------------------------------------------------------------------------
# Window geometry
# ---------------------------------------------------------------------------------------------
def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis.

    ``n = ceil((size - window) / (window * (1 - overlap))) + 1`` starts, evenly spaced from 0
    to ``size - window`` and rounded to whole voxels, so neighbours share at least ``overlap``
    of the window (give or take the rounding's half voxel) and the last window ends exactly at
    ``size``. Steps are at least one voxel, so a window of 1 never revisits a slice.

    Args:
        size: the axis length; a size below ``window`` gives ``[0]`` (the caller pads).
        window: the window length along the axis, >= 1.
        overlap: fraction of the window shared by neighbours, in [0, 1).

    Returns:
        Increasing start offsets, the first 0 and the last ``max(size - window, 0)``.
    """
    span = size - window
    if span <= 0:
        return [0]
    target_step = max(window * (1.0 - overlap), 1.0)
    # Rounding first keeps float noise (e.g. 8 * 0.3 = 2.4000000000000004) from adding a step.
    steps = math.ceil(round(span / target_step, 9)) + 1
    return [round(span * i / (steps - 1)) for i in range(steps)]


def window_positions(shape: Sequence[int], window: Window, overlap: float) -> list[Position]:
    """Start corners (depth, height, width) of every window, in C order over the grid."""
    per_axis = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return list(itertools.product(*per_axis))  # type: ignore[arg-type]  # three axes


def importance_map(
    window: Window, weighting: Weighting = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """The weight of each voxel of a window's prediction.

    ``gaussian``: a separable Gaussian with sigma = window * sigma_scale per axis, centred on
    the window's centre ((w - 1) / 2, so it is exactly symmetric for even sizes too), scaled to
    a peak of 1 and floored at ``MIN_IMPORTANCE``. ``constant``: ones.

    Returns:
        float32 array of shape ``window``, every value in [MIN_IMPORTANCE, 1].
    """
    if weighting == "constant":
        return np.ones(window, np.float32)
    profiles = []
    for size in window:
        offsets = np.arange(size) - (size - 1) / 2
        profiles.append(np.exp(-0.5 * (offsets / (size * sigma_scale)) ** 2))
    gaussian = functools.reduce(np.multiply.outer, profiles)
    gaussian /= gaussian.max()
    return np.maximum(gaussian, MIN_IMPORTANCE).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _cached_importance_map(window: Window, weighting: Weighting, sigma_scale: float) -> np.ndarray:
    # 50 ms for a 128^3 window: worth keeping across the cases of an evaluation.
    importance = importance_map(window, weighting, sigma_scale)
    importance.flags.writeable = False
    return importance


def _region(start: Position, window: Window) -> tuple[slice, slice, slice]:
    return tuple(slice(s, s + w) for s, w in zip(start, window))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The compiled forward pass
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ForwardSpec:
    """Everything the traced graph depends on besides predict_fn (the cache key)."""

    window: Window
    channels: int
    num_classes: int
    mirror_axes: tuple[int, ...]
    spatial_dims: int


_forward_cache: collections.OrderedDict[tuple[object, _ForwardSpec], Callable] = (
    collections.OrderedDict()
)


def _compiled_forward(predict_fns: tuple[PredictFn, ...], spec: _ForwardSpec) -> Callable:
    """The cached ``forward(batch, importance) -> weighted probabilities`` for predict_fns."""
    key = (predict_fns, spec)
    try:
        forward = _forward_cache.pop(key)
    except KeyError:
        forward = _build_forward(predict_fns, spec)
    except TypeError:  # an unhashable callable: compile it for this call only
        return _build_forward(predict_fns, spec)
    _forward_cache[key] = forward  # most recently used last
    while len(_forward_cache) > _CACHE_SIZE:
        _forward_cache.popitem(last=False)
    return forward


def _build_forward(predict_fns: tuple[PredictFn, ...], spec: _ForwardSpec) -> Callable:
    # Every subset of the mirror axes, the empty one included, as axes of the batch tensor.
    flips = [
        [axis + 1 for axis in subset]
        for r in range(len(spec.mirror_axes) + 1)
        for subset in itertools.combinations(spec.mirror_axes, r)
    ]
    # The batch axis is open: a volume's last batch runs only its real windows (a one-window
    # volume would otherwise pay for batch_size forward passes), under the same trace.
    batch_spec = tf.TensorSpec((None, *spec.window, spec.channels), tf.float32)

    @tf.function(input_signature=(batch_spec, tf.TensorSpec(spec.window, tf.float32)))
    def forward(batch: tf.Tensor, importance: tf.Tensor) -> tf.Tensor:
        importance /= len(flips) * len(predict_fns)
        total = _summed_softmax(predict_fns, batch, importance, spec)
        for axes in flips[1:]:  # a Python loop: unrolled once, at trace time
            weighted = _summed_softmax(predict_fns, tf.reverse(batch, axes), importance, spec)
            # Weighting before flipping back is exact: importance maps are mirror-symmetric.
            total += tf.reverse(weighted, axes)
        return total

    return forward


def _summed_softmax(
    predict_fns: tuple[PredictFn, ...], batch: tf.Tensor, importance: tf.Tensor, spec: _ForwardSpec
) -> tf.Tensor:
    """The sum over models of ``softmax(logits) * importance`` for one (flipped) batch.

    Summed over the models before the flips, so an ensemble of one model's copies adds exact
    halves (quarters...) of that model's values and gives its probabilities bit for bit.
    """
    return tf.add_n([_weighted_softmax(_logits(fn, batch, spec), importance) for fn in predict_fns])


def _logits(predict_fn: PredictFn, batch: tf.Tensor, spec: _ForwardSpec) -> tf.Tensor:
    """predict_fn on (batch, *window, channels) as float32; 2D models see depth squeezed."""
    outputs = predict_fn(batch[:, 0] if spec.spatial_dims == 2 else batch)
    if isinstance(outputs, list | tuple | dict):
        raise ValueError(
            f"predict_fn returned {len(outputs)} outputs; sliding-window inference needs the "
            "full-resolution logits alone, e.g. predict_fn=lambda x: model(x)[0]"
        )
    logits = tf.cast(outputs, tf.float32)
    expected = (None, *spec.window[3 - spec.spatial_dims :], spec.num_classes)
    if not logits.shape.is_compatible_with(expected):
        raise ValueError(
            f"predict_fn returned logits of shape {tuple(logits.shape)}, expected {expected} "
            f"(batch, *window, num_classes) for a {spec.spatial_dims}D model; check "
            "num_classes and that the model keeps the input's spatial size"
        )
    logits = tf.ensure_shape(logits, expected)
    return logits[:, tf.newaxis] if spec.spatial_dims == 2 else logits


@tf.function(jit_compile=True)
def _weighted_softmax(logits: tf.Tensor, importance: tf.Tensor) -> tf.Tensor:
    """``softmax(logits) * importance`` for (batch, *window, classes) logits, (*window) weights.

    XLA fuses the passes that TensorFlow's kernels make one by one over this large tensor
    (about 30 % less CPU time for a 2x128^3x4 batch); the model itself stays outside XLA.
    """
    return tf.nn.softmax(logits, axis=-1) * importance[..., tf.newaxis]


# ---------------------------------------------------------------------------------------------
# Accumulators
# ---------------------------------------------------------------------------------------------
class _HostAccumulator:
    """Sums weighted windows into a numpy array: the device holds one batch at a time."""

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        self.total = np.zeros((*shape, num_classes), np.float32)

    def add(self, weighted: tf.Tensor, starts: Sequence[Position], window: Window) -> None:
        values = weighted.numpy()
        for value, start in zip(values, starts):
            self.total[_region(start, window)] += value

    def result(self) -> np.ndarray:
        return self.total


class _DeviceAccumulator:
    """Sums weighted windows into a tf.Variable, so probabilities never cross to the host."""

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        self.total = tf.Variable(tf.zeros((*shape, num_classes), tf.float32), trainable=False)

    def add(self, weighted: tf.Tensor, starts: Sequence[Position], window: Window) -> None:
        _add_windows(self.total, weighted, tf.constant(starts, tf.int32), tf.constant(window))

    def result(self) -> np.ndarray:
        return self.total.numpy()


@tf.function(reduce_retracing=True)
def _add_windows(
    total: tf.Variable, weighted: tf.Tensor, starts: tf.Tensor, window: tf.Tensor
) -> None:
    """total[start : start + window] += weighted[i] for each row i of starts (n, 3)."""
    size = tf.concat([window, [-1]], axis=0)
    for i in tf.range(tf.shape(starts)[0]):
        begin = tf.concat([starts[i], [0]], axis=0)
        region = tf.slice(total.value(), begin, size)
        # The raw op writes in place; ``total[a:b].assign`` keeps a read of the whole variable
        # alive, which makes TensorFlow copy all of it on every write (O(volume) per window).
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=total.handle,
            begin=begin,
            end=begin + tf.shape(region),
            strides=tf.ones_like(begin),
            value=region + weighted[i],
        )


def _accelerator_present() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def _importance_sum(
    shape: Sequence[int], positions: Sequence[Position], importance: np.ndarray
) -> np.ndarray:
    total = np.zeros(shape, np.float32)
    for start in positions:
        total[_region(start, importance.shape)] += importance  # type: ignore[arg-type]
    return total


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
def sliding_window_inference(
    volume: np.ndarray,
    predict_fn: PredictFn | Sequence[PredictFn],
    window: Sequence[int],
    *,
    num_classes: int,
    overlap: float = 0.5,
    weighting: Weighting = "gaussian",
    sigma_scale: float = 0.125,
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    accumulate_on_cpu: bool = False,
    spatial_dims: Literal[2, 3] = 3,
    progress: Progress | None = None,
) -> np.ndarray:
    """Softmax probabilities for a whole volume, predicted window by window.

    Args:
        volume: (depth, height, width, channels), converted to float32. An axis shorter than
            the window is padded with zeros on both sides (half each; inputs are normalised,
            so 0 is the mean intensity under z-scoring) and the result is cropped back.
        predict_fn: ``logits = predict_fn(batch)``, a Keras model (called in inference mode)
            or any TensorFlow-traceable function. 3D: (batch, *window, channels) ->
            (batch, *window, num_classes). 2D (``spatial_dims=2``): (batch, height, width,
            channels) -> (batch, height, width, num_classes). A list or tuple of them is an
            ensemble: the mean of their softmaxes is blended (see the module docstring).
        window: (depth, height, width) of one window; for 2D models (1, height, width), so
            each window is one slice.
        num_classes: classes of the logits, background included (>= 2).
        overlap: fraction of the window shared by neighbouring windows, in [0, 1).
        weighting: ``gaussian`` (see :func:`importance_map`) or ``constant``.
        sigma_scale: the Gaussian's sigma as a fraction of the window.
        batch_size: windows per forward pass.
        mirror_axes: spatial axes (0 depth, 1 height, 2 width) to mirror at test time: the
            softmax is averaged over every subset of these flips (2**len passes per window),
            each flipped back. Axis 0 is ignored for 2D models (a slice has no depth to flip).
        accumulate_on_cpu: sum windows in host memory (numpy) instead of a variable on the
            accelerator, bounding accelerator memory to one batch on very large volumes.
            Without a GPU or TPU, windows are always summed with numpy (host memory is the
            device then, and numpy adds a window there ~6x faster than TensorFlow).
        spatial_dims: 3 for volumetric models, 2 for models that predict slice by slice.
        progress: called as ``progress(windows_done, windows_total)`` after each batch.

    Returns:
        float32 (depth, height, width, num_classes) probabilities summing to 1 per voxel.

    Raises:
        ValueError: for a malformed argument, or logits of the wrong shape.
    """
    size = _check_arguments(
        volume, window, num_classes, overlap, weighting, sigma_scale, batch_size, mirror_axes,
        spatial_dims,
    )  # fmt: skip
    volume = np.asarray(volume, dtype=np.float32)
    padded, crop = _pad_to_window(volume, size)
    axes = sorted({int(a) for a in mirror_axes} - ({0} if spatial_dims == 2 else set()))
    spec = _ForwardSpec(size, volume.shape[-1], num_classes, tuple(axes), spatial_dims)
    positions = window_positions(padded.shape[:3], size, overlap)
    importance = _cached_importance_map(size, weighting, sigma_scale)
    on_device = not accumulate_on_cpu and _accelerator_present()
    accumulator_type = _DeviceAccumulator if on_device else _HostAccumulator
    accumulator = accumulator_type(padded.shape[:3], num_classes)
    predict_fns = tuple(predict_fn) if isinstance(predict_fn, list | tuple) else (predict_fn,)
    forward = _compiled_forward(predict_fns, spec)
    importance_tensor = tf.constant(importance)
    for batch, starts in _window_batches(padded, positions, size, batch_size, progress):
        accumulator.add(forward(batch, importance_tensor), starts, size)
    probabilities = accumulator.result()
    probabilities /= _importance_sum(padded.shape[:3], positions, importance)[..., np.newaxis]
    return probabilities if crop is None else np.ascontiguousarray(probabilities[crop])


def configured_sliding_window(
    volume: np.ndarray,
    predict_fn: PredictFn | Sequence[PredictFn],
    config: ExperimentConfig,
    *,
    spatial_dims: int = 3,
    mirror: bool = True,
) -> np.ndarray:
    """:func:`sliding_window_inference` with a run's ``window`` and ``evaluation`` settings.

    Args:
        volume: (depth, height, width, channels), preprocessed like the training cases.
        predict_fn: as for :func:`sliding_window_inference` (several: an ensemble).
        config: reads ``window``, ``evaluation`` and ``data.num_classes``.
        spatial_dims: 2 for a model that predicts axial slices, else 3. A 2D window is one
            slice, so a batch holds as many slices as a 3D window has (the same memory).
        mirror: apply ``evaluation.mirror_axes``; validation during training turns it off,
            since ranking checkpoints does not need the up to 8x cost.
    """
    evaluation = config.evaluation
    window = tuple(config.window)
    batch_size = evaluation.batch_size
    if spatial_dims == 2:
        batch_size *= window[0]
        window = (1, window[1], window[2])
    return sliding_window_inference(
        volume,
        predict_fn,
        window,
        num_classes=config.data.num_classes,
        overlap=evaluation.overlap,
        weighting=evaluation.weighting,
        sigma_scale=evaluation.sigma_scale,
        batch_size=batch_size,
        mirror_axes=evaluation.mirror_axes if mirror else (),
        accumulate_on_cpu=evaluation.accumulate_on_cpu,
        spatial_dims=2 if spatial_dims == 2 else 3,
    )


def probabilities_to_labels(probabilities: np.ndarray) -> np.ndarray:
    """Argmax over the last axis: (..., classes) -> (...) labels (ties pick the lower class).

    Returns uint8 labels when there are at most 256 classes, else int32.
    """
    dtype = np.uint8 if probabilities.shape[-1] <= 256 else np.int32
    return np.argmax(probabilities, axis=-1).astype(dtype)


def _window_batches(
    volume: np.ndarray,
    positions: Sequence[Position],
    window: Window,
    batch_size: int,
    progress: Progress | None,
) -> Iterator[tuple[np.ndarray, Sequence[Position]]]:
    """Yields ``(batch (len(starts), *window, channels), starts)``, ``batch_size`` windows at a
    time and the rest in the last batch.

    ``progress`` hears of a batch when the consumer asks for the next one (it is done by then).
    """
    for first in range(0, len(positions), batch_size):
        starts = positions[first : first + batch_size]
        # A fresh buffer per batch: TensorFlow may alias numpy memory (and copy it to a device
        # asynchronously), so refilling one buffer could change a batch still being read.
        batch = np.empty((len(starts), *window, volume.shape[-1]), np.float32)
        for row, start in enumerate(starts):
            batch[row] = volume[_region(start, window)]
        yield batch, starts
        if progress is not None:
            progress(first + len(starts), len(positions))


def _pad_to_window(
    volume: np.ndarray, window: Window
) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    """Zero-pads spatial axes shorter than the window; returns the crop that undoes it."""
    missing = [max(w - s, 0) for s, w in zip(volume.shape[:3], window)]
    if not any(missing):
        return volume, None
    before = [m // 2 for m in missing]
    widths = [(b, m - b) for b, m in zip(before, missing)] + [(0, 0)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, volume.shape[:3]))
    return np.pad(volume, widths), crop


def _check_arguments(
    volume: np.ndarray,
    window: Sequence[int],
    num_classes: int,
    overlap: float,
    weighting: str,
    sigma_scale: float,
    batch_size: int,
    mirror_axes: Sequence[int],
    spatial_dims: int,
) -> Window:
    """The window as a (depth, height, width) tuple; ValueError lists every bad argument."""
    window = tuple(int(w) for w in window)
    problems = []
    if np.ndim(volume) != 4:
        problems.append(
            f"volume must be (depth, height, width, channels), got shape "
            f"{np.shape(volume)}; add a channel axis with volume[..., np.newaxis]"
        )
    if len(window) != 3 or min(window) < 1:
        problems.append(f"window must be 3 positive sizes (depth, height, width), got {window}")
    elif spatial_dims == 2 and window[0] != 1:
        problems.append(
            f"a 2D model predicts one slice at a time: use window (1, "
            f"{window[1]}, {window[2]}), got {window}"
        )
    if spatial_dims not in (2, 3):
        problems.append(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_classes < 2:
        problems.append(f"num_classes must be >= 2 (background included), got {num_classes}")
    if not 0.0 <= overlap < 1.0:
        problems.append(f"overlap must be in [0, 1), got {overlap}")
    if weighting not in WEIGHTINGS:
        problems.append(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if sigma_scale <= 0:
        problems.append(f"sigma_scale must be > 0, got {sigma_scale}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if any(a not in (0, 1, 2) for a in mirror_axes):
        problems.append(f"mirror_axes must be spatial axes 0, 1 or 2, got {tuple(mirror_axes)}")
    if problems:
        raise ValueError("; ".join(problems))
    return window  # type: ignore[return-value]  # checked to hold three sizes above


def make_predict_fn(model: Any) -> Callable[[Any], Any]:
    """The full-resolution logits of ``model`` in inference mode (output 0 of a list)."""

    def predict(batch: Any) -> Any:
        outputs = model(batch, training=False)
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs

    return predict
