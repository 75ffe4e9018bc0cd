"""Exact N-dimensional max pooling that records its argmax, and the matching unpooling.

SegNet's decoder puts each pooled value back where its maximum came from. TensorFlow has no
3D ``max_pool_with_argmax``; its 2D op has no XLA kernel, and with ``padding="SAME"`` on an
odd width its flat indices count the unpadded width, so the widely copied unpooling that
decodes them with ``2 * pooled_width`` shifts rows ("tilts"). Flat indices kept as floats are
also exact only up to 2**24. This module avoids all three:

* The input is padded at the end of every spatial axis up to a multiple of the pool with the
  dtype's lowest *finite* value (of the compute dtype, so float16 pads with -65504), so no
  intermediate is ever infinite (a one-hot ``0 * -inf`` is nan). Pooled sizes are
  ``ceil(n / pool)`` like ``padding="same"``; values equal ``MaxPooling*D(padding="same")``
  whenever that pads only at the end (pool size 2, or sizes that are multiples of the pool).
* The argmax is a uint8 *window-local* index: the position inside the pool window in
  row-major order over the window axes (0 to ``prod(pool_size) - 1``, so windows hold at most
  256 positions). It never depends on the volume's size, so nothing overflows or rounds, and
  it costs a quarter of a float32 feature map to keep for the decoder.
* Unpooling writes each value at its window-local position, reshapes back to the padded grid
  and crops to the pre-pool shape taken from a reference tensor.
* Ties go to the first maximum in row-major window order, like ``tf.nn.max_pool_with_argmax``;
  gradients flow only through that position.

Inputs are assumed finite: a window holding ``-inf`` next to padding would pick the padding.
Use the layers (not the functions) inside functional models. Layout is channels-last:
``(batch, *spatial, channels)`` with 2 or 3 spatial axes.

TensorFlow fast path: built from ``keras.ops``, the kernels are a handful of strided slices,
compares and selects. TensorFlow runs those as separate ops (several times slower than its
native max pool) while XLA fuses them into one loop, so on the TensorFlow backend each kernel
runs as its own XLA cluster (``jit_compile=True``, the default); it is ignored on other
backends. ``python benchmarks/bench_argmax_pooling.py`` measures the choice.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import ml_dtypes
from keras import ops

__all__ = [
    "MaxPoolingWithArgmax",
    "MaxUnpoolingWithArgmax",
    "max_pool_with_argmax",
    "max_unpool",
    "normalize_pool_size",
]

ARGMAX_DTYPE = "uint8"
MAX_WINDOW = 256  # Positions a uint8 window-local index can name.


def normalize_pool_size(pool_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Returns the pool size as one positive int per spatial axis.

    Raises:
        ValueError: the size is not positive, a tuple has the wrong length, or the window has
            more than ``MAX_WINDOW`` positions.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(
            f"argmax pooling works on 2 or 3 spatial axes, got {spatial_dims}: inputs must "
            "be (batch, height, width, channels) or (batch, depth, height, width, channels)"
        )
    sizes = (pool_size,) * spatial_dims if isinstance(pool_size, int) else tuple(pool_size)
    if len(sizes) != spatial_dims or not all(isinstance(p, int) and p >= 1 for p in sizes):
        raise ValueError(
            f"pool_size must be a positive int or {spatial_dims} positive ints, got {pool_size!r}"
        )
    if math.prod(sizes) > MAX_WINDOW:
        raise ValueError(
            f"pool_size {sizes} has {math.prod(sizes)} positions per window; the uint8 argmax "
            f"names at most {MAX_WINDOW} (e.g. 6x6x6)"
        )
    return sizes


def _lowest_finite(dtype: Any) -> float:
    # ml_dtypes.finfo also knows bfloat16, which numpy's finfo does not.
    return float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).min)


def _split_windows(x: Any, pool_size: tuple[int, ...], pad_value: float) -> Any:
    """Pads ``(b, *spatial, c)`` at the end and reshapes to ``(b, n1, p1, n2, p2, ..., c)``."""
    shape = ops.shape(x)
    spatial = shape[1:-1]
    counts = [(n + p - 1) // p for n, p in zip(spatial, pool_size)]
    pads = [(0, 0)] + [(0, k * p - n) for k, p, n in zip(counts, pool_size, spatial)] + [(0, 0)]
    x = ops.pad(x, pads, constant_values=pad_value)
    split = [shape[0]]
    for k, p in zip(counts, pool_size):
        split += [k, p]
    return ops.reshape(x, [*split, shape[-1]])


def _window_slices(windows: Any, pool_size: tuple[int, ...]) -> list[Any]:
    """The ``prod(pool_size)`` strided views ``(b, n1, n2, ..., c)``, in row-major window order.

    Slices rather than moving the window axes last with a transpose and taking ``argmax``:
    under XLA the slices, compares and selects fuse into one pass over the input with no
    transposed copy (about half the time of the transpose form on the benchmark volume), and
    ``argmax`` does not promise which of several equal maxima it returns.
    """
    views = []
    for offsets in itertools.product(*(range(p) for p in pool_size)):
        index: list[slice | int] = [slice(None)]
        for offset in offsets:
            index += [slice(None), offset]
        views.append(windows[(*index, slice(None))])
    return views


def _merge_windows(views: list[Any], pool_size: tuple[int, ...]) -> Any:
    """Inverse of ``_window_slices`` + ``_split_windows`` reshape: returns the padded grid."""
    for axis in reversed(range(len(pool_size))):
        # Stacking the innermost window axis first rebuilds (b, n1, p1, n2, p2, ..., c).
        p = pool_size[axis]
        views = [ops.stack(views[i : i + p], axis=axis + 2) for i in range(0, len(views), p)]
    shape = ops.shape(views[0])
    spatial = [shape[1 + 2 * i] * p for i, p in enumerate(pool_size)]
    return ops.reshape(views[0], [shape[0], *spatial, shape[-1]])


def _pool_kernel(x: Any, pool_size: tuple[int, ...]) -> tuple[Any, Any]:
    views = _window_slices(_split_windows(x, pool_size, _lowest_finite(x.dtype)), pool_size)
    pooled, argmax = views[0], ops.zeros(ops.shape(views[0]), ARGMAX_DTYPE)
    for k, view in enumerate(views[1:], start=1):
        # Strictly greater: a tie keeps the earlier position, as tf.nn.max_pool_with_argmax.
        better = ops.greater(view, pooled)
        pooled = ops.where(better, view, pooled)
        argmax = ops.where(better, ops.cast(k, ARGMAX_DTYPE), argmax)
    return pooled, argmax


def _unpool_kernel(
    values: Any, argmax: Any, pool_size: tuple[int, ...], reference: Any | None = None
) -> Any:
    zero = ops.zeros((), values.dtype)
    views = [ops.where(argmax == k, values, zero) for k in range(math.prod(pool_size))]
    grid = _merge_windows(views, pool_size)
    if reference is None:
        return grid
    shape, target = ops.shape(grid), ops.shape(reference)
    return ops.slice(grid, [0] * len(shape), [shape[0], *target[1:-1], shape[-1]])


def _gather_kernel(x: Any, argmax: Any, pool_size: tuple[int, ...]) -> Any:
    """Picks ``x`` at each window's argmax: the gradient of unpooling w.r.t. its values."""
    views = _window_slices(_split_windows(x, pool_size, 0.0), pool_size)
    picked = views[0]
    for k, view in enumerate(views[1:], start=1):
        picked = ops.where(argmax == k, view, picked)
    return picked


