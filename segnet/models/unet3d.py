"""3D U-Net, optionally run at a lower resolution inside the graph, with deep supervision.

Output contract (read by the loss and the trainer):

* Outputs are **logits** in float32 (the heads run in float32 under mixed precision); the
  loss applies the softmax.
* With one output (no deep supervision, ``loss_at="full"``) the model returns one tensor
  ``(batch, depth, height, width, num_classes)`` at the input's size. Otherwise it returns a
  list whose element 0 is always those full-resolution logits (what inference uses), followed
  by auxiliary logits at coarser resolutions.
* ``model.output_scales[i]`` is output ``i``'s downsampling factor: its spatial size is
  ``ceil(input_size / scale)``; ``segnet.models.blocks.downsample_labels(labels, num_classes,
  scale)`` makes matching soft targets. A scale is an int when every axis agrees and a
  ``(d, h, w)`` tuple when ``pool_sizes`` or ``input_downsample`` differ between axes.
* ``model.supervised_outputs`` lists the outputs the loss uses, finest first, so
  ``loss.deep_supervision_weights`` (or halving per entry) applies in that order. With
  ``loss_at="low"`` the full-resolution output is not in it: the loss compares the
  low-resolution logits with labels averaged down to that resolution.

Per-axis pools and kernels (``pool_sizes``, ``kernel_sizes``) let a coarse axis stay unpooled
and convolve within slices (``[1, 3, 3]``) until the in-plane resolution has caught up with it,
as nnU-Net does for anisotropic scans.

Any input size works: the input is zero-padded at the end of each axis to a multiple of its
``divisor`` (the product of that axis's pools times ``input_downsample``) and every output is
cropped back. Training patches should be
multiples already (``data.patch_size`` is checked at config load), so that padding is a
no-op there; on other sizes the padded zeros take part in the convolutions near the far
edges and in instance/group normalisation statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras

from segnet.config import UNet3DConfig, collapse
from segnet.models import blocks
from segnet.models.base import Scale, SegmentationModel, check_arguments
from segnet.strict_dataclass import to_dict

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig


@keras.saving.register_keras_serializable(package="segnet")
class UNet3D(SegmentationModel):
    """The 3D U-Net of Çiçek et al. with nnU-Net's knobs, as a functional Keras model.

    Input ``(batch, depth, height, width, num_channels)`` of any spatial size; for outputs see
    the module docstring. Levels: ``depth`` max pools (2 along every axis, or ``pool_sizes``),
    ``convs_per_level`` convolutions per level, ``filters * growth**level`` filters capped at
    ``max_filters``.

    Args:
        num_channels: input channels (image modalities).
        num_classes: output classes, background included.
        depth: number of poolings.
        filters: filters at the first level.
        growth: filter multiplier per level.
        max_filters: filter cap.
        convs_per_level: convolutions per block.
        norm: ``"batch" | "instance" | "group" | "none"``.
        groups: groups for ``norm="group"``.
        activation: ``"relu" | "leaky_relu" | "elu" | "gelu" | "swish"``.
        dropout: channel dropout rate after each block.
        upsampling: decoder up-sampling, ``"transpose"`` or ``"resize"``.
        deep_supervision: add logits heads at decoder levels 1..depth-1.
        input_downsample: 1, 2 or 4, or one of them per axis; the network runs on the input
            averaged down by this factor (``AveragePooling3D`` inside the graph) and its
            logits are brought back.
        output_upsample: ``"trilinear"`` (interpolate the low-resolution logits) or
            ``"learned"`` (a transposed convolution with stride ``input_downsample`` from
            the last decoder features).
        loss_at: ``"full"`` or ``"low"`` (supervise the low-resolution logits; needs
            ``input_downsample > 1`` and ``output_upsample="trilinear"``, because learned
            up-sampling would get no gradient).
        pool_sizes: per level ``(d, h, w)`` pools of 1 or 2; None pools 2 along every axis.
        kernel_sizes: per level (``depth + 1``, the bottleneck last) odd ``(d, h, w)``
            convolution kernels; None uses 3 along every axis.
        **kwargs: ``keras.Model`` arguments (``name``, ``trainable``).
    """

    def __init__(
        self,
        num_channels: int = 1,
        num_classes: int = 2,
        depth: int = 4,
        filters: int = 16,
        growth: float = 2.0,
        max_filters: int = 320,
        convs_per_level: int = 2,
        norm: str = "instance",
        groups: int = 8,
        activation: str = "leaky_relu",
        dropout: float = 0.0,
        upsampling: str = "transpose",
        deep_supervision: bool = False,
        input_downsample: int | Sequence[int] = 1,
        output_upsample: str = "trilinear",
        loss_at: str = "full",
        pool_sizes: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        settings = check_arguments(
            UNet3DConfig,
            type(self).__name__,
            depth=depth,
            filters=filters,
            growth=growth,
            max_filters=max_filters,
            convs_per_level=convs_per_level,
            norm=norm,
            groups=groups,
            activation=activation,
            dropout=dropout,
            upsampling=upsampling,
            deep_supervision=deep_supervision,
            input_downsample=input_downsample,
            output_upsample=output_upsample,
            loss_at=loss_at,
            pool_sizes=pool_sizes,
            kernel_sizes=kernel_sizes,
        )

        # === Layers ===
        # Created by the block functions below as the graph is traced, named by level.
        spec = blocks.ConvSpec(3, convs_per_level, norm, groups, activation, dropout)
        widths = blocks.level_filters(filters, growth, max_filters, depth + 1)
        scales = _output_scales(settings)
        downsample = collapse(settings.input_factors)

        # === Functional Model ===
        image = keras.Input(shape=(None, None, None, num_channels), name="image")
        # `image` stays bound to the Input: the model must own the padding and pooling.
        x = blocks.PadToMultiple(collapse(settings.divisor), name="pad")(image)
        if downsample != 1:
            x = keras.layers.AveragePooling3D(downsample, name="input_downsample")(x)
        features = _encoder_decoder(x, widths, spec, settings)
        logits = _heads(features, num_classes, settings, downsample)
        outputs = [
            blocks.crop_logits(
                tensor, image, scale, "logits" if scale == 1 else f"logits_x{_tag(scale)}"
            )
            for tensor, scale in zip(logits, scales)
        ]
        kwargs.setdefault("name", "unet3d")
        super().__init__(
            inputs=image,
            outputs=outputs if len(outputs) > 1 else outputs[0],
            num_channels=num_channels,
            num_classes=num_classes,
            spatial_dims=3,
            **kwargs,
        )

        # === Config ===
        self.depth = depth
        self.filters = filters
        self.growth = growth
        self.max_filters = max_filters
        self.convs_per_level = convs_per_level
        self.norm = norm
        self.groups = groups
        self.activation = activation
        self.dropout = dropout
        self.upsampling = upsampling
        self.deep_supervision = deep_supervision
        self.input_downsample = settings.input_downsample  # an int or a tuple, never a list
        self.output_upsample = output_upsample
        self.loss_at = loss_at
        self.pool_sizes = settings.pool_sizes
        self.kernel_sizes = settings.kernel_sizes
        self._output_scales = scales

    @property
    def output_scales(self) -> tuple[Scale, ...]:
        """Downsampling factor of each output (1 = the input's resolution), in output order;
        a ``(d, h, w)`` tuple where the axes differ."""
        return self._output_scales

    @property
    def supervised_outputs(self) -> tuple[int, ...]:
        """Indices of the outputs the loss uses, finest first."""
        start = 1 if self.loss_at == "low" else 0
        return tuple(range(start, len(self.output_scales)))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_channels": self.num_channels,
                "num_classes": self.num_classes,
                "depth": self.depth,
                "filters": self.filters,
                "growth": self.growth,
                "max_filters": self.max_filters,
                "convs_per_level": self.convs_per_level,
                "norm": self.norm,
                "groups": self.groups,
                "activation": self.activation,
                "dropout": self.dropout,
                "upsampling": self.upsampling,
                "deep_supervision": self.deep_supervision,
                "input_downsample": to_dict(self.input_downsample),
                "output_upsample": self.output_upsample,
                "loss_at": self.loss_at,
                "pool_sizes": to_dict(self.pool_sizes),
                "kernel_sizes": to_dict(self.kernel_sizes),
            }
        )
        return config


def _tag(scale: Scale) -> str:
    """A scale in a layer name: ``2`` or ``1x2x2``."""
    return str(scale) if isinstance(scale, int) else "x".join(map(str, scale))


def _output_scales(settings: UNet3DConfig) -> tuple[Scale, ...]:
    levels = [collapse(scale) for scale in settings.level_scales]
    scales: list[Scale] = [1]
    if settings.loss_at == "low":
        scales.append(levels[0])
    if settings.deep_supervision:
        scales += levels[1 : settings.depth]
    return tuple(scales)


def _encoder_decoder(
    x: Any, widths: list[int], spec: blocks.ConvSpec, settings: UNet3DConfig
) -> list[Any]:
    """The U: returns the decoder's features per level, index 0 at ``x``'s resolution."""
    depth, pools, kernels = settings.depth, settings.level_pools, settings.level_kernels
    skips = []
    for level in range(depth):
        x = blocks.conv_block(
            x, widths[level], spec, name=f"encoder{level}", kernel_size=kernels[level]
        )
        skips.append(x)
        x = blocks.down(x, 3, name=f"down{level}", pool_size=pools[level])
    x = blocks.conv_block(x, widths[depth], spec, name="bottleneck", kernel_size=kernels[depth])
    features = [x] * depth
    for level in reversed(range(depth)):
        x = blocks.up(
            x, widths[level], 3, settings.upsampling, name=f"up{level}", factor=pools[level]
        )
        x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = blocks.conv_block(
            x, widths[level], spec, name=f"decoder{level}", kernel_size=kernels[level]
        )
        features[level] = x
    return features


def _heads(
    features: list[Any],
    num_classes: int,
    settings: UNet3DConfig,
    downsample: int | tuple[int, ...],
) -> list[Any]:
    """Logits for every output of ``_output_scales(settings)`` (uncropped), from the decoder
    features; ``downsample`` is the input downsampling (an int where the axes agree)."""
    if downsample == 1:
        full = low = blocks.head(features[0], num_classes, 3, name="head")
    elif settings.output_upsample == "learned":
        low = None
        full = keras.layers.Conv3DTranspose(
            num_classes, downsample, strides=downsample, dtype="float32", name="head_learned_up"
        )(features[0])
    else:
        low = blocks.head(features[0], num_classes, 3, name="head")
        full = blocks.LinearUpsampling(downsample, 3, dtype="float32", name="head_trilinear_up")(
            low
        )
    logits = [full]
    if settings.loss_at == "low":
        logits.append(low)
    if settings.deep_supervision:
        for level in range(1, settings.depth):
            tag = _tag(collapse(settings.level_scales[level]))
            logits.append(blocks.head(features[level], num_classes, 3, name=f"head_x{tag}"))
    return logits


def unet3d_arguments(config: UNet3DConfig) -> dict[str, Any]:
    """UNet3D constructor arguments from a ``UNet3DConfig`` (its fields are the arguments)."""
    return dataclasses.asdict(config)


def build_unet3d(config: ExperimentConfig) -> UNet3D:
    """The ``model.unet3d`` architecture for ``config.data``'s channels and classes."""
    return UNet3D(
        num_channels=config.data.num_channels,
        num_classes=config.data.num_classes,
        **unet3d_arguments(config.model.unet3d),
    )
