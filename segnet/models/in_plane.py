"""In-plane 3D convolutions: a kernel flat along one axis (3x3x1), trained through 2D kernels.

On an anisotropic grid the planner gives the finer levels kernels of size 1 along the coarse
axis (nnU-Net's rule), so each output voxel mixes one slice only. The forward pass stays
TensorFlow's ``Conv3D``, which oneDNN runs well. Its gradients do not in bfloat16: for a 3x3x1
kernel oneDNN's 3D backward kernels took 1.7-2x as long as the 2D ones on the same data (AMX
Xeon, ``benchmarks/bench_conv_paths.py``), while in float32 the two were even or the 3D ones
ahead. So in bfloat16 the backward pass folds the flat axis into the batch,
``(N, D, H, W, C) -> (N * W, D, H, C)`` for a kernel flat along W, computes both gradients
with the 2D backward kernels and unfolds them. The arithmetic is the same sums in another
order: the gradients agree with ``Conv3D``'s own to rounding (``tests/models/test_in_plane.py``).

Only bfloat16 compute, stride 1, no dilation, channels-last and ``same`` or ``valid`` padding
qualify (the padding along the flat axis is then none either way); everything else keeps
Keras's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

# Turned off only to measure what it buys (benchmarks/bench_conv_paths.py) and in tests.
ENABLED = True


def flat_axis(
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation_rate: Sequence[int],
    padding: str,
    data_format: str,
    compute_dtype: str = "bfloat16",
) -> int | None:
    """The spatial axis (0-2) along which a 3D convolution's kernel is 1 while it is wider
    along both others, when its gradients should go through 2D kernels; else None."""
    if not ENABLED or compute_dtype != "bfloat16" or data_format != "channels_last":
        return None
    if padding not in ("same", "valid"):
        return None
    if any(s != 1 for s in strides) or any(d != 1 for d in dilation_rate):
        return None
    flat = [axis for axis, size in enumerate(kernel_size) if size == 1]
    if len(flat) != 1:  # 1x1x1 is a matrix product already; 1x1x3 is rare and left alone
        return None
    return flat[0]


def conv3d(inputs: Any, kernel: Any, axis: int, padding: str) -> Any:
    """``Conv3D(inputs, kernel)`` (stride 1) whose gradients run as 2D convolutions.

    Args:
        inputs: ``(batch, d0, d1, d2, channels)``.
        kernel: ``(k0, k1, k2, channels, filters)`` with ``k[axis] == 1``.
        axis: the flat spatial axis, 0-2.
        padding: ``"same"`` or ``"valid"``.
    """
    tf_padding = padding.upper()

    @tf.custom_gradient
    def convolve(x: tf.Tensor, weights: tf.Tensor) -> Any:
        y = tf.nn.conv3d(x, weights, [1, 1, 1, 1, 1], tf_padding)

        def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x2 = _fold(x, axis)
            dy2 = _fold(upstream, axis)
            w2 = tf.squeeze(weights, axis)  # (ka, kb, channels, filters), a and b in order
            dx2 = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x2), filter=w2, out_backprop=dy2,
                strides=[1, 1, 1, 1], padding=tf_padding,
            )  # fmt: skip
            dw2 = tf.raw_ops.Conv2DBackpropFilter(
                input=x2, filter_sizes=tf.shape(w2), out_backprop=dy2,
                strides=[1, 1, 1, 1], padding=tf_padding,
            )  # fmt: skip
            return _unfold(dx2, tf.shape(x), axis), tf.expand_dims(dw2, axis)

        return y, gradients

    # A tensor, not the variable: the gradient reaches the variable through this read (and,
    # under mixed precision, its cast), as it does for Keras's own convolution.
    return convolve(inputs, tf.convert_to_tensor(kernel))


def _order(axis: int) -> list[int]:
    """Brings spatial ``axis`` next to the batch axis, keeping the other two in order."""
    return [0, 1 + axis] + [1 + a for a in range(3) if a != axis] + [4]


def _fold(x: tf.Tensor, axis: int) -> tf.Tensor:
    """``(N, d0, d1, d2, C)`` -> ``(N * d_axis, da, db, C)``; a copy unless ``axis`` is 0."""
    if axis != 0:
        x = tf.transpose(x, _order(axis))
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([[-1], shape[2:]], 0))


def _unfold(x2: tf.Tensor, shape: tf.Tensor, axis: int) -> tf.Tensor:
    """Undoes ``_fold`` for a tensor whose unfolded shape is ``shape`` (channels last)."""
    moved = tf.gather(shape, _order(axis))
    x = tf.reshape(x2, tf.concat([moved[:-1], tf.shape(x2)[-1:]], 0))
    if axis == 0:
        return x
    inverse = [0] * 5
    for position, source in enumerate(_order(axis)):
        inverse[source] = position
    return tf.transpose(x, inverse)