@functools.cache
def _xla(kernel: Callable[..., Any]) -> Callable[..., Any]:
    import tensorflow as tf  # Only reached on the TensorFlow backend.

    # reduce_retracing: a new input shape re-traces once, then with unknown dimensions.
    return tf.function(kernel, jit_compile=True, reduce_retracing=True)


def _kernel(kernel: Callable[..., Any], jit_compile: bool) -> Callable[..., Any]:
    if jit_compile and keras.backend.backend() == "tensorflow":
        return _xla(kernel)
    return kernel


def max_pool_with_argmax(
    x: Any, pool_size: int | Sequence[int] = 2, jit_compile: bool = True
) -> tuple[Any, Any]:
    """Max pools with stride = pool size and ``same`` padding; returns values and argmax.

    Args:
        x: ``(batch, *spatial, channels)`` with 2 or 3 spatial axes; any size (odd sizes are
            padded at the end with the dtype's lowest finite value).
        pool_size: window size, an int or one int per spatial axis.
        jit_compile: on the TensorFlow backend, run the kernels as XLA clusters.

    Returns:
        ``(pooled, argmax)``, both ``(batch, *ceil(spatial / pool_size), channels)``; ``argmax``
        is uint8, the row-major position of the maximum inside its window (first on ties).
    """
    pool_size = normalize_pool_size(pool_size, len(x.shape) - 2)
    pool = _kernel(_pool_kernel, jit_compile)
    unpool = _kernel(_unpool_kernel, jit_compile)

    @ops.custom_gradient
    def forward(x: Any) -> Any:
        pooled, argmax = pool(x, pool_size)

        def grad(d_pooled: Any, *_: Any) -> Any:  # The int argmax output has no gradient.
            return unpool(d_pooled, argmax, pool_size, x)

        return (pooled, argmax), grad

    return forward(x)


