"""Optimisers, learning-rate schedules and gradient clipping.

Two recipes are the defaults people reach for: SGD with Nesterov momentum 0.99 and poly decay
(nnU-Net), and AdamW with a linear warm-up and cosine decay. Any optimizer pairs with any
schedule. Weight decay is Keras 3's decoupled form, ``w -= lr * weight_decay * w`` on every
variable, applied before the gradient step.

Gradient clipping is not left to the Keras optimizer: Keras 3 clips each replica's gradient
before the cross-replica sum, which under a distribution strategy clips a fraction of the
gradient. The train step sums first and then calls :func:`clip_by_global_norm`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import keras
import tensorflow as tf
from keras import ops

from segnet.config import ExperimentConfig

Decay = Literal["poly", "cosine", "constant"]


@keras.saving.register_keras_serializable(package="segnet")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to the peak, then poly, cosine or no decay to the last step.

    With ``s`` the number of updates already applied (the optimizer's ``iterations``), ``W``
    the warm-up steps and ``T`` the total steps::

        s < W:  peak * s / W
        else:   progress = min((s - W) / max(T - W, 1), 1)
                poly:     peak * (1 - progress) ** power
                cosine:   peak * (1 + cos(pi * progress)) / 2
                constant: peak

    Args:
        peak_learning_rate: the learning rate reached after the warm-up.
        total_steps: the planned number of updates, ``epochs * steps_per_epoch``.
        warmup_steps: length of the linear warm-up (0: none).
        decay: ``poly``, ``cosine`` or ``constant``.
        poly_power: the exponent of the poly decay (nnU-Net: 0.9).
    """

    def __init__(
        self,
        peak_learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        decay: Decay = "poly",
        poly_power: float = 0.9,
    ) -> None:
        if decay not in ("poly", "cosine", "constant"):
            raise ValueError(f"decay must be poly, cosine or constant, got {decay!r}")
        self.peak_learning_rate = float(peak_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.poly_power = float(poly_power)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        peak = self.peak_learning_rate
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "poly":
            decayed = peak * ops.power(1.0 - progress, self.poly_power)
        elif self.decay == "cosine":
            decayed = peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            decayed = ops.full_like(progress, peak)
        if self.warmup_steps == 0:
            return decayed
        warm = peak * step / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "poly_power": self.poly_power,
        }


@keras.saving.register_keras_serializable(package="segnet")
class SGD(keras.optimizers.SGD):
    """Keras's SGD (same variables, checkpoints and config) with a one-kernel momentum update.

    Keras writes the momentum update as about ten element-wise operations per variable, each a
    separate TensorFlow kernel and a pass over the variable. TensorFlow's
    ``ResourceApplyKerasMomentum`` computes the same update, Nesterov or not, in one kernel:
    ``m = momentum * m - lr * g``, then ``w += momentum * m - lr * g`` (Nesterov) or ``w += m``.
    Sparse gradients and momentum 0 take Keras's own path.
    """

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.momentum == 0 or isinstance(gradient, tf.IndexedSlices):
            super().update_step(gradient, variable, learning_rate)
            return
        momentum = self.momentums[self._get_variable_index(variable)]
        # Under a distribution strategy this runs inside ``extended.update``: ``variable`` is
        # this device's copy, and the mirrored momentum's handle resolves to this device's too.
        weights = variable.value if isinstance(variable, keras.Variable) else variable
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=weights.handle,
            accum=momentum.value.handle,
            lr=tf.cast(learning_rate, weights.dtype),
            grad=tf.cast(gradient, weights.dtype),
            momentum=tf.cast(self.momentum, weights.dtype),
            use_nesterov=self.nesterov,
        )


def build_schedule(config: ExperimentConfig) -> WarmupDecaySchedule:
    """The learning-rate schedule over ``train.epochs * train.steps_per_epoch`` updates."""
    opt = config.optimizer
    return WarmupDecaySchedule(
        peak_learning_rate=opt.learning_rate,
        total_steps=config.train.epochs * config.train.steps_per_epoch,
        warmup_steps=opt.warmup_steps,
        decay=opt.schedule,
        poly_power=opt.poly_power,
    )


def build_optimizer(config: ExperimentConfig) -> keras.optimizers.Optimizer:
    """The configured optimizer, wrapped in a dynamic loss scale for ``mixed_float16``.

    Call it inside ``strategy.scope()`` so its variables are mirrored. It does not clip: see
    the module docstring and :func:`clip_by_global_norm`.
    """
    opt = config.optimizer
    schedule = build_schedule(config)
    optimizer: keras.optimizers.Optimizer
    if opt.name == "sgd":
        optimizer = SGD(
            learning_rate=schedule,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay or None,
        )
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=opt.weight_decay)
    if config.runtime.precision == "mixed_float16":
        # float16 gradients underflow to 0 without a loss scale; the dynamic one halves on
        # overflow (skipping that update) and doubles after 2000 clean steps.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def clip_by_global_norm(
    grads: list[Any], clip_norm: float | None, loss_scale: Any = 1.0
) -> tuple[list[Any], Any]:
    """Scales gradients down so their global L2 norm is at most ``clip_norm``.

    Args:
        grads: gradients, already summed over replicas.
        clip_norm: the largest allowed norm of the unscaled gradient; None disables clipping.
        loss_scale: the loss scale the gradients carry (mixed_float16), so the limit applies to
            the true gradient.

    Returns:
        ``(grads, norm)`` where norm is the global norm of the unscaled gradient before
        clipping (non-finite when a gradient overflowed).
    """
    squares = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads if g is not None]
    norm = ops.sqrt(ops.sum(ops.stack(squares))) / ops.cast(loss_scale, "float32")
    if clip_norm is None:
        return grads, norm
    factor = ops.minimum(1.0, clip_norm / ops.maximum(norm, 1e-12))
    return [None if g is None else g * ops.cast(factor, g.dtype) for g in grads], norm
