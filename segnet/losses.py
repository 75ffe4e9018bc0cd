"""Segmentation losses: soft Dice, cross-entropy, their sum, and deep-supervision weighting.

``build_loss(config, model)`` returns ``loss(labels, outputs) -> float32 scalar``:

* ``labels``: int tensor ``(batch, *spatial)`` of class indices in ``[0, num_classes)``, with
  2 or 3 spatial axes.
* ``outputs``: what the model returns: logits ``(batch, *spatial, num_classes)``, or a list of
  them. The model contract (``segnet.models.base.SegmentationModel``) says which outputs the
  loss uses, ``model.supervised_outputs`` (finest first), and at what downsampling factor each
  one is, ``model.output_scales``; a coarser output is compared with soft targets, the one-hot
  labels averaged over each block (``segnet.models.blocks.downsample_labels``).

Definitions, with ``p = softmax(logits)`` and targets ``t`` (one-hot or soft), every sum taken
over the voxels of one sample:

* soft Dice of class ``c`` in sample ``b``:
  ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``; the Dice loss is
  ``1 - mean_{b, c}`` over the classes (background only with ``include_background_in_dice``).
  Per sample, not over the batch, so the mean over a global batch split across replicas is the
  mean of the replicas' means.
* cross-entropy ``-sum_c t_c log p_c`` per voxel, averaged over voxels; with
  ``class_weights`` each voxel counts with the weight of its class and the sum is divided by
  the sum of those weights (PyTorch's convention), so scaling all weights changes nothing.
* ``dice_ce`` = ``dice_weight * dice + ce_weight * ce``.
* deep supervision: the weighted sum of the loss at each supervised output; the default weights
  halve per output (1, 1/2, 1/4, ...) and every weight list is normalised to sum to 1.

Everything is computed in float32 whatever the compute precision: logits in float16/bfloat16
are cast first, since a Dice sum over 64^3 voxels overflows float16 and loses digits in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from keras import ops

from segnet.config import ExperimentConfig, LossConfig
from segnet.errors import ConfigError
from segnet.models.base import Scale, SegmentationModel
from segnet.models.blocks import downsample_labels

LossFn = Callable[[Any, Any], Any]


def build_loss(config: ExperimentConfig, model: SegmentationModel | None = None) -> LossFn:
    """The configured loss as ``loss(labels, outputs) -> float32 scalar``.

    Args:
        config: the experiment; reads ``loss`` and ``data.num_classes``.
        model: the model whose outputs the loss receives; its ``output_scales`` and
            ``supervised_outputs`` (see the module docstring) pick and scale the outputs.
            None: ``outputs`` is one full-resolution logits tensor.

    Returns:
        A function of ``labels`` (batch, *spatial) int and the model's ``outputs``.

    Raises:
        ConfigError: ``loss.deep_supervision_weights`` does not match the supervised outputs.
        AttributeError: ``model`` does not implement the contract (no default: a model that
            forgot it would train on its first output alone).
    """
    scales: tuple[Scale, ...] = (1,)
    supervised: tuple[int, ...] = (0,)
    if model is not None:
        scales, supervised = tuple(model.output_scales), tuple(model.supervised_outputs)
    weights = deep_supervision_weights(config.loss, len(supervised))
    num_classes = config.data.num_classes
    single = _single_output_loss(config.loss)

    def loss(labels: Any, outputs: Any) -> Any:
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        labels = ops.cast(labels, "int32")
        spatial_dims = len(labels.shape) - 1
        total = ops.zeros((), "float32")
        for weight, index in zip(weights, supervised):
            targets = downsample_labels(labels, num_classes, scales[index], spatial_dims)
            total = total + weight * single(targets, ops.cast(heads[index], "float32"))
        return total

    return loss


def deep_supervision_weights(config: LossConfig, num_heads: int) -> list[float]:
    """Weights of the supervised outputs, normalised to sum to 1 (``[1.0]`` for one output).

    Raises:
        ConfigError: ``loss.deep_supervision_weights`` does not have one weight per output.
    """
    if num_heads == 1:
        return [1.0]
    raw = config.deep_supervision_weights
    if raw is None:
        raw = tuple(0.5**i for i in range(num_heads))
    if len(raw) != num_heads or sum(raw) <= 0:
        raise ConfigError(
            [
                f"loss.deep_supervision_weights: the model has {num_heads} supervised outputs "
                f"(finest first), so give {num_heads} non-negative weights with a positive "
                f"sum, got {list(raw)}; or null to halve per output"
            ]
        )
    return [w / sum(raw) for w in raw]


def _single_output_loss(config: LossConfig) -> Callable[[Any, Any], Any]:
    """``f(targets, logits)`` on float32 targets and logits, both (batch, *spatial, K)."""
    class_weights = config.class_weights
    first = 0 if config.include_background_in_dice else 1

    def dice_term(targets: Any, logits: Any) -> Any:
        return 1.0 - ops.mean(soft_dice(targets, logits, config.smooth)[:, first:])

    def ce_term(targets: Any, logits: Any) -> Any:
        return cross_entropy(targets, logits, class_weights)

    if config.name == "dice":
        return dice_term
    if config.name == "ce":
        return ce_term

    def dice_ce(targets: Any, logits: Any) -> Any:
        return config.dice_weight * dice_term(targets, logits) + config.ce_weight * ce_term(
            targets, logits
        )

    return dice_ce


def soft_dice(targets: Any, logits: Any, smooth: float) -> Any:
    """Soft Dice per sample and class.

    Args:
        targets: float32 (batch, *spatial, K), one-hot or soft (rows summing to 1).
        logits: float32 (batch, *spatial, K).
        smooth: added to numerator and denominator, so an absent class predicted absent
            scores 1 instead of 0/0.

    Returns:
        float32 (batch, K).
    """
    probabilities = ops.softmax(logits, axis=-1)
    axes = tuple(range(1, len(logits.shape) - 1))
    intersection = ops.sum(probabilities * targets, axis=axes)
    denominator = ops.sum(probabilities, axis=axes) + ops.sum(targets, axis=axes)
    return (2.0 * intersection + smooth) / (denominator + smooth)


def cross_entropy(targets: Any, logits: Any, class_weights: Sequence[float] | None = None) -> Any:
    """Mean (optionally class-weighted) cross-entropy of soft or one-hot targets.

    Args:
        targets: float32 (batch, *spatial, K).
        logits: float32 (batch, *spatial, K).
        class_weights: K weights; a voxel counts with ``sum_c t_c w_c``, and the result is
            divided by the sum of those voxel weights.

    Returns:
        float32 scalar.
    """
    per_voxel = -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)
    if class_weights is None:
        return ops.mean(per_voxel)
    voxel_weights = ops.sum(targets * ops.convert_to_tensor(class_weights, "float32"), axis=-1)
    # The epsilon only matters when every voxel has weight 0: 0 instead of nan.
    return ops.sum(voxel_weights * per_voxel) / ops.maximum(ops.sum(voxel_weights), 1e-12)
