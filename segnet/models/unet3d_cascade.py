"""Coarse-to-fine cascade: a low-resolution U-Net guides a full-resolution one.

Stage 1 (the nested ``UNet3D`` named ``stage1``) segments the input averaged down by
``downsample``; its softmax, linearly up-sampled to full resolution, is concatenated to the
image as extra channels of stage 2 (``stage2``), which predicts the full-resolution logits.

Output contract (read by the loss and the trainer):

* The model always returns a list of two float32 **logits** tensors:
  ``[full (batch, depth, height, width, num_classes),
  low (batch, *ceil(spatial / downsample), num_classes)]``, i.e. ``output_scales`` is
  ``(1, downsample)``; targets for the low output come from
  ``segnet.models.blocks.downsample_labels(labels, num_classes, downsample)``.
* ``train_stage`` decides what trains and what the loss should use (``supervised_outputs``):

  - ``"joint"``: both stages train; the loss uses ``(0, 1)`` (stage 1 as an auxiliary).
  - ``"low"``: only stage 1 is built and trained; output 0 is its logits up-sampled
    linearly to full resolution (so validation and inference work), the loss uses ``(1,)``.
  - ``"high"``: stage 1 is frozen (its batch norms run in inference mode); the loss uses
    ``(0,)``.

  Stage-wise training copies stage 1 between runs:
  ``high.get_layer("stage1").set_weights(low.get_layer("stage1").get_weights())``.

Any input size works: the input is zero-padded to a multiple of ``CascadeConfig.divisor``
(per axis ``max(low divisor * downsample, high divisor)``) and the outputs are cropped back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from segnet.config import CascadeConfig, collapse
from segnet.models import blocks
from segnet.models.base import SegmentationModel, check_arguments
from segnet.models.unet3d import UNet3D, unet3d_arguments

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig


@keras.saving.register_keras_serializable(package="segnet")
class UNet3DCascade(SegmentationModel):
    """Two-stage 3D U-Net cascade; input ``(batch, depth, height, width, num_channels)``.

    Args:
        num_channels: input channels.
        num_classes: output classes, background included.
        downsample: 2 or 4, stage 1's resolution factor.
        low: ``UNet3D`` keyword arguments of stage 1 (without channels and classes);
            ``input_downsample``, ``deep_supervision`` and ``loss_at`` must keep defaults.
        high: the same for stage 2.
        train_stage: ``"joint" | "low" | "high"`` (see the module docstring).
        **kwargs: ``keras.Model`` arguments (``name``, ``trainable``).
    """

    def __init__(
        self,
        num_channels: int = 1,
        num_classes: int = 2,
        downsample: int = 2,
        low: dict[str, Any] | None = None,
        high: dict[str, Any] | None = None,
        train_stage: str = "joint",
        **kwargs: Any,
    ) -> None:
        low, high = dict(low or {}), dict(high or {})
        settings = check_arguments(
            CascadeConfig,
            type(self).__name__,
            downsample=downsample,
            low=low,
            high=high,
            train_stage=train_stage,
        )

        # === Layers ===
        stage1 = UNet3D(num_channels, num_classes, **low, name="stage1")
        stage2 = None
        if train_stage != "low":
            stage2 = UNet3D(num_channels + num_classes, num_classes, **high, name="stage2")

        # === Functional Model ===
        image = keras.Input(shape=(None, None, None, num_channels), name="image")
        padded = blocks.PadToMultiple(collapse(settings.divisor), name="pad")(image)
        coarse = keras.layers.AveragePooling3D(downsample, name="stage1_downsample")(padded)
        low_logits = stage1(coarse)
        if stage2 is None:
            full_logits = blocks.LinearUpsampling(downsample, 3, dtype="float32", name="stage1_up")(
                low_logits
            )
        else:
            guide = keras.layers.Softmax(name="stage1_softmax")(low_logits)
            guide = blocks.LinearUpsampling(downsample, 3, name="stage1_up")(guide)
            full_logits = stage2(keras.layers.Concatenate(name="guided")([padded, guide]))
        outputs = [
            blocks.crop_logits(full_logits, image, 1, name="logits"),
            blocks.crop_logits(low_logits, image, downsample, name="stage1_logits"),
        ]
        kwargs.setdefault("name", "unet3d_cascade")
        super().__init__(
            inputs=image,
            outputs=outputs,
            num_channels=num_channels,
            num_classes=num_classes,
            spatial_dims=3,
            **kwargs,
        )
        stage1.trainable = train_stage != "high"

        # === Config ===
        self.downsample = downsample
        self.low = low
        self.high = high
        self.train_stage = train_stage

    @property
    def output_scales(self) -> tuple[int, ...]:
        """Downsampling factor of each output: full resolution, then stage 1's."""
        return (1, self.downsample)

    @property
    def supervised_outputs(self) -> tuple[int, ...]:
        """Indices of the outputs the loss uses, finest first."""
        return {"joint": (0, 1), "low": (1,), "high": (0,)}[self.train_stage]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_channels": self.num_channels,
                "num_classes": self.num_classes,
                "downsample": self.downsample,
                "low": dict(self.low),  # plain copies of Keras' tracked dicts
                "high": dict(self.high),
                "train_stage": self.train_stage,
            }
        )
        return config


def build_unet3d_cascade(config: ExperimentConfig) -> UNet3DCascade:
    """The ``model.unet3d_cascade`` architecture for ``config.data``'s channels and classes."""
    c = config.model.unet3d_cascade
    return UNet3DCascade(
        num_channels=config.data.num_channels,
        num_classes=config.data.num_classes,
        downsample=c.downsample,
        low=unet3d_arguments(c.low),
        high=unet3d_arguments(c.high),
        train_stage=c.train_stage,
    )
