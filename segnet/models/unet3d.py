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
  scale)`` makes matching soft targets.
* ``model.supervised_outputs`` lists the outputs the loss uses, finest first, so
  ``loss.deep_supervision_weights`` (or halving per entry) applies in that order. With
  ``loss_at="low"`` the full-resolution output is not in it: the loss compares the
  low-resolution logits with labels averaged down to that resolution.

Any input size works: the input is zero-padded at the end of each axis to a multiple of
``2**depth * input_downsample`` and every output is cropped back. Training patches should be
multiples already (``data.patch_size`` is checked at config load), so that padding is a
no-op there; on other sizes the padded zeros take part in the convolutions near the far
edges and in instance/group normalisation statistics.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import keras

from segnet.config import UNet3DConfig
from segnet.models import blocks
from segnet.models.base import SegmentationModel, check_arguments

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig


@keras.saving.register_keras_serializable(package="segnet")
class UNet3D(SegmentationModel):
    """The 3D U-Net of Çiçek et al. with nnU-Net's knobs, as a functional Keras model.

    Input ``(batch, depth, height, width, num_channels)`` of any spatial size; for outputs see
    the module docstring. Levels: ``depth`` max-pool halvings, ``convs_per_level`` convolutions
    per level, ``filters * growth**level`` filters capped at ``max_filters``.

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
        input_downsample: 1, 2 or 4; the network runs on the input averaged down by this
            factor (``AveragePooling3D`` inside the graph) and its logits are brought back.
        output_upsample: ``"trilinear"`` (interpolate the low-resolution logits) or
            ``"learned"`` (a transposed convolution with stride ``input_downsample`` from
            the last decoder features).
        loss_at: ``"full"`` or ``"low"`` (supervise the low-resolution logits; needs
            ``input_downsample > 1`` and ``output_upsample="trilinear"``, because learned
            up-sampling would get no gradient).
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
        input_downsample: int = 1,
        output_upsample: str = "trilinear",
        loss_at: str = "full",
        **kwargs: Any,
    ) -> None:
        check_arguments(
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
        )

        # === Layers ===
        # Created by the block functions below as the graph is traced, named by level.
        spec = blocks.ConvSpec(3, convs_per_level, norm, groups, activation, dropout)
        widths = blocks.level_filters(filters, growth, max_filters, depth + 1)
        scales = _output_scales(depth, deep_supervision, input_downsample, loss_at)

        # === Functional Model ===
        image = keras.Input(shape=(None, None, None, num_channels), name="image")
        # `image` stays bound to the Input: the model must own the padding and pooling.
        x = blocks.PadToMultiple(2**depth * input_downsample, name="pad")(image)
        if input_downsample > 1:
            x = keras.layers.AveragePooling3D(input_downsample, name="input_downsample")(x)
        features = _encoder_decoder(x, widths, spec, upsampling)
        logits = _heads(features, num_classes, scales, input_downsample, output_upsample)
        outputs = [
            blocks.crop_logits(tensor, image, scale, "logits" if scale == 1 else f"logits_x{scale}")
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
        self.input_downsample = input_downsample
        self.output_upsample = output_upsample
        self.loss_at = loss_at

    @property
    def output_scales(self) -> tuple[int, ...]:
        """Downsampling factor of each output (1 = the input's resolution), in output order."""
        return _output_scales(
            self.depth, self.deep_supervision, self.input_downsample, self.loss_at
        )

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
                "input_downsample": self.input_downsample,
                "output_upsample": self.output_upsample,
                "loss_at": self.loss_at,
            }
        )
        return config


def _output_scales(
    depth: int, deep_supervision: bool, input_downsample: int, loss_at: str
) -> tuple[int, ...]:
    scales = [1]
    if loss_at == "low":
        scales.append(input_downsample)
    if deep_supervision:
        scales += [input_downsample * 2**level for level in range(1, depth)]
    return tuple(scales)


def _encoder_decoder(
    x: Any, widths: list[int], spec: blocks.ConvSpec, upsampling: str
) -> list[Any]:
    """The U: returns the decoder's features per level, index 0 at ``x``'s resolution."""
    depth = len(widths) - 1
    skips = []
    for level in range(depth):
        x = blocks.conv_block(x, widths[level], spec, name=f"encoder{level}")
        skips.append(x)
        x = blocks.down(x, 3, name=f"down{level}")
    x = blocks.conv_block(x, widths[depth], spec, name="bottleneck")
    features = [x] * depth
    for level in reversed(range(depth)):
        x = blocks.up(x, widths[level], 3, upsampling, name=f"up{level}")
        x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = blocks.conv_block(x, widths[level], spec, name=f"decoder{level}")
        features[level] = x
    return features


def _heads(
    features: list[Any],
    num_classes: int,
    scales: tuple[int, ...],
    input_downsample: int,
    output_upsample: str,
) -> list[Any]:
    """Logits for every entry of ``scales`` (uncropped), from the decoder features."""
    if input_downsample == 1:
        full = low = blocks.head(features[0], num_classes, 3, name="head")
    elif output_upsample == "learned":
        low = None
        full = keras.layers.Conv3DTranspose(
            num_classes,
            input_downsample,
            strides=input_downsample,
            dtype="float32",
            name="head_learned_up",
        )(features[0])
    else:
        low = blocks.head(features[0], num_classes, 3, name="head")
        full = blocks.LinearUpsampling(
            input_downsample, 3, dtype="float32", name="head_trilinear_up"
        )(low)
    logits = [full]
    for scale in scales[1:]:
        level = (scale // input_downsample).bit_length() - 1
        logits.append(
            low
            if level == 0
            else blocks.head(features[level], num_classes, 3, name=f"head_x{scale}")
        )
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
