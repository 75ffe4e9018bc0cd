"""The compiled training step, replicated by the distribution strategy.

One step, on each replica: forward pass in the compute precision, loss in float32, gradients
of ``loss / replicas`` (the loss scale applied for float16), then the gradients are summed over
replicas, clipped by their global norm (of the true, unscaled gradient) and applied. With
``train.ema_decay`` the weight averages then move towards the new weights, on every device
(:mod:`segnet.training.ema`). The step also returns the hard confusion counts of the batch for
the running Dice, and a flag that is raised when any worker was asked to stop, so that every
worker stops at the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from segnet.losses import LossFn
from segnet.training.ema import WeightAverage
from segnet.training.optimizers import clip_by_global_norm

Batch = Any  # (images, labels), per-replica values under a distribution strategy


class StepOutput(NamedTuple):
    """What one training step reports, reduced over replicas.

    Attributes:
        loss: float32 scalar, the mean loss over the global batch.
        counts: float32 (num_classes, 3): true positives, false positives, false negatives of
            the argmax of the full-resolution logits.
        grad_norm: float32 scalar, the global gradient norm before clipping.
        stop: bool scalar, True when any worker asked to stop after this step.
    """

    loss: tf.Tensor
    counts: tf.Tensor
    grad_norm: tf.Tensor
    stop: tf.Tensor


def confusion_counts(labels: Any, logits: Any, num_classes: int) -> Any:
    """(num_classes, 3) float32 tp, fp, fn of ``argmax(logits)`` against ``labels``.

    Args:
        labels: int (batch, *spatial).
        logits: (batch, *spatial, num_classes).
        num_classes: K.
    """
    predicted = tf.one_hot(tf.argmax(logits, axis=-1), num_classes, dtype=tf.float32)
    truth = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    axes = list(range(len(logits.shape) - 1))
    tp = tf.reduce_sum(predicted * truth, axis=axes)
    fp = tf.reduce_sum(predicted, axis=axes) - tp
    fn = tf.reduce_sum(truth, axis=axes) - tp
    return tf.stack([tp, fp, fn], axis=-1)


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: LossFn,
    strategy: tf.distribute.Strategy,
    *,
    num_classes: int,
    clip_norm: float | None,
    jit_compile: bool = False,
    jit_compile_loss: bool = True,
    average: WeightAverage | None = None,
) -> Callable[[Batch, tf.Tensor], StepOutput]:
    """``step(batch, stop) -> StepOutput``: one optimizer update on a distributed batch.

    Args:
        model: built under ``strategy.scope()``.
        optimizer: built on ``model.trainable_variables`` under the same scope.
        loss_fn: ``loss(labels, outputs)``, see :mod:`segnet.losses`.
        strategy: the distribution strategy.
        num_classes: classes, background included.
        clip_norm: global gradient norm limit (None: no clipping).
        jit_compile: compile the per-replica step with XLA.
        jit_compile_loss: compile the loss and the batch's confusion counts with XLA when the
            step is not compiled: element-wise work and reductions over the logits, which XLA
            fuses into a few passes (the convolutions stay on oneDNN).
        average: the weight averages to update after each update (None: no averaging).

    Returns:
        The step function; ``batch`` comes from the distributed dataset's iterator, ``stop``
        is a float32 scalar tensor, 1.0 when this process was asked to stop.
    """
    replicas = strategy.num_replicas_in_sync
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    variables = model.trainable_variables

    def loss_and_counts(labels: tf.Tensor, outputs: Any) -> tuple:
        main = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return loss_fn(labels, outputs), confusion_counts(labels, main, num_classes)

    if jit_compile_loss and not jit_compile:
        loss_and_counts = tf.function(loss_and_counts, jit_compile=True, reduce_retracing=True)

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def replica_step(images: tf.Tensor, labels: tf.Tensor, stop: tf.Tensor) -> tuple:
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss, counts = loss_and_counts(labels, outputs)
            # The replicas' gradients are summed, so each contributes its share of the mean.
            objective = loss / replicas
            if scaled:
                objective = optimizer.scale_loss(objective)
        grads = tape.gradient(objective, variables)
        context = tf.distribute.get_replica_context()
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        scale = optimizer.dynamic_scale if scaled else 1.0
        grads, norm = clip_by_global_norm(grads, clip_norm, scale)
        if replicas > 1:
            # Keras 3 sums gradients over replicas again inside apply() (an internal,
            # _backend_update_step; test_step.py pins it); the grads are already summed, so each
            # replica hands over its share (exact for powers of two).
            grads = [g / replicas for g in grads]
        optimizer.apply(grads, variables)
        # An input returned unchanged would leave the function as the same tensor on every
        # replica, which the strategy cannot reduce: identity makes it a per-replica value.
        return loss, counts, norm, tf.identity(stop)

    @tf.function
    def step(batch: Batch, stop: tf.Tensor) -> StepOutput:
        images, labels = batch
        loss, counts, norm, stop = strategy.run(replica_step, args=(images, labels, stop))
        if average is not None:  # reads the weights the replicas have just updated
            average.update(strategy, optimizer.iterations)
        mean = tf.distribute.ReduceOp.MEAN
        total = tf.distribute.ReduceOp.SUM
        return StepOutput(
            loss=strategy.reduce(mean, loss, axis=None),
            counts=strategy.reduce(total, counts, axis=None),
            grad_norm=strategy.reduce(mean, norm, axis=None),
            stop=strategy.reduce(total, stop, axis=None) > 0,
        )

    return step