def max_unpool(
    values: Any,
    argmax: Any,
    pool_size: int | Sequence[int] = 2,
    reference: Any | None = None,
    jit_compile: bool = True,
) -> Any:
    """Places each value at its window's argmax and zeros elsewhere.

    Args:
        values: ``(batch, *pooled_spatial, channels)``.
        argmax: int ``(batch, *pooled_spatial, channels)`` window-local indices from
            ``max_pool_with_argmax`` with the same ``pool_size``.
        pool_size: window size, an int or one int per spatial axis.
        reference: the tensor that was pooled, ``(batch, *spatial, any)``: only its shape is
            read, to crop the output to ``spatial``. Without it the output is the padded
            grid, ``pooled_spatial * pool_size``.
        jit_compile: on the TensorFlow backend, run the kernels as XLA clusters.

    Returns:
        ``(batch, *spatial, channels)`` in the dtype of ``values``.
    """
    pool_size = normalize_pool_size(pool_size, len(values.shape) - 2)
    unpool = _kernel(_unpool_kernel, jit_compile)
    gather = _kernel(_gather_kernel, jit_compile)

    @ops.custom_gradient
    def forward(values: Any, argmax: Any, *reference: Any) -> Any:
        def grad(d_out: Any) -> Any:
            return (gather(d_out, argmax, pool_size), None) + (None,) * len(reference)

        return unpool(values, argmax, pool_size, *reference), grad

    return forward(values, argmax, *([] if reference is None else [reference]))


class _WindowLayer(keras.layers.Layer):
    """Holds and serializes the arguments both layers share (no weights)."""

    def __init__(
        self, pool_size: int | Sequence[int] = 2, jit_compile: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.pool_size = pool_size if isinstance(pool_size, int) else tuple(pool_size)
        self.jit_compile = jit_compile

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "jit_compile": self.jit_compile,
        }


@keras.saving.register_keras_serializable(package="segnet")
class MaxPoolingWithArgmax(_WindowLayer):
    """Max pooling (stride = pool size, ``same`` padding) that also returns the argmax.

    Call: ``pooled, argmax = layer(x)`` with ``x`` of shape ``(batch, *spatial, channels)``,
    2 or 3 spatial axes of any size. Both outputs are ``(batch, *ceil(spatial / pool_size),
    channels)``; ``argmax`` is uint8 window-local (see ``max_pool_with_argmax``).

    Args:
        pool_size: window size and stride, an int or one int per spatial axis.
        jit_compile: on the TensorFlow backend, run the kernels as XLA clusters (faster on
            CPU); ignored on other backends.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).
    """

    def call(self, inputs: Any) -> tuple[Any, Any]:
        return max_pool_with_argmax(inputs, self.pool_size, self.jit_compile)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[tuple, tuple]:
        pool_size = normalize_pool_size(self.pool_size, len(input_shape) - 2)
        spatial = [None if n is None else -(-n // p) for n, p in zip(input_shape[1:-1], pool_size)]
        shape = (input_shape[0], *spatial, input_shape[-1])
        return shape, shape

    def compute_output_spec(self, inputs: Any) -> tuple[Any, Any]:
        shape, _ = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype=self.compute_dtype),
            keras.KerasTensor(shape, dtype=ARGMAX_DTYPE),
        )


@keras.saving.register_keras_serializable(package="segnet")
class MaxUnpoolingWithArgmax(_WindowLayer):
    """Puts each value back at the argmax recorded by ``MaxPoolingWithArgmax``; zeros elsewhere.

    Call: ``layer([values, argmax, reference])``, where ``reference`` is the tensor that was
    pooled (only its shape is read, so odd sizes crop back exactly) and the output is
    ``(batch, *reference_spatial, values_channels)``. ``layer([values, argmax])`` returns the
    padded grid ``pooled_spatial * pool_size`` instead, equal only when sizes are multiples.

    Args:
        pool_size: the pooling layer's pool size.
        jit_compile: on the TensorFlow backend, run the kernels as XLA clusters (faster on
            CPU); ignored on other backends.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).
    """

    def call(self, inputs: Sequence[Any]) -> Any:
        values, argmax, reference = _unpack(inputs)
        return max_unpool(values, argmax, self.pool_size, reference, self.jit_compile)

    def compute_output_shape(self, input_shape: Sequence[Sequence[int | None]]) -> tuple:
        values, _, reference = _unpack(input_shape)
        if reference is not None:
            return (values[0], *reference[1:-1], values[-1])
        pool_size = normalize_pool_size(self.pool_size, len(values) - 2)
        spatial = [None if n is None else n * p for n, p in zip(values[1:-1], pool_size)]
        return (values[0], *spatial, values[-1])


def _unpack(inputs: Sequence[Any]) -> tuple[Any, Any, Any | None]:
    """Splits ``[values, argmax]`` or ``[values, argmax, reference]`` (tensors or shapes)."""
    if len(inputs) not in (2, 3):
        raise ValueError(
            "MaxUnpoolingWithArgmax takes [values, argmax] or [values, argmax, reference], "
            f"got {len(inputs)} inputs"
        )
    return inputs[0], inputs[1], inputs[2] if len(inputs) == 3 else None
