"""SegNet (Badrinarayanan et al.), 2D or 3D: the decoder unpools at the encoder's argmax.

Each encoder level is a conv block ending in a max pool (2 wide along every axis, or per axis
by ``pool_sizes``: ``[1, 2, 2]`` keeps a coarse depth axis) that records where every maximum
came from; each decoder level puts its input back at those positions in a zero map of
the recorded pre-pool shape, then densifies it with a conv block. No skip connections carry
features, only the argmax positions, so the decoder is cheap in memory.

Output contract: one float32 **logits** tensor ``(batch, *spatial, num_classes)`` with the
input's spatial size; the loss applies the softmax. ``output_scales == (1,)``,
``supervised_outputs == (0,)``. Any spatial size works (odd sizes pool with ``same`` padding
and unpool back exactly), so there is no divisibility rule.

Input layout: ``spatial_dims=3`` takes ``(batch, depth, height, width, channels)``;
``spatial_dims=2`` takes ``(batch, height, width, channels)`` and the trainer feeds it the
patch's axial slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras

from segnet.config import SegNetConfig, collapse
from segnet.models import blocks
from segnet.models.argmax_pooling import MaxPoolingWithArgmax, MaxUnpoolingWithArgmax
from segnet.models.base import SegmentationModel, check_arguments
from segnet.strict_dataclass import to_dict

if TYPE_CHECKING:
    from segnet.config import ExperimentConfig


@keras.saving.register_keras_serializable(package="segnet")
class SegNet(SegmentationModel):
    """SegNet as a functional Keras model; see the module docstring for the tensor contract.

    Encoder level ``l`` has ``filters * growth**l`` filters (capped at ``max_filters``); the
    decoder mirrors it, its last convolution at each level narrowing to the next level's width.

    Args:
        num_channels: input channels.
        num_classes: output classes, background included.
        spatial_dims: 2 or 3.
        depth: pool/unpool pairs.
        filters: filters at the first level.
        growth: filter multiplier per level.
        max_filters: filter cap.
        convs_per_level: convolutions per block.
        norm: ``"batch" | "instance" | "group" | "none"``.
        groups: groups for ``norm="group"``.
        activation: ``"relu" | "leaky_relu" | "elu" | "gelu" | "swish"``.
        dropout: channel dropout rate after each block.
        pool_sizes: per level, a pool of 1 or 2 per spatial axis; None pools 2 along every axis.
        **kwargs: ``keras.Model`` arguments (``name``, ``trainable``).
    """

    def __init__(
        self,
        num_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 3,
        depth: int = 4,
        filters: int = 16,
        growth: float = 2.0,
        max_filters: int = 256,
        convs_per_level: int = 2,
        norm: str = "batch",
        groups: int = 8,
        activation: str = "relu",
        dropout: float = 0.0,
        pool_sizes: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        settings = check_arguments(
            SegNetConfig,
            type(self).__name__,
            spatial_dims=spatial_dims,
            depth=depth,
            filters=filters,
            growth=growth,
            max_filters=max_filters,
            convs_per_level=convs_per_level,
            norm=norm,
            groups=groups,
            activation=activation,
            dropout=dropout,
            pool_sizes=pool_sizes,
        )
        windows = [collapse(pool) for pool in settings.level_pools]

        # === Layers ===
        # Created by the block functions below as the graph is traced, named by level.
        spec = blocks.ConvSpec(spatial_dims, convs_per_level, norm, groups, activation, dropout)
        widths = blocks.level_filters(filters, growth, max_filters, depth)

        # === Functional Model ===
        image = keras.Input(shape=(None,) * spatial_dims + (num_channels,), name="image")
        x = image
        pools = []
        for level in range(depth):
            before_pool = blocks.conv_block(x, widths[level], spec, name=f"encoder{level}")
            x, argmax = MaxPoolingWithArgmax(windows[level], name=f"pool{level}")(before_pool)
            pools.append((argmax, before_pool))
        for level in reversed(range(depth)):
            argmax, before_pool = pools[level]
            x = MaxUnpoolingWithArgmax(windows[level], name=f"unpool{level}")(
                [x, argmax, before_pool]
            )
            narrow = widths[max(level - 1, 0)]
            x = blocks.conv_block(
                x, widths[level], spec, name=f"decoder{level}", last_filters=narrow
            )
        logits = blocks.head(x, num_classes, spatial_dims, name="logits")
        kwargs.setdefault("name", "segnet")
        super().__init__(
            inputs=image,
            outputs=logits,
            num_channels=num_channels,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
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
        self.pool_sizes = settings.pool_sizes

    @property
    def output_scales(self) -> tuple[int, ...]:
        """One full-resolution output."""
        return (1,)

    @property
    def supervised_outputs(self) -> tuple[int, ...]:
        """The loss uses the only output."""
        return (0,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_channels": self.num_channels,
                "num_classes": self.num_classes,
                "spatial_dims": self.spatial_dims,
                "depth": self.depth,
                "filters": self.filters,
                "growth": self.growth,
                "max_filters": self.max_filters,
                "convs_per_level": self.convs_per_level,
                "norm": self.norm,
                "groups": self.groups,
                "activation": self.activation,
                "dropout": self.dropout,
                "pool_sizes": to_dict(self.pool_sizes),
            }
        )
        return config


def build_segnet(config: ExperimentConfig) -> SegNet:
    """The ``model.segnet`` architecture for ``config.data``'s channels and classes."""
    return SegNet(
        num_channels=config.data.num_channels,
        num_classes=config.data.num_classes,
        **dataclasses.asdict(config.model.segnet),
    )
