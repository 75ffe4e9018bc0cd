"""Small named building blocks shared by the architectures, 2D or 3D by a parameter.

Layout is channels-last: ``(batch, *spatial, channels)`` with ``spatial_dims`` (2 or 3) spatial
axes, ``(batch, depth, height, width, channels)`` in 3D. The block functions take a symbolic
tensor, create their layers under a name prefix and return the output tensor, so a model's
``__init__`` reads top to bottom. The layer classes here (padding, cropping, linear
up-sampling) are registered as serializable so saved models reload without custom objects.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from segnet.config import Activation, Norm

_CONV = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
_CONV_TRANSPOSE = {2: keras.layers.Conv2DTranspose, 3: keras.layers.Conv3DTranspose}
_MAX_POOL = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}
_DROPOUT = {2: keras.layers.SpatialDropout2D, 3: keras.layers.SpatialDropout3D}

NORMS: tuple[str, ...] = typing.get_args(Norm)  # the choices of model.<name>.norm
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)


@dataclass(frozen=True)
class ConvSpec:
    """How every convolution block of a model is made.

    Attributes:
        spatial_dims: 2 or 3.
        convs: convolutions per block.
        norm: one of ``NORMS``; ``instance`` is GroupNormalization with one group per channel.
        groups: groups for ``norm="group"`` (reduced to a divisor of the channel count).
        activation: one of ``ACTIVATIONS``.
        dropout: channel (spatial) dropout rate after each block; 0 disables it.
    """

    spatial_dims: int = 3
    convs: int = 2
    norm: str = "instance"
    groups: int = 8
    activation: str = "leaky_relu"
    dropout: float = 0.0


def level_filters(filters: int, growth: float, max_filters: int, levels: int) -> list[int]:
    """Filters per resolution level: ``filters * growth**level`` capped at ``max_filters``."""
    return [min(round(filters * growth**level), max_filters) for level in range(levels)]


def conv(
    filters: int,
    spatial_dims: int,
    *,
    kernel_size: int = 3,
    use_bias: bool = True,
    dtype: str | None = None,
    name: str,
) -> keras.layers.Layer:
    """A ``same``-padded, stride-1 convolution with He initialisation (ReLU-family nets)."""
    return _CONV[spatial_dims](
        filters,
        kernel_size,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        dtype=dtype,
        name=name,
    )


def normalization(kind: str, channels: int, groups: int, name: str) -> keras.layers.Layer | None:
    """The normalisation layer for ``kind`` over the last axis, or None for ``"none"``.

    Raises:
        ValueError: ``kind`` is not one of ``NORMS``.
    """
    if kind == "batch":
        return keras.layers.BatchNormalization(name=name)
    if kind == "instance":
        # One group per channel normalises each channel of each sample over space alone.
        return keras.layers.GroupNormalization(groups=channels, name=name)
    if kind == "group":
        # Capped widths (max_filters) need not divide by the configured group count.
        return keras.layers.GroupNormalization(groups=math.gcd(groups, channels), name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def activation(kind: str, name: str) -> keras.layers.Layer:
    """The activation layer for ``kind``; leaky ReLU uses nnU-Net's slope of 0.01.

    Raises:
        ValueError: ``kind`` is not one of ``ACTIVATIONS``.
    """
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.01, name=name)
    if kind == "elu":
        return keras.layers.ELU(name=name)
    if kind in ("gelu", "swish"):
        return keras.layers.Activation(kind, name=name)
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def conv_block(
    x: Any, filters: int, spec: ConvSpec, name: str, last_filters: int | None = None
) -> Any:
    """``spec.convs`` x (conv -> norm -> activation), then optional channel dropout.

    Args:
        x: ``(batch, *spatial, channels)``.
        filters: output channels of every convolution.
        spec: the model's block settings.
        name: prefix of the layer names.
        last_filters: output channels of the last convolution, if different (SegNet's
            decoder narrows to the next level's width there).

    Returns:
        ``(batch, *spatial, last_filters or filters)``, same spatial size.
    """
    for i in range(spec.convs):
        width = last_filters if last_filters and i == spec.convs - 1 else filters
        norm = normalization(spec.norm, width, spec.groups, f"{name}_norm{i}")
        # A bias before a normalisation that re-centres is redundant.
        x = conv(width, spec.spatial_dims, use_bias=norm is None, name=f"{name}_conv{i}")(x)
        if norm is not None:
            x = norm(x)
        x = activation(spec.activation, f"{name}_act{i}")(x)
    if spec.dropout > 0:
        x = _DROPOUT[spec.spatial_dims](spec.dropout, name=f"{name}_dropout")(x)
    return x


def down(x: Any, spatial_dims: int, name: str) -> Any:
    """Halves every spatial size with a 2-wide max pool (sizes must be even)."""
    return _MAX_POOL[spatial_dims](pool_size=2, name=name)(x)


def up(x: Any, filters: int, spatial_dims: int, mode: str, name: str) -> Any:
    """Doubles every spatial size and maps to ``filters`` channels.

    Args:
        x: ``(batch, *spatial, channels)``.
        filters: output channels.
        spatial_dims: 2 or 3.
        mode: ``"transpose"`` (a learned 2-wide, stride-2 transposed convolution) or
            ``"resize"`` (linear interpolation, then a 1-wide convolution: the conv block that
            follows mixes neighbours, and resizing first avoids checkerboard artefacts).
        name: prefix of the layer names.

    Returns:
        ``(batch, *2 * spatial, filters)``.
    """
    if mode == "transpose":
        return _CONV_TRANSPOSE[spatial_dims](
            filters, 2, strides=2, kernel_initializer="he_normal", name=name
        )(x)
    if mode == "resize":
        x = LinearUpsampling(2, spatial_dims, name=f"{name}_resize")(x)
        return conv(filters, spatial_dims, kernel_size=1, name=f"{name}_conv")(x)
    raise ValueError(f"unknown up-sampling mode {mode!r}; expected 'transpose' or 'resize'")


def head(x: Any, num_classes: int, spatial_dims: int, name: str) -> Any:
    """1-wide convolution to class logits, computed in float32 even under mixed precision."""
    return conv(num_classes, spatial_dims, kernel_size=1, dtype="float32", name=name)(x)


def crop_logits(logits: Any, reference: Any, scale: int, name: str) -> Any:
    """Crops padded logits to ``ceil(reference_spatial / scale)``, keeping them float32."""
    return CropToReference(scale, dtype="float32", name=name)([logits, reference])


def downsample_labels(labels: Any, num_classes: int, factor: int, spatial_dims: int = 3) -> Any:
    """Soft labels at ``1 / factor`` resolution: one-hot labels averaged over each block.

    The targets for low-resolution outputs (deep supervision, ``loss_at: low``, the cascade's
    first stage): each value is the fraction of the block's voxels in that class. Blocks at
    the far edge of sizes that do not divide are averaged over their voxels inside the volume.

    Args:
        labels: int ``(batch, *spatial)`` class indices.
        num_classes: number of classes.
        factor: block size along every spatial axis; 1 returns the one-hot labels.
        spatial_dims: 2 or 3.

    Returns:
        float32 ``(batch, *ceil(spatial / factor), num_classes)``, summing to 1 over classes.
    """
    onehot = ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype="float32")
    if factor == 1:
        return onehot
    # Pad at the end, like PadToMultiple ('same' pooling would pad both sides), then divide
    # by the share of each block inside the volume, which is the sum over classes.
    padded = pad_to_multiple(onehot, factor)
    mean = ops.average_pool(padded, (factor,) * spatial_dims, factor, padding="valid")
    return mean / ops.sum(mean, axis=-1, keepdims=True)


def pad_to_multiple(x: Any, multiple: int) -> Any:
    """Zero-pads the end of every spatial axis of ``(batch, *spatial, channels)`` to a multiple."""
    pads = [(0, (-n) % multiple) for n in ops.shape(x)[1:-1]]
    return ops.pad(x, [(0, 0), *pads, (0, 0)])


def _spatial_ceil(shape: Sequence[int | None], multiple: int) -> list[int | None]:
    return [None if n is None else -(-n // multiple) for n in shape[1:-1]]


@keras.saving.register_keras_serializable(package="segnet")
class PadToMultiple(keras.layers.Layer):
    """Zero-pads the end of every spatial axis up to a multiple of ``multiple``.

    Lets a network whose poolings need divisible sizes take any size; pair it with
    ``CropToReference`` at the outputs. Sizes that already divide pass through unchanged.

    Call: ``(batch, *spatial, channels)`` -> ``(batch, *ceil(spatial / m) * m, channels)``.
    """

    def __init__(self, multiple: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, x: Any) -> Any:
        return pad_to_multiple(x, self.multiple)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        spatial = [
            None if n is None else n * self.multiple
            for n in _spatial_ceil(input_shape, self.multiple)
        ]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package="segnet")
class CropToReference(keras.layers.Layer):
    """Crops ``x`` to ``ceil(reference_spatial / scale)`` from the start of each axis.

    Undoes ``PadToMultiple`` for an output at ``1 / scale`` of the reference's resolution.

    Call: ``layer([x, reference])`` with ``x`` ``(batch, *spatial, channels)`` at least as
    large as the target; returns ``(batch, *ceil(reference_spatial / scale), channels)``.
    """

    def __init__(self, scale: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, inputs: Sequence[Any]) -> Any:
        x, reference = inputs
        shape, target = ops.shape(x), ops.shape(reference)
        spatial = [(n + self.scale - 1) // self.scale for n in target[1:-1]]
        return ops.slice(x, [0] * len(shape), [shape[0], *spatial, shape[-1]])

    def compute_output_shape(self, input_shape: Sequence[Sequence[int | None]]) -> tuple:
        x, reference = input_shape
        return (x[0], *_spatial_ceil(reference, self.scale), x[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="segnet")
class LinearUpsampling(keras.layers.Layer):
    """Multiplies every spatial size by an integer ``factor`` with (bi/tri)linear interpolation.

    Half-pixel centres with edge clamping, like ``tf.image.resize(..., "bilinear")`` and
    ``scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")``: output voxel ``o`` reads
    input coordinate ``(o + 0.5) / factor - 0.5``. Separable: one pass per axis, each a blend
    of a voxel with one neighbour per output phase, so only slices, adds and a reshape.

    Call: ``(batch, *spatial, channels)`` -> ``(batch, *spatial * factor, channels)``.
    """

    def __init__(self, factor: int, spatial_dims: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.spatial_dims = spatial_dims

    def call(self, x: Any) -> Any:
        for axis in range(1, self.spatial_dims + 1):
            x = self._upsample_axis(x, axis)
        return x

    def _upsample_axis(self, x: Any, axis: int) -> Any:
        def take(sl: slice) -> Any:
            return x[(slice(None),) * axis + (sl,)]

        previous = ops.concatenate([take(slice(0, 1)), take(slice(None, -1))], axis=axis)
        following = ops.concatenate([take(slice(1, None)), take(slice(-1, None))], axis=axis)
        phases = []
        for phase in range(self.factor):
            offset = (phase + 0.5) / self.factor - 0.5  # in (-0.5, 0.5): one neighbour
            neighbour = previous if offset < 0 else following
            phases.append(x * (1.0 - abs(offset)) + neighbour * abs(offset))
        shape = list(ops.shape(x))
        shape[axis] = shape[axis] * self.factor
        return ops.reshape(ops.stack(phases, axis=axis + 1), shape)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        spatial = [None if n is None else n * self.factor for n in input_shape[1:-1]]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor, "spatial_dims": self.spatial_dims}
