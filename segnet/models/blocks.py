"""Small named building blocks shared by the architectures, 2D or 3D by a parameter.

Layout is channels-last: ``(batch, *spatial, channels)`` with ``spatial_dims`` (2 or 3) spatial
axes, ``(batch, depth, height, width, channels)`` in 3D. Sizes, pools and scale factors are
one int for every axis or one per axis (``(1, 2, 2)`` keeps a coarse depth axis). The block functions take a symbolic
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

from segnet.config import Activation, Norm, collapse, per_axis
from segnet.models import in_plane

_MAX_POOL = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}
_DROPOUT = {2: keras.layers.SpatialDropout2D, 3: keras.layers.SpatialDropout3D}
Size = int | Sequence[int]  # one value for every spatial axis, or one per axis

NORMS: tuple[str, ...] = typing.get_args(Norm)  # the choices of model.<name>.norm
# A convolution reading at most this many channels (the image's) computes in float32 under
# mixed precision: oneDNN's bfloat16 kernels for one input channel are slow, its float32 ones
# are not (benchmarks/bench_conv_paths.py table 1; AMX Xeon, batch 2: kernel gradient 22.1 ms in
# bfloat16 against 6.6 ms at 64^3 and 3x3x3, 34.0 against 4.1 ms at 160x192x8 and 3x3x1). From 8 input
# channels bfloat16 is the faster again, and there the float32 path would also cost casts. In
# 2D the two are even (10 against 11 ms for 12 slices of 256^2), so 2D convolutions keep the policy.
FLOAT32_MAX_INPUT_CHANNELS = 3
FUSES_RELU = ("batch", "instance")  # norms whose layer can apply the ReLU that follows it
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
    kernel_size: Size = 3,
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


def normalization(
    kind: str, channels: int, groups: int, name: str, relu: bool = False
) -> keras.layers.Layer | None:
    """The normalisation layer for ``kind`` over the last axis, or None for ``"none"``.

    ``relu``: the layer applies a ReLU to its output (``batch`` and ``instance`` only).

    Raises:
        ValueError: ``kind`` is not one of ``NORMS``.
    """
    if relu and kind not in FUSES_RELU:
        raise ValueError(f"norm {kind!r} cannot apply the ReLU; only {FUSES_RELU} do")
    if kind == "batch":
        return FusedBatchNormalization(relu=relu, name=name)
    if kind == "instance":
        # One group per channel normalises each channel of each sample over space alone.
        return GroupNormalization(groups=channels, relu=relu, name=name)
    if kind == "group":
        # Capped widths (max_filters) need not divide by the configured group count.
        return GroupNormalization(groups=math.gcd(groups, channels), name=name)
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
    x: Any,
    filters: int,
    spec: ConvSpec,
    name: str,
    last_filters: int | None = None,
    kernel_size: Size = 3,
) -> Any:
    """``spec.convs`` x (conv -> norm -> activation), then optional channel dropout.

    Args:
        x: ``(batch, *spatial, channels)``.
        filters: output channels of every convolution.
        spec: the model's block settings.
        name: prefix of the layer names.
        last_filters: output channels of the last convolution, if different (SegNet's
            decoder narrows to the next level's width there).
        kernel_size: odd, per axis or for all; 1 along an axis convolves within slices.

    Returns:
        ``(batch, *spatial, last_filters or filters)``, same spatial size.
    """
    # oneDNN fuses a ReLU into the batch-norm kernel when it follows it directly, and only the
    # normalisation layer sees that tensor before it is reshaped back (see its call).
    fused_relu = spec.activation == "relu" and spec.norm in FUSES_RELU
    for i in range(spec.convs):
        width = last_filters if last_filters and i == spec.convs - 1 else filters
        norm = normalization(spec.norm, width, spec.groups, f"{name}_norm{i}", relu=fused_relu)
        # A bias before a normalisation that re-centres is redundant.
        x = conv(
            width,
            spec.spatial_dims,
            kernel_size=kernel_size,
            use_bias=norm is None,
            dtype="float32" if spec.spatial_dims == 3 and reads_few_channels(x) else None,
            name=f"{name}_conv{i}",
        )(x)
        if norm is not None:
            x = norm(x)
        if fused_relu:
            # The ReLU ran in the norm. The identity holds its place: checkpoints key layers
            # by position, so runs saved with a separate ReLU layer still restore.
            x = keras.layers.Identity(name=f"{name}_act{i}")(x)
        else:
            x = activation(spec.activation, f"{name}_act{i}")(x)
    if spec.dropout > 0:
        x = _DROPOUT[spec.spatial_dims](spec.dropout, name=f"{name}_dropout")(x)
    return x


def reads_few_channels(x: Any) -> bool:
    """Whether a convolution of ``x`` computes in float32 (``FLOAT32_MAX_INPUT_CHANNELS``).

    Only under a mixed policy does that change anything; the layer's weights are float32 in
    every policy, so checkpoints and ``.keras`` files hold the same variables either way.
    """
    channels = x.shape[-1]
    return channels is not None and channels <= FLOAT32_MAX_INPUT_CHANNELS


def down(x: Any, spatial_dims: int, name: str, pool_size: Size = 2) -> Any:
    """Divides each spatial size by its pool with a max pool (sizes must divide)."""
    return _MAX_POOL[spatial_dims](pool_size=_keras_size(pool_size, spatial_dims), name=name)(x)


def up(x: Any, filters: int, spatial_dims: int, mode: str, name: str, factor: Size = 2) -> Any:
    """Multiplies each spatial size by its ``factor`` and maps to ``filters`` channels.

    Args:
        x: ``(batch, *spatial, channels)``.
        filters: output channels.
        spatial_dims: 2 or 3.
        mode: ``"transpose"`` (a learned transposed convolution, as wide as its stride
            ``factor``) or ``"resize"`` (linear interpolation, then a 1-wide convolution: the
            conv block that follows mixes neighbours, and resizing first avoids checkerboard
            artefacts).
        name: prefix of the layer names.
        factor: the pool this undoes, per axis or for all.

    Returns:
        ``(batch, *factor * spatial, filters)``.
    """
    factor = _keras_size(factor, spatial_dims)
    if mode == "transpose":
        return _CONV_TRANSPOSE[spatial_dims](
            filters, factor, strides=factor, kernel_initializer="he_normal", name=name
        )(x)
    if mode == "resize":
        x = LinearUpsampling(factor, spatial_dims, name=f"{name}_resize")(x)
        return conv(filters, spatial_dims, kernel_size=1, name=f"{name}_conv")(x)
    raise ValueError(f"unknown up-sampling mode {mode!r}; expected 'transpose' or 'resize'")


def head(x: Any, num_classes: int, spatial_dims: int, name: str) -> Any:
    """1-wide convolution to class logits, computed in float32 even under mixed precision."""
    return conv(num_classes, spatial_dims, kernel_size=1, dtype="float32", name=name)(x)


def _keras_size(size: Size, spatial_dims: int) -> int | tuple[int, ...]:
    """``size`` as Keras layers take it: the int when every axis agrees (today's layers)."""
    return collapse(per_axis(size, spatial_dims))


def crop_logits(logits: Any, reference: Any, scale: Size, name: str) -> Any:
    """Crops padded logits to ``ceil(reference_spatial / scale)``, keeping them float32."""
    return CropToReference(scale, dtype="float32", name=name)([logits, reference])


def downsample_labels(labels: Any, num_classes: int, factor: Size, spatial_dims: int = 3) -> Any:
    """Soft labels at ``1 / factor`` resolution: one-hot labels averaged over each block.

    The targets for low-resolution outputs (deep supervision, ``loss_at: low``, the cascade's
    first stage): each value is the fraction of the block's voxels in that class. Blocks at
    the far edge of sizes that do not divide are averaged over their voxels inside the volume.

    Args:
        labels: int ``(batch, *spatial)`` class indices.
        num_classes: number of classes.
        factor: block size along every spatial axis, or per axis; 1 returns the one-hot labels.
        spatial_dims: 2 or 3.

    Returns:
        float32 ``(batch, *ceil(spatial / factor), num_classes)``, summing to 1 over classes.
    """
    onehot = ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype="float32")
    block = per_axis(factor, spatial_dims)
    if max(block) == 1:
        return onehot
    # Pad at the end, like PadToMultiple ('same' pooling would pad both sides), then divide
    # by the share of each block inside the volume, which is the sum over classes.
    padded = pad_to_multiple(onehot, block)
    mean = ops.average_pool(padded, block, block, padding="valid")
    return mean / ops.sum(mean, axis=-1, keepdims=True)


def pad_to_multiple(x: Any, multiple: Size) -> Any:
    """Zero-pads the end of every spatial axis of ``(batch, *spatial, channels)`` to a multiple
    (of its own, when ``multiple`` is per axis)."""
    spatial = ops.shape(x)[1:-1]
    pads = [(0, (-n) % m) for n, m in zip(spatial, per_axis(multiple, len(spatial)))]
    return ops.pad(x, [(0, 0), *pads, (0, 0)])


def _spatial_ceil(shape: Sequence[int | None], multiple: Size) -> list[int | None]:
    spatial = shape[1:-1]
    return [
        None if n is None else -(-n // m) for n, m in zip(spatial, per_axis(multiple, len(spatial)))
    ]


def _stored(size: Size) -> int | list[int]:
    """A size as a layer's config keeps it: an int, or a JSON-ready list per axis."""
    return size if isinstance(size, int) else [int(v) for v in size]


class _OptionalRelu:
    """Mixin for segnet's normalisation layers: a ``relu`` option, kept in the config, for a
    ReLU applied to the layer's output (by the fused kernel's path in ``call``)."""

    def __init__(self, *args: Any, relu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "relu": self.relu}  # type: ignore[misc]

    def keras_call(self, inputs: Any, **kwargs: Any) -> Any:
        """Keras's own code for the layer, then the ReLU if asked for."""
        y = super().call(inputs, **kwargs)  # type: ignore[misc]
        return ops.relu(y) if self.relu else y


def _scale_and_offset(layer: keras.layers.Layer, channels: int) -> tuple[Any, Any]:
    """A normalisation layer's gamma and beta as float32 tensors (ones and zeros where its
    ``scale`` or ``center`` is off), as TensorFlow's fused kernel takes them."""
    import tensorflow as tf

    scale = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
    offset = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
    return scale, offset


@keras.saving.register_keras_serializable(package="segnet")
class FusedBatchNormalization(_OptionalRelu, keras.layers.BatchNormalization):
    """Keras's BatchNormalization computed by TensorFlow's fused kernel (``FusedBatchNormV3``).

    Keras normalises with a chain of element-wise ops on a float32 copy of the input; the fused
    kernel reads bfloat16 directly, keeps its statistics in float32 and makes a few passes
    instead of about a dozen. On the AMX Xeon that made the bfloat16 training step of a
    batch-norm U-Net at 64^3 1.19x faster and its inference 1.1x (README, "Against MONAI").
    The variables, their names and the update rule are Keras's, so checkpoints and ``.keras``
    files hold the same weights; a synchronised (``runtime.sync_batchnorm``), masked or
    renormalising layer, one over another axis than the last, or another Keras backend falls
    back to Keras's code.

    With ``relu=True`` the layer applies a ReLU to its output, on the 4D tensor straight from
    the kernel, where TensorFlow's graph optimiser fuses the two into one oneDNN primitive
    (``_MklFusedBatchNormEx``) and skips a pass over the activations.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        rank = len(inputs.shape)
        if (
            keras.backend.backend() != "tensorflow"
            or mask is not None
            or self.renorm
            or self.synchronized
            or self.axis not in (-1, rank - 1)
            or rank not in (4, 5)
        ):
            return self.keras_call(inputs, training=training, mask=mask)
        import tensorflow as tf  # the TensorFlow backend's own kernel, as in argmax_pooling

        # TensorFlow hands only 4D batch norm to oneDNN; statistics are per channel, so
        # folding depth into the batch axis changes nothing but the kernel.
        shape = tf.shape(inputs)
        x = tf.reshape(inputs, [-1, shape[-3], shape[-2], shape[-1]]) if rank == 5 else inputs
        data_format = "NHWC"
        scale, offset = _scale_and_offset(self, inputs.shape[-1])
        if training and self.trainable:
            y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=tf.zeros([0]),
                variance=tf.zeros([0]), epsilon=self.epsilon, is_training=True,
                data_format=data_format,
            )  # fmt: skip
            # The kernel returns the unbiased variance; Keras averages the biased one.
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1 - self.momentum)
            )
        else:
            y = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset,
                mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon,
                is_training=False, data_format=data_format,
            )[0]  # fmt: skip
        if self.relu:
            y = tf.nn.relu(y)
        return ops.cast(tf.reshape(y, shape), self.compute_dtype)


@keras.saving.register_keras_serializable(package="segnet")
class GroupNormalization(_OptionalRelu, keras.layers.GroupNormalization):
    """Keras's GroupNormalization, computed by TensorFlow's fused batch-norm kernel when there is
    one group per channel (instance normalisation).

    Batch norm in training mode over a single sample is instance norm: per-channel statistics
    over that sample's voxels. Run one sample at a time, as 4D ``(D, H, W, C)``, it goes to
    oneDNN's kernel, which reads bfloat16 directly and makes a few passes; Keras's layer casts
    to float32 and chains about a dozen element-wise ops. On the AMX Xeon that made instance
    norm's forward and backward pass 2.9x faster at hippocampus size in bfloat16 (README,
    "Against MONAI"). Other group counts, another axis than the last or another Keras backend
    run Keras's code.

    The class keeps Keras's name on purpose: a ``.keras`` file keys each layer's weights by its
    class name, so models exported before this layer existed load into it unchanged. The
    variables and the config are Keras's too, and so are checkpoints.

    ``relu=True`` applies a ReLU to the output, fused into the kernel as in
    ``FusedBatchNormalization``.
    """

    def call(self, inputs: Any) -> Any:
        rank = len(inputs.shape)
        if (
            keras.backend.backend() != "tensorflow"
            or self.groups != inputs.shape[-1]
            or self.axis not in (-1, rank - 1)
            or rank not in (4, 5)
        ):
            return self.keras_call(inputs)
        import tensorflow as tf  # the TensorFlow backend's own kernel, as in argmax_pooling

        scale, offset = _scale_and_offset(self, inputs.shape[-1])

        def normalise(sample: Any) -> Any:
            # A 3D sample (D, H, W, C) is already the 4D input oneDNN takes; 2D gets a batch of 1.
            x = sample if rank == 5 else sample[None]
            y = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=self.epsilon, is_training=True, data_format="NHWC",
            )[0]  # fmt: skip
            if self.relu:
                y = tf.nn.relu(y)
            return y if rank == 5 else y[0]

        if inputs.shape[0] is not None:  # training: a fixed batch, unrolled
            y = tf.stack([normalise(sample) for sample in tf.unstack(inputs)])
        else:  # inference on batches of any size
            y = tf.map_fn(normalise, inputs)
        return ops.cast(y, self.compute_dtype)


def _add_bias(layer: keras.layers.Layer, outputs: Any) -> Any:
    """``outputs + bias`` by a broadcast add, then the layer's activation.

    Keras adds a convolution's bias with ``BiasAdd`` so that TensorFlow can fuse it into the
    convolution. Its gradient, ``BiasAddGrad``, sums in the tensor's own dtype: in bfloat16
    over 2 x 64^3 voxels of positive gradients it returned under 1% of the true sum (the sum
    stops growing once each term is below its rounding step). The broadcast add's gradient is
    a ``Sum`` that accumulates in float32, and on the CPU the add itself took a third of
    ``BiasAdd``'s time in bfloat16.
    """
    import tensorflow as tf

    outputs = tf.add(outputs, ops.cast(layer.bias, outputs.dtype))  # tf.add: not made BiasAdd
    return outputs if layer.activation is None else layer.activation(outputs)


def _adds_bias_itself(layer: keras.layers.Layer, always: bool) -> bool:
    """Whether ``layer`` should add its bias with ``_add_bias``: on TensorFlow, channels-last,
    with a bias, and (unless ``always``) in a 16-bit compute dtype, where ``BiasAddGrad`` fails;
    a float32 convolution keeps the bias fused into it."""
    return (
        keras.backend.backend() == "tensorflow"
        and layer.use_bias
        and layer.data_format == "channels_last"
        and (always or layer.compute_dtype in ("bfloat16", "float16"))
    )


def _transposed(layer: keras.layers.Layer, inputs: Any) -> Any:
    return ops.conv_transpose(
        inputs, layer.kernel, strides=list(layer.strides), padding=layer.padding,
        output_padding=layer.output_padding, dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )  # fmt: skip


# The four convolution classes below keep Keras's class names, variables and configs on
# purpose: a .keras file keys each layer's weights by class name, so models saved with
# Keras's layers load into these and the other way round; checkpoints match as well.


class _AddsOwnBias:
    """Mixin for a Keras convolution class: ``call`` adds the bias with ``_add_bias`` where
    ``_adds_bias_itself`` says so (``bias_always`` for its ``always``), else Keras's code."""

    bias_always = False

    def call(self, inputs: Any) -> Any:
        if not _adds_bias_itself(self, always=self.bias_always):  # type: ignore[arg-type]
            return super().call(inputs)  # type: ignore[misc]
        return _add_bias(self, self.without_bias(inputs))  # type: ignore[arg-type]

    def without_bias(self, inputs: Any) -> Any:
        return self.convolution_op(inputs, self.kernel)  # type: ignore[attr-defined]


@keras.saving.register_keras_serializable(package="segnet")
class Conv3D(_AddsOwnBias, keras.layers.Conv3D):
    """Keras's Conv3D; in bfloat16 or float16 its bias is added by ``_add_bias``; in bfloat16
    a kernel flat along one axis (3x3x1) takes its gradients from 2D kernels (``in_plane``)."""

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        axis = None
        if keras.backend.backend() == "tensorflow" and self.groups == 1:
            axis = in_plane.flat_axis(
                self.kernel_size, self.strides, self.dilation_rate, self.padding,
                self.data_format, self.compute_dtype,
            )  # fmt: skip
        if axis is None:
            return super().convolution_op(inputs, kernel)
        return in_plane.conv3d(inputs, kernel, axis, self.padding)


@keras.saving.register_keras_serializable(package="segnet")
class Conv2D(_AddsOwnBias, keras.layers.Conv2D):
    """Keras's Conv2D; in bfloat16 or float16 its bias is added by ``_add_bias``."""


@keras.saving.register_keras_serializable(package="segnet")
class Conv3DTranspose(_AddsOwnBias, keras.layers.Conv3DTranspose):
    """Keras's Conv3DTranspose with its bias added by ``_add_bias`` in every precision:
    TensorFlow fuses no bias into a transposed convolution, so nothing is lost."""

    bias_always = True

    def without_bias(self, inputs: Any) -> Any:
        return _transposed(self, inputs)


@keras.saving.register_keras_serializable(package="segnet")
class Conv2DTranspose(_AddsOwnBias, keras.layers.Conv2DTranspose):
    """Keras's Conv2DTranspose with its bias added by ``_add_bias``, as ``Conv3DTranspose``."""

    bias_always = True

    def without_bias(self, inputs: Any) -> Any:
        return _transposed(self, inputs)


_CONV: dict[int, type[keras.layers.Layer]] = {2: Conv2D, 3: Conv3D}
_CONV_TRANSPOSE: dict[int, type[keras.layers.Layer]] = {2: Conv2DTranspose, 3: Conv3DTranspose}


@keras.saving.register_keras_serializable(package="segnet")
class PadToMultiple(keras.layers.Layer):
    """Zero-pads the end of every spatial axis up to a multiple of ``multiple``.

    Lets a network whose poolings need divisible sizes take any size; pair it with
    ``CropToReference`` at the outputs. Sizes that already divide pass through unchanged.

    Call: ``(batch, *spatial, channels)`` -> ``(batch, *ceil(spatial / m) * m, channels)``,
    ``m`` one int for every axis or one per axis.
    """

    def __init__(self, multiple: Size, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multiple = _stored(multiple)

    def call(self, x: Any) -> Any:
        return pad_to_multiple(x, self.multiple)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        multiples = per_axis(self.multiple, len(input_shape) - 2)
        spatial = [
            None if n is None else n * m
            for n, m in zip(_spatial_ceil(input_shape, self.multiple), multiples)
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

    def __init__(self, scale: Size = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = _stored(scale)

    def call(self, inputs: Sequence[Any]) -> Any:
        x, reference = inputs
        shape, target = ops.shape(x), ops.shape(reference)
        scales = per_axis(self.scale, len(target) - 2)
        spatial = [(n + s - 1) // s for n, s in zip(target[1:-1], scales)]
        return ops.slice(x, [0] * len(shape), [shape[0], *spatial, shape[-1]])

    def compute_output_shape(self, input_shape: Sequence[Sequence[int | None]]) -> tuple:
        x, reference = input_shape
        return (x[0], *_spatial_ceil(reference, self.scale), x[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="segnet")
class LinearUpsampling(keras.layers.Layer):
    """Multiplies each spatial size by an integer ``factor`` (one for all axes or one per axis)
    with (bi/tri)linear interpolation.

    Half-pixel centres with edge clamping, like ``tf.image.resize(..., "bilinear")`` and
    ``scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")``: output voxel ``o`` reads
    input coordinate ``(o + 0.5) / factor - 0.5``. Separable: one pass per axis, each a blend
    of a voxel with one neighbour per output phase, so only slices, adds and a reshape.

    Call: ``(batch, *spatial, channels)`` -> ``(batch, *spatial * factor, channels)``.
    """

    def __init__(self, factor: Size, spatial_dims: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = _stored(factor)
        self.spatial_dims = spatial_dims

    def call(self, x: Any) -> Any:
        for axis, factor in enumerate(per_axis(self.factor, self.spatial_dims), start=1):
            if factor > 1:
                x = self._upsample_axis(x, axis, factor)
        return x

    def _upsample_axis(self, x: Any, axis: int, factor: int) -> Any:
        def take(sl: slice) -> Any:
            return x[(slice(None),) * axis + (sl,)]

        previous = ops.concatenate([take(slice(0, 1)), take(slice(None, -1))], axis=axis)
        following = ops.concatenate([take(slice(1, None)), take(slice(-1, None))], axis=axis)
        phases = []
        for phase in range(factor):
            offset = (phase + 0.5) / factor - 0.5  # in (-0.5, 0.5): one neighbour
            neighbour = previous if offset < 0 else following
            phases.append(x * (1.0 - abs(offset)) + neighbour * abs(offset))
        shape = list(ops.shape(x))
        shape[axis] = shape[axis] * factor
        return ops.reshape(ops.stack(phases, axis=axis + 1), shape)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        factors = per_axis(self.factor, self.spatial_dims)
        spatial = [None if n is None else n * f for n, f in zip(input_shape[1:-1], factors)]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor, "spatial_dims": self.spatial_dims}
